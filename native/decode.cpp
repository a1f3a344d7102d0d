// vLLM event batches, decoded as service/events/vllm.py decode_batch does (the reference).
//
// How the reference decides, which this file mirrors in one pass over the bytes:
//
// - The batch: its shape is checked (vllm.py _ArrayBatch / _MapBatch, each event left raw).
//   Bytes that are not one well-formed msgpack value are "msgpack". A shape error is
//   "batch_shape" if msgspec's untyped decoder would accept the whole payload (see strict()
//   below), else "msgpack".
// - Each event: "typed" is whether vllm.py's typed Structs accept it alone (_TYPED_EVENT);
//   unknown fields and trailing array elements are then skipped unread. If they do, the event
//   is judged on its fields (tokens, lengths, medium). If not, it is decoded untyped
//   (_ANY) and judged by _event_from_object; an event the untyped decoder refuses too is
//   "event_shape". Both judge the same fields by the same rules (the untyped one also accepts
//   a map with non-str keys), so one verdict is computed from the fields' last occurrences,
//   and the untyped check runs only for an event the typed decode would refuse.
//
// Deliberate differences from the reference, all on input no vLLM sends (the equality tests
// in tests/unit/native/test_decode.py leave exactly these out):
//
// 1. Nesting. msgspec recurses per container and stops at Python's recursion limit, which
//    depends on the caller's stack (about 1000 levels minus the Python frames in use): a
//    payload nested deeper is "msgpack" (a RecursionError, at any place in the payload). Here
//    a payload with more than msgpack::kMaxDepth (1000) containers open at once is
//    "msgpack", whoever calls. The two differ only for payloads between the two limits.
// 2. Size. A payload over 4 GiB - 1 is "msgpack": Event indexes Batch's arrays with uint32.
#include "decode.hpp"

#include <cstring>
#include <limits>

#include "msgpack_reader.hpp"

