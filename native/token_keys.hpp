// Key mode "tokens": the service's own chained block key (service/index/keys.py, TokenKeys,
// is the reference): key_i = xxh3_64(block i's token ids as little-endian uint32,
// seed = key_{i-1}), the chain rooted at a constant for no LoRA, or a hash of the LoRA name;
// a cache_salt enters the first block's seed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace kvc {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "token ids are hashed as little-endian uint32 straight from memory");

// The chain seed of a prompt with no LoRA adapter, or with the adapter `lora`.
uint64_t tokens_root();
uint64_t tokens_root(std::string_view lora);

// The first block's seed when the prompt carries a cache_salt (an empty salt is none).
uint64_t salted_root(uint64_t root, std::string_view salt);

// Keys of the full blocks of `tokens` (a trailing partial block is ignored), chained from
// `seed`; writes count / block_size keys to `out` and returns how many. block_size >= 1.
size_t chain_keys(const uint32_t* tokens, size_t count, size_t block_size, uint64_t seed,
                  uint64_t* out);

}  // namespace kvc
