// One model's block keys, from decoded events and from queries (the Python twins are
// service/index/translate.py, EventTranslator, and service/index/keys.py):
// - tokens mode: our own chained key of each block's token ids (token_keys.hpp); an engine
//   hash -> key map resolves events that carry only hashes;
// - vllm mode: the engine hashes are the keys; every BlockStored with tokens is hashed again
//   (vllm_hash.hpp) and compared, so a misconfigured seed or algorithm shows up at once.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "decode.hpp"
#include "engine_map.hpp"
#include "vllm_hash.hpp"

namespace kvc {

enum class KeyMode : uint8_t { kTokens, kVllm };

// Why (part of) an event is skipped after decoding (translate.py SKIP_REASONS, in order).
enum class TranslateSkip : uint8_t { kUnknownParent, kUnmapped, kBadTokens, kCount };
constexpr int kTranslateSkipCount = static_cast<int>(TranslateSkip::kCount);

struct KeyingSettings {
    KeyMode mode = KeyMode::kTokens;
    HashAlgorithm algorithm = HashAlgorithm::kSha256;
    std::optional<std::string> seed;  // PYTHONHASHSEED; none: vLLM >= 0.29's default
    bool configured = false;
};

// What one event does to the index: store or remove `keys` on `tier`, clear, or nothing.
struct IndexOp {
    enum Kind : uint8_t { kNothing, kStore, kRemove, kClear } kind = kNothing;
    int tier = 0;
    const uint64_t* keys = nullptr;  // into the caller's scratch
    size_t count = 0;
};

class ModelKeying {
   public:
    ModelKeying(std::string name, const KeyingSettings& settings, uint64_t max_engine_hashes,
                uint64_t max_parents);

    const std::string& name() const { return name_; }
    KeyMode mode() const { return settings_.mode; }
    bool configured() const { return settings_.configured; }
    uint64_t block_size() const { return block_size_; }
    uint64_t hash_matches() const { return hash_matches_; }
    uint64_t hash_mismatches() const { return hash_mismatches_; }
    uint64_t engine_hashes_known() const { return engine_keys_.size(); }

    // The index operation of one decoded event; counts what it skips into `skips`.
    // Returns how many hash self-check mismatches the event brought (vllm mode).
    uint64_t translate(const Batch& batch, const Event& event, std::vector<uint64_t>& scratch,
                       IndexOp& op, uint64_t (&skips)[kTranslateSkipCount]);

    // Keys of a query's full blocks (none while the block size is unknown). Safe to call
    // from several readers at once: nothing is remembered.
    void query_keys(const uint32_t* tokens, size_t count, std::optional<std::string_view> lora,
                    std::optional<std::string_view> salt, std::vector<uint64_t>& out) const;
    // Keys of a chain of engine hashes, cut at the first one never seen (tokens mode).
    void keys_of_engine_hashes(const uint64_t* hashes, size_t count,
                               std::vector<uint64_t>& out) const;

   private:
    void stored(const Batch& batch, const Event& event, std::vector<uint64_t>& scratch,
                IndexOp& op, uint64_t (&skips)[kTranslateSkipCount], uint64_t& mismatches);
    void resolve(const Batch& batch, const Event& event, std::vector<uint64_t>& scratch,
                 IndexOp& op, uint64_t (&skips)[kTranslateSkipCount]) const;
    uint64_t check(const Batch& batch, const Event& event);

    std::string name_;
    KeyingSettings settings_;
    uint64_t block_size_ = 0;
    EngineKeyMap engine_keys_;
    std::unique_ptr<VllmHasher> hasher_;
    mutable std::unique_ptr<DigestMemory> digests_;
    uint64_t hash_matches_ = 0;
    uint64_t hash_mismatches_ = 0;
};

}  // namespace kvc