namespace kvc {

namespace {

using msgpack::kMaxDepth;
using msgpack::Reader;
using msgpack::Type;
using msgpack::Value;

// How many nested containers a value may open, by where it is (the batch is level 1, its
// items 2, an event 3, an event's field 4, a field's element 5): nothing nests past
// kMaxDepth.
constexpr uint32_t kBatchItemDepth = kMaxDepth - 1;
constexpr uint32_t kEventDepth = kMaxDepth - 2;
constexpr uint32_t kFieldDepth = kMaxDepth - 3;
constexpr uint32_t kElementDepth = kMaxDepth - 4;

// An event that decoded, beside the EventSkip reasons.
constexpr EventSkip kDecoded = EventSkip::kCount;

uint64_t load_be64(const char* p) {
    uint64_t value;
    std::memcpy(&value, p, sizeof value);
    return __builtin_bswap64(value);
}

uint32_t load_be32(const char* p) {
    uint32_t value;
    std::memcpy(&value, p, sizeof value);
    return __builtin_bswap32(value);
}

// What Python's strict UTF-8 decoder accepts: no overlong forms, no surrogates, nothing
// past U+10FFFF, nothing cut short.
bool valid_utf8(std::string_view text) {
    const auto* p = reinterpret_cast<const uint8_t*>(text.data());
    const auto* end = p + text.size();
    while (p < end) {
        if (end - p >= 8) {
            uint64_t word;
            std::memcpy(&word, p, sizeof word);
            if ((word & 0x8080808080808080ull) == 0) {
                p += 8;
                continue;
            }
        }
        const uint8_t lead = *p;
        if (lead < 0x80) {
            p++;
            continue;
        }
        int follow;
        uint8_t low = 0x80, high = 0xbf;  // the range of the first continuation byte
        if (lead >= 0xc2 && lead <= 0xdf) {
            follow = 1;
        } else if (lead == 0xe0) {
            follow = 2, low = 0xa0;
        } else if (lead == 0xed) {
            follow = 2, high = 0x9f;  // U+D800..U+DFFF are surrogates
        } else if (lead >= 0xe1 && lead <= 0xef) {
            follow = 2;
        } else if (lead == 0xf0) {
            follow = 3, low = 0x90;
        } else if (lead >= 0xf1 && lead <= 0xf3) {
            follow = 3;
        } else if (lead == 0xf4) {
            follow = 3, high = 0x8f;
        } else {
            return false;
        }
        if (end - p <= follow || p[1] < low || p[1] > high) {
            return false;
        }
        for (int i = 2; i <= follow; i++) {
            if ((p[i] & 0xc0) != 0x80) {
                return false;
            }
        }
        p += follow + 1;
    }
    return true;
}

// Whether msgspec turns an ext -1 payload into a datetime: 4, 8 or 12 bytes, nanoseconds
// under 10**9, and the instant, rounded to the microsecond, within years 1 to 9999.
bool valid_timestamp(std::string_view data) {
    constexpr int64_t kFirst = -62135596800;  // 0001-01-01T00:00:00Z
    constexpr int64_t kLast = 253402300799;   // 9999-12-31T23:59:59Z
    switch (data.size()) {
        case 4:
            return true;
        case 8:  // 30 bits of nanoseconds, 34 of seconds: always in range
            return (load_be64(data.data()) >> 34) <= 999999999;
        case 12: {
            const uint32_t nanoseconds = load_be32(data.data());
            const auto seconds = static_cast<int64_t>(load_be64(data.data() + 4));
            if (nanoseconds > 999999999 || seconds < kFirst || seconds > kLast) {
                return false;
            }
            return seconds < kLast || nanoseconds < 999999500;  // rounds up into year 10000
        }
        default:
            return false;
    }
}

enum class Check : uint8_t { kMalformed, kLoose, kStrict };

// Walks one value the way msgspec's untyped decoder (vllm.py _ANY) would decode it. kStrict:
// it would. kLoose: it would refuse this well-formed value, for a str that is not UTF-8, an
// invalid timestamp (ext -1), or a map key Python cannot hash (a map, an ext that is not a
// timestamp, or an array holding either). kMalformed: broken bytes, or nested deeper than
// `depth_left` containers. Ends after the value unless kMalformed.
Check strict(Reader& r, uint32_t depth_left) {
    struct Level {
        uint64_t pending;  // values still to read in this container
        bool map;
    };
    Level levels[kMaxDepth];
    if (depth_left > kMaxDepth) {
        depth_left = kMaxDepth;
    }
    uint32_t open = 0;
    uint32_t key_level = 0;  // when > 0: levels from this one up are inside a map key
    bool is_key = false;     // the next value is a map key
    bool loose = false;
    for (;;) {
        Value v;
        if (!r.read(v)) {
            return Check::kMalformed;
        }
        const bool in_key = is_key || key_level > 0;
        if (v.type == Type::kStr) {
            loose |= !valid_utf8(v.bytes);
        } else if (v.type == Type::kExt) {
            loose |= v.ext_type == -1 ? !valid_timestamp(v.bytes) : in_key;
        } else if (v.type == Type::kMap) {
            loose |= in_key;
        }
        if (v.is_container()) {
            if (open + 1 > depth_left) {
                return Check::kMalformed;
            }
            if (v.children() > 0) {
                levels[open++] = {v.children(), v.type == Type::kMap};
                if (is_key && key_level == 0) {
                    key_level = open;
                }
            }
        }
        while (open > 0 && levels[open - 1].pending == 0) {
            if (--open < key_level) {
                key_level = 0;
            }
        }
        if (open == 0) {
            return loose ? Check::kLoose : Check::kStrict;
        }
        Level& top = levels[open - 1];
        is_key = top.map && top.pending % 2 == 0;  // a map's values alternate key, value
        top.pending--;
    }
}

// Python's medium.upper() in ("GPU", "CPU", "DISK", "STORAGE"), for valid UTF-8. Besides
// ASCII letters, only four characters uppercase to letters of those words: U+0131 (dotless
// i) to I, U+017F (long s) to S, U+FB05 and U+FB06 (st ligatures) to ST.
bool tier_of(std::string_view medium, Tier& tier) {
    if (medium == "GPU") {  // what vLLM sends
        tier = Tier::kGpu;
        return true;
    }
    char upper[8];
    size_t n = 0;
    auto put = [&](char c) {
        if (n == sizeof upper) {
            return false;  // longer than any name
        }
        upper[n++] = c;
        return true;
    };
    for (size_t i = 0; i < medium.size();) {
        const std::string_view rest = medium.substr(i);
        const char c = rest[0];
        bool fits;
        if (static_cast<unsigned char>(c) < 0x80) {
            fits = put(c >= 'a' && c <= 'z' ? static_cast<char>(c - 'a' + 'A') : c);
            i += 1;
        } else if (rest.substr(0, 2) == "\xc4\xb1") {
            fits = put('I');
            i += 2;
        } else if (rest.substr(0, 2) == "\xc5\xbf") {
            fits = put('S');
            i += 2;
        } else if (rest.substr(0, 3) == "\xef\xac\x85" || rest.substr(0, 3) == "\xef\xac\x86") {
            fits = put('S') && put('T');
            i += 3;
        } else {
            return false;
        }
        if (!fits) {
            return false;
        }
    }
    const std::string_view name(upper, n);
    if (name == "GPU") {
        tier = Tier::kGpu;
    } else if (name == "CPU") {
        tier = Tier::kCpu;
    } else if (name == "DISK" || name == "STORAGE") {
        tier = Tier::kDisk;
    } else {
        return false;
    }
    return true;
}

// A block hash: an int of 64 bits (a negative one as two's complement) or bytes, whose
// last 8 are the hash, big-endian; fewer than 8 bytes are no hash.
bool hash_of(const Value& v, uint64_t& hash) {
    if (v.type == Type::kUint) {
        hash = v.uint;
    } else if (v.type == Type::kInt) {
        hash = static_cast<uint64_t>(v.sint);
    } else if (v.type == Type::kBin && v.bytes.size() >= 8) {
        hash = load_be64(v.bytes.data() + v.bytes.size() - 8);
    } else {
        return false;
    }
    return true;
}

bool number_of(const Value& v, double& number) {
    if (v.type == Type::kFloat) {
        number = v.real;
    } else if (v.type == Type::kUint) {
        number = static_cast<double>(v.uint);
    } else if (v.type == Type::kInt) {
        number = static_cast<double>(v.sint);
    } else {
        return false;
    }
    return true;
}

enum class Tag : uint8_t { kNotStr, kUnknown, kStored, kRemoved, kCleared };

Tag tag_of(const Value& v) {
    if (v.type != Type::kStr) {
        return Tag::kNotStr;
    }
    if (v.bytes == "BlockStored") {
        return Tag::kStored;
    }
    if (v.bytes == "BlockRemoved") {
        return Tag::kRemoved;
    }
    if (v.bytes == "AllBlocksCleared") {
        return Tag::kCleared;
    }
    return Tag::kUnknown;
}

enum Field : uint8_t {
    kBlockHashes,
    kParentBlockHash,
    kTokenIds,
    kBlockSize,
    kLoraId,
    kMedium,
    kLoraName,
    kExtraKeys,
    kFieldCount
};

constexpr std::string_view kFieldNames[kFieldCount] = {
    "block_hashes", "parent_block_hash", "token_ids", "block_size",
    "lora_id",      "medium",            "lora_name", "extra_keys",
};

bool field_of(std::string_view name, Field& field) {
    for (int f = 0; f < kFieldCount; f++) {
        if (name == kFieldNames[f]) {
            field = static_cast<Field>(f);
            return true;
        }
    }
    return false;
}

// Each tag's fields in array order, how many an array event must carry (vllm.py _LAYOUTS),
// and which ones the typed Struct checks.
struct Layout {
    uint8_t count;
    uint8_t required;
    Field fields[kFieldCount];
};

constexpr Layout kStoredLayout = {
    8,
    4,
    {kBlockHashes, kParentBlockHash, kTokenIds, kBlockSize, kLoraId, kMedium, kLoraName,
     kExtraKeys}};
constexpr Layout kRemovedLayout = {2, 1, {kBlockHashes, kMedium}};
constexpr Layout kClearedLayout = {0, 0, {}};

const Layout& layout_of(Tag tag) {
    return tag == Tag::kStored ? kStoredLayout
                               : tag == Tag::kRemoved ? kRemovedLayout : kClearedLayout;
}

// One field of the event being decoded, over all its occurrences (a map may repeat a key).
struct FieldState {
    bool present = false;
    bool ok = true;        // the last occurrence is valid (absent is, but for block_hashes)
    bool typed_ok = true;  // every occurrence passes the typed Struct's check
};

// The event being decoded: its fields' last values. Each of Batch's arrays is written by
// one field only, from the index it had when the event began.
struct EventState {
    FieldState fields[kFieldCount];
    uint32_t hashes_begin, tokens_begin, extras_begin;
    bool has_parent = false;
    uint64_t parent = 0;
    uint64_t block_size = 0;
    bool has_lora_id = false, lora_id_unsigned = false;
    int64_t lora_id = 0;
    bool has_medium = false;
    std::string_view medium;
    Tier tier = Tier::kGpu;  // the medium's, once judged
    bool has_lora_name = false;
    std::string_view lora_name;
    bool has_extra_keys = false;
};

class Decoder {
   public:
    Decoder(std::string_view payload, Batch& out) : payload_(payload), r_(payload), out_(out) {}

