#include "token_keys.hpp"

#include <string>

#define XXH_INLINE_ALL
#include <xxhash.h>

namespace kvc {

namespace {

constexpr std::string_view kDomain{"kv-cache/tokens/v1\0", 19};

uint64_t hash_of(std::string_view bytes, uint64_t seed) {
    return XXH3_64bits_withSeed(bytes.data(), bytes.size(), seed);
}

}  // namespace

uint64_t tokens_root() {
    static const uint64_t root = hash_of(std::string(kDomain) + "base", 0);
    return root;
}

uint64_t tokens_root(std::string_view lora) {
    std::string text(kDomain);
    text.append("lora", 4).push_back('\0');
    text.append(lora);
    return hash_of(text, 0);
}

uint64_t salted_root(uint64_t root, std::string_view salt) {
    if (salt.empty()) {
        return root;
    }
    std::string text("salt", 4);
    text.push_back('\0');
    text.append(salt);
    return hash_of(text, root);
}

size_t chain_keys(const uint32_t* tokens, size_t count, size_t block_size, uint64_t seed,
                  uint64_t* out) {
    const size_t blocks = count / block_size;
    uint64_t key = seed;
    for (size_t i = 0; i < blocks; i++) {
        key = XXH3_64bits_withSeed(tokens + i * block_size, block_size * sizeof(uint32_t), key);
        out[i] = key;
    }
    return blocks;
}

}  // namespace kvc
