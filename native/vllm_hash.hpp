// Key mode "vllm": vLLM's own block hash, byte for byte (service/index/keys.py, VllmKeys, is
// the reference; CONTRACT.md section 2 states the engine side).
//
//   digest_i = sha256(serialize((digest_{i-1}, tuple(block_i tokens), extra_keys_i)))
//   digest_{-1} = sha256(serialize(seed))          seed: a Python str (PYTHONHASHSEED)
//   published_i = last 8 bytes of digest_i, big-endian
//
// serialize is pickle.dumps(obj, protocol=5) ("sha256", vLLM's default) or
// cbor2.dumps(obj, canonical=True) ("sha256_cbor"). Both are written here directly, for
// exactly the objects vLLM hashes: a 32-byte bytes, a tuple of ints in [0, 2**32), None or
// a tuple of strs, and a lone str for the root. vllm_hash.cpp says which CPython and cbor2
// behaviours each byte reproduces.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

namespace kvc {

enum class HashAlgorithm : uint8_t { kSha256, kSha256Cbor };  // config: "sha256", "sha256_cbor"

// The configuration name of an algorithm, and back (nullopt for an unknown name).
std::string_view hash_algorithm_name(HashAlgorithm algorithm);
std::optional<HashAlgorithm> parse_hash_algorithm(std::string_view name);

// vLLM's seed when PYTHONHASHSEED is unset (vLLM >= 0.29).
inline constexpr std::string_view kVllmDefaultSeed = "vllm-none-hash";

using Digest = std::array<uint8_t, 32>;

// The published hash of a digest: its last 8 bytes, big-endian.
uint64_t published(const Digest& digest);

// The exact bytes hashed for one block, or for the root, appended to `out`: what
// pickle.dumps / cbor2.dumps return for the same Python objects. For tests and diagnosis;
// VllmHasher serializes into a per-thread buffer instead.
//
// Strings are UTF-8 (pickle's surrogatepass bytes for a str with lone surrogates). pickle
// memoizes by object identity, so a str that occurs twice in one extra tuple as the SAME
// Python object is written once and then referenced (BINGET). Two views with the same data
// pointer and size stand for one object, as do two empty strings (CPython's "" is a
// singleton); the Python binding passes one view for a str given twice. Equal strings at
// different addresses are distinct objects, written twice. CBOR has no such references.
void serialize_root(HashAlgorithm algorithm, std::string_view seed, std::vector<uint8_t>& out);
void serialize_block(HashAlgorithm algorithm, const Digest& parent, const uint32_t* tokens,
                     size_t count, const std::string_view* extra, size_t extra_count,
                     std::vector<uint8_t>& out);

// sha256 of `size` bytes with OpenSSL's EVP interface.
Digest sha256(const uint8_t* data, size_t size);

// Immutable once built, so one hasher may serve any number of threads: the serialization
// buffer and the digest context are per thread, and warm after a thread's first block.
class VllmHasher {
 public:
    VllmHasher(HashAlgorithm algorithm, std::string_view seed);  // root = H(seed)

    HashAlgorithm algorithm() const { return algorithm_; }
    const Digest& root() const { return root_; }

    // H((parent, tuple(tokens[0:count]), extra)); extra is None when extra == nullptr or
    // extra_count == 0, else a tuple of extra_count strs (see serialize_block on repeats).
    Digest block(const Digest& parent, const uint32_t* tokens, size_t count,
                 const std::string_view* extra, size_t extra_count) const;

 private:
    HashAlgorithm algorithm_;
    Digest root_;
};

// Published hash -> 32-byte digest, at most `capacity` entries, exactly as keys.py's
// _DigestMemory behaves: two generations of capacity / 2 entries; when the young one fills
// it becomes the old one and the previous old one is dropped; a hit in the old generation
// is copied to the young one, so digests in use (shared system prompts) survive. size()
// counts both generations, a copied digest twice, as len() does there.
//
// Each generation is an open-addressing table (no deletions ever, only whole-table
// clears), so dropping a generation is a memset, not a free per entry. Not thread-safe.
class DigestMemory {
 public:
    explicit DigestMemory(size_t capacity);  // throws std::invalid_argument below 2

    // The digest remembered for `published`, or nullptr. The pointer stays valid until the
    // next get or put.
    const Digest* get(uint64_t published);
    void put(uint64_t published, const Digest& digest);
    size_t size() const { return young_.size() + old_.size(); }
    size_t capacity() const { return capacity_; }

 private:
    class Table {
     public:
        size_t size() const { return used_; }
        const Digest* find(uint64_t key) const;
        Digest* assign(uint64_t key, const Digest& digest);  // insert or overwrite
        void clear();

     private:
        size_t slot_of(uint64_t key) const;
        void grow();

        std::vector<uint64_t> keys_;
        std::vector<Digest> digests_;
        std::vector<uint8_t> full_;  // 1 where keys_/digests_ hold an entry
        size_t used_ = 0;
    };

    Digest* put_young(uint64_t published, const Digest& digest);

    size_t capacity_;
    size_t generation_;
    Table young_;
    Table old_;
};

enum class HashCheck : uint8_t { kMatch, kMismatch, kUnknownParent };

// VllmKeys.check_published: whether our hashes of `tokens` equal an engine's
// `published_hashes` for one BlockStored. The chain continues from `parent` (nullptr: the
// tokens start a prompt, chained from the root); the LoRA name enters every block's extra
// keys and a non-empty cache_salt the first block's when the chain starts here. Returns
// kUnknownParent, without hashing, when the parent's digest is not remembered; on kMatch
// the digests are remembered so the engine's next event in this chain can be checked.
// Throws std::invalid_argument when block_size is 0 or count != published_count * block_size
// (a malformed event, not a mismatch).
HashCheck check_published(const VllmHasher& hasher, DigestMemory& memory,
                          const uint32_t* tokens, size_t count, size_t block_size,
                          const uint64_t* published_hashes, size_t published_count,
                          const uint64_t* parent, std::optional<std::string_view> lora_name,
                          std::optional<std::string_view> cache_salt);

// VllmKeys.block_keys: replaces `out` with the published hash of every full block of
// `tokens` (a trailing partial block is ignored). Returns false, with `out` empty, when
// `parent`'s digest is not remembered (Python raises UnknownParent). remember=true stores
// the digests so a later call can continue from these keys. Throws std::invalid_argument
// when block_size is 0.
bool vllm_block_keys(const VllmHasher& hasher, DigestMemory& memory, const uint32_t* tokens,
                     size_t count, size_t block_size, const uint64_t* parent,
                     std::optional<std::string_view> lora_name,
                     std::optional<std::string_view> cache_salt, bool remember,
                     std::vector<uint64_t>& out);

}  // namespace kvc