    BatchError run() {
        Value top;
        if (!r_.read(top)) {
            return BatchError::kMsgpack;
        }
        BatchError error;
        if (top.type == Type::kMap) {
            error = map_batch(top);
        } else if (top.type == Type::kArray) {
            error = array_batch(top);
        } else {
            return shape_error();
        }
        if (error == BatchError::kNone && !r_.at_end()) {
            return BatchError::kMsgpack;  // trailing bytes
        }
        return error;
    }

   private:
    // [ts, events, data_parallel_rank, ...ignored].
    BatchError array_batch(const Value& top) {
        if (top.count < 2) {
            return shape_error();
        }
        Value v;
        if (!r_.read(v)) {
            return BatchError::kMsgpack;
        }
        if (!number_of(v, out_.ts)) {
            return shape_error();
        }
        BatchError error = events();
        if (error != BatchError::kNone) {
            return error;
        }
        if (top.count >= 3) {
            if (!r_.read(v)) {
                return BatchError::kMsgpack;
            }
            if (!rank_of(v)) {
                return shape_error();
            }
        }
        for (uint32_t i = 3; i < top.count; i++) {
            if (!r_.skip(kBatchItemDepth)) {
                return BatchError::kMsgpack;
            }
        }
        return BatchError::kNone;
    }

