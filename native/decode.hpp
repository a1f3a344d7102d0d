// vLLM's KV-cache event batches (msgpack), decoded without Python objects. The reference is
// service/events/vllm.py, decode_batch: the same batches are refused for the same reason, the
// same events decoded and the same ones skipped under the same reason (decode.cpp lists the
// few deliberate differences, all on pathological input).
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

namespace kvc {

enum class Tier : uint8_t { kGpu = 0, kCpu = 1, kDisk = 2 };
constexpr int kTierCount = 3;

// vllm.py BATCH_ERROR_REASONS, and kNone.
enum class BatchError : uint8_t { kNone, kMsgpack, kBatchShape };
// vllm.py EVENT_SKIP_REASONS, in its order.
enum class EventSkip : uint8_t {
    kUnknownType,
    kEventShape,
    kBadHash,
    kBadField,
    kUnknownMedium,
    kCount
};
constexpr int kEventSkipCount = static_cast<int>(EventSkip::kCount);

// The reasons as vllm.py spells them ("msgpack", "bad_hash"...); kNone and kCount are "".
std::string_view name(BatchError error);
std::string_view name(EventSkip reason);

enum class EventKind : uint8_t { kStored, kRemoved, kCleared };

// extra_keys of one block, as much as keying needs (service/index/translate.py _is_plain,
// _salt_and_plainness).
struct BlockExtra {
    enum Kind : uint8_t { kNil, kArray } kind;
    uint32_t length;                             // elements of the array
    bool first_is_str;
    std::string_view first;                      // element 0 when it is a str
    bool second_is_str;
    std::string_view second;                     // element 1 when it is a str
    std::string_view bytes;                      // the whole entry, as msgpack
};

// One decoded event. Strings are views into the payload, valid UTF-8.
struct Event {
    EventKind kind;
    Tier tier;                                   // kGpu for kCleared
    bool has_parent;
    uint64_t parent;                             // BlockStored.parent_block_hash (normalised)
    uint64_t block_size;                         // 0 when absent
    uint32_t hashes_begin, hashes_count;         // into Batch::hashes (normalised to uint64)
    uint32_t tokens_begin, tokens_count;         // into Batch::tokens; 0 tokens when nil/absent
    bool has_lora_name;
    std::string_view lora_name;
    // msgspec's int is [-2**63, 2**64): a lora_id >= 2**63 is kept as its bits, with
    // lora_id_unsigned set (static_cast<uint64_t>(lora_id) is then the value).
    bool has_lora_id;
    bool lora_id_unsigned;
    int64_t lora_id;
    bool has_extra_keys;
    uint32_t extras_begin;                       // hashes_count entries into Batch::extras
};

struct Batch {
    BatchError error;
    double ts;
    bool has_rank;
    uint64_t rank;                               // data_parallel_rank
    std::vector<Event> events;                   // only the events that decoded
    std::vector<uint64_t> hashes;
    std::vector<uint32_t> tokens;
    std::vector<BlockExtra> extras;
    uint32_t skipped[kEventSkipCount];           // events skipped, by reason
};

// Decodes one payload; views point into `payload`, which must outlive `out`. Reuses out's
// storage (clear, keep capacity: no allocation per call once warm). Returns false (out.error
// set) when the payload is not a batch. Never throws (but std::bad_alloc when memory runs
// out: the arrays grow in proportion to the payload), never reads out of bounds, whatever
// the bytes.
bool decode_batch(std::string_view payload, Batch& out);

}  // namespace kvc