    // {ts, events, data_parallel_rank, ...ignored}: str keys only; a repeated key must be
    // valid each time and the last one counts.
    BatchError map_batch(const Value& top) {
        bool has_ts = false, has_events = false;
        for (uint32_t i = 0; i < top.count; i++) {
            Value key, v;
            if (!r_.read(key)) {
                return BatchError::kMsgpack;
            }
            if (key.type != Type::kStr) {
                return shape_error();
            }
            if (key.bytes == "ts") {
                if (!r_.read(v)) {
                    return BatchError::kMsgpack;
                }
                if (!number_of(v, out_.ts)) {
                    return shape_error();
                }
                has_ts = true;
            } else if (key.bytes == "events") {
                BatchError error = events();
                if (error != BatchError::kNone) {
                    return error;
                }
                has_events = true;
            } else if (key.bytes == "data_parallel_rank") {
                if (!r_.read(v)) {
                    return BatchError::kMsgpack;
                }
                if (!rank_of(v)) {
                    return shape_error();
                }
            } else if (!r_.skip(kBatchItemDepth)) {
                return BatchError::kMsgpack;
            }
        }
        return has_ts && has_events ? BatchError::kNone : shape_error();
    }

    bool rank_of(const Value& v) {
        if (v.type == Type::kNil) {
            out_.has_rank = false;
        } else if (v.type == Type::kUint) {
            out_.has_rank = true;
            out_.rank = v.uint;
        } else {
            return false;
        }
        return true;
    }

    // A shape error is "batch_shape" only for a payload msgspec can decode untyped.
    BatchError shape_error() const {
        Reader whole(payload_);
        return strict(whole, kMaxDepth) == Check::kStrict && whole.at_end()
                   ? BatchError::kBatchShape
                   : BatchError::kMsgpack;
    }

    BatchError events() {
        Value v;
        if (!r_.read(v)) {
            return BatchError::kMsgpack;
        }
        if (v.type != Type::kArray) {
            return shape_error();
        }
        // A map batch may repeat "events": the last one counts.
        out_.events.clear();
        out_.hashes.clear();
        out_.tokens.clear();
        out_.extras.clear();
        std::memset(out_.skipped, 0, sizeof out_.skipped);
        for (uint32_t i = 0; i < v.count; i++) {
            if (!event()) {
                return BatchError::kMsgpack;
            }
        }
        return BatchError::kNone;
    }

    // Decodes or skips one event; false when its bytes are malformed.
    bool event() {
        const char* start = r_.position();
        EventState s;
        s.hashes_begin = static_cast<uint32_t>(out_.hashes.size());
        s.tokens_begin = static_cast<uint32_t>(out_.tokens.size());
        s.extras_begin = static_cast<uint32_t>(out_.extras.size());
        Value head;
        if (!r_.read(head)) {
            return false;
        }
        EventSkip verdict = EventSkip::kEventShape;  // what any other value is
        Tag tag = Tag::kNotStr;
        bool typed = false;
        if (head.type == Type::kArray && !array_event(head, s, tag, verdict, typed)) {
            return false;
        }
        if (head.type == Type::kMap && !map_event(head, s, tag, verdict, typed)) {
            return false;
        }
        if (!typed && verdict != EventSkip::kEventShape) {
            // Only the untyped decoder would take it: it must accept every byte.
            const char* end = r_.position();
            r_.rewind(start);
            if (strict(r_, kEventDepth) != Check::kStrict) {
                verdict = EventSkip::kEventShape;
            }
            r_.rewind(end);
        }
        finish(s, tag, verdict);
        return true;
    }

    // ["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id,
    // medium, lora_name, extra_keys, ...ignored] and the like (vLLM <= 0.23).
    bool array_event(const Value& head, EventState& s, Tag& tag, EventSkip& verdict,
                     bool& typed) {
        uint32_t left = head.count;
        if (left > 0) {
            Value v;
            if (!r_.read(v) || !r_.skip_children(v, kFieldDepth)) {
                return false;
            }
            left--;
            tag = tag_of(v);
        }
        const Layout& layout = layout_of(tag);
        if (tag == Tag::kNotStr || tag == Tag::kUnknown || left < layout.required) {
            verdict = tag == Tag::kUnknown ? EventSkip::kUnknownType : EventSkip::kEventShape;
            return skip_values(left, kFieldDepth);
        }
        const uint32_t present = left < layout.count ? left : layout.count;
        for (uint32_t i = 0; i < present; i++) {
            if (!field(layout.fields[i], s)) {
                return false;
            }
        }
        typed = typed_ok(layout, s);
        verdict = judge(tag, s);
        return skip_values(left - present, kFieldDepth);
    }

    // {"type": "BlockStored", "block_hashes": ..., ...} (vLLM >= 0.24): fields in any order,
    // with defaults when absent, unknown ones ignored.
    bool map_event(const Value& head, EventState& s, Tag& tag, EventSkip& verdict,
                   bool& typed) {
        bool str_keys = true;  // the typed Struct reads str keys only
        bool one_type = true;  // every "type" is the same str, as the typed Struct needs
        bool has_type = false;
        std::string_view type;  // the first one
        for (uint32_t i = 0; i < head.count; i++) {
            Value key;
            if (!r_.read(key)) {
                return false;
            }
            Field f;
            if (key.type != Type::kStr) {
                str_keys = false;
                if (!r_.skip_children(key, kFieldDepth) || !r_.skip(kFieldDepth)) {
                    return false;
                }
            } else if (key.bytes == "type") {
                // The untyped dict keeps the last "type".
                Value v;
                if (!r_.read(v) || !r_.skip_children(v, kFieldDepth)) {
                    return false;
                }
                tag = tag_of(v);
                if (tag == Tag::kNotStr) {
                    one_type = false;
                } else if (!has_type) {
                    has_type = true;
                    type = v.bytes;
                } else {
                    one_type = one_type && v.bytes == type;
                }
            } else if (field_of(key.bytes, f)) {
                if (!field(f, s)) {
                    return false;
                }
            } else if (!r_.skip(kFieldDepth)) {
                return false;
            }
        }
        if (tag == Tag::kNotStr || tag == Tag::kUnknown) {
            verdict = tag == Tag::kUnknown ? EventSkip::kUnknownType : EventSkip::kEventShape;
            return true;
        }
        const Layout& layout = layout_of(tag);
        const bool complete = layout.count == 0 || s.fields[kBlockHashes].present;
        typed = str_keys && one_type && complete && typed_ok(layout, s);
        verdict = complete ? judge(tag, s) : EventSkip::kEventShape;
        return true;
    }

    static bool typed_ok(const Layout& layout, const EventState& s) {
        for (uint32_t i = 0; i < layout.count; i++) {
            if (!s.fields[layout.fields[i]].typed_ok) {
                return false;
            }
        }
        return true;
    }

    // _event_from_object then _stored: the first bad field in array order names the reason
    // (the two hash fields come first), then the checks across fields, then the medium.
    EventSkip judge(Tag tag, EventState& s) const {
        const Layout& layout = layout_of(tag);
        for (uint32_t i = 0; i < layout.count; i++) {
            const Field f = layout.fields[i];
            if (!s.fields[f].ok) {
                return f == kBlockHashes || f == kParentBlockHash ? EventSkip::kBadHash
                                                                  : EventSkip::kBadField;
            }
        }
        if (tag == Tag::kStored) {
            const uint64_t hashes = out_.hashes.size() - s.hashes_begin;
            const uint64_t tokens = out_.tokens.size() - s.tokens_begin;
            // Both factors are below 2**64: their product fits in 128 bits.
            if (tokens != 0 &&
                tokens != static_cast<unsigned __int128>(hashes) * s.block_size) {
                return EventSkip::kBadField;
            }
            if (s.has_extra_keys && out_.extras.size() - s.extras_begin != hashes) {
                return EventSkip::kBadField;
            }
        }
        if (tag != Tag::kCleared && s.has_medium && !tier_of(s.medium, s.tier)) {
            return EventSkip::kUnknownMedium;
        }
        return kDecoded;
    }

    void finish(const EventState& s, Tag tag, EventSkip verdict) {
        Event e{};
        e.kind = tag == Tag::kStored    ? EventKind::kStored
                 : tag == Tag::kRemoved ? EventKind::kRemoved
                                        : EventKind::kCleared;
        e.tier = s.tier;
        e.hashes_begin = s.hashes_begin;
        e.tokens_begin = s.tokens_begin;
        e.extras_begin = s.extras_begin;
        // Keep what the event's kind has; a map event may carry fields of another kind.
        const bool stored = verdict == kDecoded && tag == Tag::kStored;
        const bool with_hashes = verdict == kDecoded && tag != Tag::kCleared;
        out_.hashes.resize(with_hashes ? out_.hashes.size() : s.hashes_begin);
        out_.tokens.resize(stored ? out_.tokens.size() : s.tokens_begin);
        out_.extras.resize(stored ? out_.extras.size() : s.extras_begin);
        if (verdict != kDecoded) {
            out_.skipped[static_cast<int>(verdict)]++;
            return;
        }
        e.hashes_count = static_cast<uint32_t>(out_.hashes.size() - s.hashes_begin);
        if (stored) {
            e.has_parent = s.has_parent;
            e.parent = s.parent;
            e.block_size = s.block_size;
            e.tokens_count = static_cast<uint32_t>(out_.tokens.size() - s.tokens_begin);
            e.has_lora_name = s.has_lora_name;
            e.lora_name = s.lora_name;
            e.has_lora_id = s.has_lora_id;
            e.lora_id_unsigned = s.lora_id_unsigned;
            e.lora_id = s.lora_id;
            e.has_extra_keys = s.has_extra_keys;
        }
        out_.events.push_back(e);
    }

    bool skip_values(uint64_t n, uint32_t depth_left) {
        for (uint64_t i = 0; i < n; i++) {
            if (!r_.skip(depth_left)) {
                return false;
            }
        }
        return true;
    }

    // Reads one occurrence of `f` into `s`; false when the bytes are malformed.
    bool field(Field f, EventState& s) {
        Value v;
        if (!r_.read(v)) {
            return false;
        }
        const bool is_nil = v.type == Type::kNil;
        const bool is_array = v.type == Type::kArray;
        bool ok = true, typed = true;  // this occurrence
        bool read = true;              // its elements, when the readers below take them
        bool consumed = false;         // they did
        switch (f) {
            case kBlockHashes:
                out_.hashes.resize(s.hashes_begin);
                ok = is_array;
                if (is_array) {
                    read = hashes(v.count, ok);
                    consumed = true;
                }
                typed = ok;
                break;
            case kParentBlockHash:
                s.has_parent = !is_nil;
                ok = typed = is_nil || hash_of(v, s.parent);
                break;
            case kTokenIds:  // the typed Struct keeps them raw: only the verdict checks them
                out_.tokens.resize(s.tokens_begin);
                ok = is_nil || is_array;
                if (is_array) {
                    read = tokens(v.count, ok);
                    consumed = true;
                }
                break;
            case kBlockSize:
                ok = typed = v.type == Type::kUint;
                s.block_size = ok ? v.uint : 0;
                break;
            case kLoraId:
                s.has_lora_id = v.type == Type::kUint || v.type == Type::kInt;
                s.lora_id_unsigned = v.type == Type::kUint && v.uint > INT64_MAX;
                s.lora_id = v.type == Type::kUint  ? static_cast<int64_t>(v.uint)
                            : v.type == Type::kInt ? v.sint
                                                   : 0;
                ok = typed = is_nil || s.has_lora_id;
                break;
            case kMedium:
            case kLoraName: {
                const bool is_str = v.type == Type::kStr;
                (f == kMedium ? s.has_medium : s.has_lora_name) = is_str;
                (f == kMedium ? s.medium : s.lora_name) = is_str ? v.bytes : std::string_view();
                ok = is_nil || is_str;
                typed = is_nil || (is_str && valid_utf8(v.bytes));
                break;
            }
            case kExtraKeys:
                out_.extras.resize(s.extras_begin);
                s.has_extra_keys = is_array;
                ok = typed = is_nil || is_array;
                if (is_array) {
                    read = extra_keys(v.count, ok, typed);
                    consumed = true;
                }
                break;
            case kFieldCount:
                break;
        }
        FieldState& state = s.fields[f];
        state.present = true;
        state.ok = ok;
        state.typed_ok = state.typed_ok && typed;
        return read && (consumed || r_.skip_children(v, kFieldDepth));
    }

    // The elements of block_hashes; ok = all are hashes.
    bool hashes(uint32_t count, bool& ok) {
        return elements(out_.hashes, count, ok, [](const Value& e, uint64_t& hash) {
            return hash_of(e, hash);
        });
    }

    // The elements of token_ids; ok = all are ints in [0, 2**32).
    bool tokens(uint32_t count, bool& ok) {
        return elements(out_.tokens, count, ok, [](const Value& e, uint32_t& token) {
            token = static_cast<uint32_t>(e.uint);
            return e.type == Type::kUint && e.uint <= UINT32_MAX;
        });
    }

    // Appends `count` elements to `into`, each an int >= 0 that fits T, or what `convert`
    // takes; on the first it does not, ok = false and the rest is skipped. The hot loop of
    // the decoder: the array is sized once, and most elements take Reader::read_uint only.
    template <typename T, typename Convert>
    bool elements(std::vector<T>& into, uint32_t count, bool& ok, Convert convert) {
        const size_t begin = into.size();
        into.resize(begin + count);  // count <= the bytes left: no more than the payload's size
        T* out = into.data() + begin;
        for (uint32_t i = 0; i < count; i++) {
            uint64_t fast;
            Value e;
            bool good;
            if (r_.read_uint(fast)) {
                e.type = Type::kUint;  // nothing to skip if it is no good
                good = fast <= std::numeric_limits<T>::max();
                out[i] = static_cast<T>(fast);
            } else if (r_.read(e)) {
                good = convert(e, out[i]);
            } else {
                return false;
            }
            if (!good) {
                ok = false;
                into.resize(begin + i);
                return r_.skip_children(e, kElementDepth) &&
                       skip_values(count - i - 1, kElementDepth);
            }
        }
        return true;
    }

    // The entries of extra_keys: ok = each is nil or an array; typed = each array's elements
    // decode untyped too (the Struct reads them as Any).
    bool extra_keys(uint32_t count, bool& ok, bool& typed) {
        for (uint32_t i = 0; i < count; i++) {
            const char* start = r_.position();
            Value e;
            if (!r_.read(e)) {
                return false;
            }
            BlockExtra extra{};
            if (e.type == Type::kArray) {
                r_.rewind(start);
                const Check check = strict(r_, kElementDepth);
                if (check == Check::kMalformed) {
                    return false;
                }
                typed = typed && check == Check::kStrict;
                extra.kind = BlockExtra::kArray;
                extra.length = e.count;
            } else if (e.type == Type::kNil) {
                extra.kind = BlockExtra::kNil;
            } else {
                ok = typed = false;
                return r_.skip_children(e, kElementDepth) &&
                       skip_values(count - i - 1, kElementDepth);
            }
            extra.bytes = std::string_view(start, static_cast<size_t>(r_.position() - start));
            first_strs(extra);
            out_.extras.push_back(extra);
        }
        return true;
    }

    // An extra_keys entry's first two elements, when they are strs (a LoRA name, a salt).
    static void first_strs(BlockExtra& extra) {
        Reader entry(extra.bytes);  // well-formed: strict() has walked it
        Value v;
        if (!entry.read(v) || v.type != Type::kArray) {
            return;
        }
        for (uint32_t i = 0; i < v.count && i < 2; i++) {
            Value element;
            if (!entry.read(element)) {
                return;
            }
            if (element.type == Type::kStr) {
                (i == 0 ? extra.first_is_str : extra.second_is_str) = true;
                (i == 0 ? extra.first : extra.second) = element.bytes;
            } else if (!entry.skip_children(element, kMaxDepth)) {
                return;
            }
        }
    }

    std::string_view payload_;
    Reader r_;
    Batch& out_;
};

void reset(Batch& out) {
    out.error = BatchError::kNone;
    out.ts = 0;
    out.has_rank = false;
    out.rank = 0;
    out.events.clear();
    out.hashes.clear();
    out.tokens.clear();
    out.extras.clear();
    std::memset(out.skipped, 0, sizeof out.skipped);
}

}  // namespace

std::string_view name(BatchError error) {
    switch (error) {
        case BatchError::kMsgpack:
            return "msgpack";
        case BatchError::kBatchShape:
            return "batch_shape";
        case BatchError::kNone:
            break;
    }
    return "";
}

std::string_view name(EventSkip reason) {
    switch (reason) {
        case EventSkip::kUnknownType:
            return "unknown_type";
        case EventSkip::kEventShape:
            return "event_shape";
        case EventSkip::kBadHash:
            return "bad_hash";
        case EventSkip::kBadField:
            return "bad_field";
        case EventSkip::kUnknownMedium:
            return "unknown_medium";
        case EventSkip::kCount:
            break;
    }
    return "";
}

bool decode_batch(std::string_view payload, Batch& out) {
    reset(out);
    BatchError error = BatchError::kMsgpack;
    if (payload.size() <= UINT32_MAX) {
        error = Decoder(payload, out).run();
    }
    if (error != BatchError::kNone) {
        reset(out);
        out.error = error;
        return false;
    }
    return true;
}

}  // namespace kvc
