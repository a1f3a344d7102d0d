// A bounds-checked cursor over msgpack bytes (the format: github.com/msgpack/msgpack,
// spec.md). It reads one header at a time and skips whole values without recursion, so no
// input can overflow the stack, read past the end or loop long: a length or count larger
// than the bytes left is an error as soon as its header is read (every element takes at
// least one byte), and skipping follows at most kMaxDepth nested containers.
//
// It never allocates; string views it hands out point into the bytes it was given.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>
#include <type_traits>

namespace kvc::msgpack {

// Containers open at once that skip() follows (the one being read counts); deeper input is
// refused like malformed input. Bounds the skip stack (8 bytes a level).
constexpr uint32_t kMaxDepth = 1000;

enum class Type : uint8_t { kNil, kBool, kUint, kInt, kFloat, kStr, kBin, kExt, kArray, kMap };

// One value's header, and the value itself unless it is an array or a map. An int is kUint
// when >= 0 and kInt when < 0, whatever width or signedness it was encoded with.
struct Value {
    Type type;
    bool boolean;            // kBool
    int8_t ext_type;         // kExt
    uint32_t count;          // kArray: elements, kMap: pairs (they follow the header)
    uint64_t uint;           // kUint
    int64_t sint;            // kInt
    double real;             // kFloat (a float32 widened, which is exact)
    std::string_view bytes;  // kStr, kBin, kExt: the payload, already consumed

    bool is_container() const { return type == Type::kArray || type == Type::kMap; }
    // Values that follow the header: a map's keys and values both count.
    uint64_t children() const {
        return type == Type::kArray ? count : type == Type::kMap ? uint64_t{count} * 2 : 0;
    }
};

class Reader {
   public:
    explicit Reader(std::string_view bytes)
        : pos_(reinterpret_cast<const uint8_t*>(bytes.data())), end_(pos_ + bytes.size()) {}

    bool at_end() const { return pos_ == end_; }
    const char* position() const { return reinterpret_cast<const char*>(pos_); }
    // Back to an earlier position() of this reader.
    void rewind(const char* position) { pos_ = reinterpret_cast<const uint8_t*>(position); }

    // Reads the next header (and the value, but for arrays and maps, whose elements follow).
    // False when the bytes are malformed or end too soon; the position is then unspecified.
    bool read(Value& v);

    // The next value when it is an int >= 0 in an unsigned encoding: the common case of
    // token ids and hashes, read without read()'s dispatch. False, and nothing read, for any
    // other value (read() then tells what it is) or too few bytes.
    bool read_uint(uint64_t& value) {
        if (pos_ == end_) {
            return false;
        }
        const uint8_t op = *pos_;
        if (op <= 0x7f) {
            value = op;
            pos_++;
            return true;
        }
        if (op < 0xcc || op > 0xcf) {
            return false;
        }
        const unsigned size = 1u << (op - 0xcc);  // 0xcc: uint8 ... 0xcf: uint64
        if (left() <= size) {
            return false;
        }
        uint64_t bits = 0;
        if (left() > 8) {
            // One load whatever the width (mixed widths would defeat branch prediction).
            std::memcpy(&bits, pos_ + 1, 8);
            bits = __builtin_bswap64(bits) >> (64 - 8 * size);
        } else {
            for (unsigned i = 1; i <= size; i++) {
                bits = bits << 8 | pos_[i];
            }
        }
        pos_ += 1 + size;
        value = bits;
        return true;
    }

    // After read() gave `v`: skips its elements (nothing for a value that is not a container).
    // `depth_left` is how many nested containers may still open, `v` included.
    bool skip_children(const Value& v, uint32_t depth_left);

    // Skips one whole value, opening at most `depth_left` nested containers.
    bool skip(uint32_t depth_left) {
        Value v;
        return read(v) && skip_children(v, depth_left);
    }

   private:
    size_t left() const { return static_cast<size_t>(end_ - pos_); }

    template <typename T>
    T load() {  // big-endian, the caller has checked the bytes are there
        T value;
        std::memcpy(&value, pos_, sizeof value);
        pos_ += sizeof value;
        if constexpr (sizeof value == 2) {
            return static_cast<T>(__builtin_bswap16(static_cast<uint16_t>(value)));
        } else if constexpr (sizeof value == 4) {
            return static_cast<T>(__builtin_bswap32(static_cast<uint32_t>(value)));
        } else if constexpr (sizeof value == 8) {
            return static_cast<T>(__builtin_bswap64(static_cast<uint64_t>(value)));
        } else {
            return value;
        }
    }

    template <typename T>
    bool length(uint32_t& n) {
        if (left() < sizeof(T)) {
            return false;
        }
        n = load<T>();
        return true;
    }

    bool data(Value& v, Type type, uint32_t size) {
        if (size > left()) {
            return false;
        }
        v.type = type;
        v.bytes = std::string_view(reinterpret_cast<const char*>(pos_), size);
        pos_ += size;
        return true;
    }

    bool ext(Value& v, uint32_t size) {
        if (left() < 1) {
            return false;
        }
        v.ext_type = static_cast<int8_t>(*pos_++);
        return data(v, Type::kExt, size);
    }

    bool container(Value& v, Type type, uint32_t count) {
        // Each element takes a byte at least, each pair two.
        if ((type == Type::kMap ? uint64_t{count} * 2 : count) > left()) {
            return false;
        }
        v.type = type;
        v.count = count;
        return true;
    }

    bool integer(Value& v, int64_t value) {
        if (value < 0) {
            v.type = Type::kInt;
            v.sint = value;
        } else {
            v.type = Type::kUint;
            v.uint = static_cast<uint64_t>(value);
        }
        return true;
    }

    template <typename T>
    bool number(Value& v) {
        if (left() < sizeof(T)) {
            return false;
        }
        T value = load<T>();
        if constexpr (std::is_unsigned_v<T>) {
            v.type = Type::kUint;
            v.uint = value;
            return true;
        } else {
            return integer(v, value);
        }
    }

    template <typename Bits, typename Float>
    bool floating(Value& v) {
        if (left() < sizeof(Bits)) {
            return false;
        }
        Bits bits = load<Bits>();
        Float value;
        std::memcpy(&value, &bits, sizeof value);
        v.type = Type::kFloat;
        v.real = value;
        return true;
    }

    const uint8_t* pos_;
    const uint8_t* end_;
};

inline bool Reader::read(Value& v) {
    if (pos_ == end_) {
        return false;
    }
    const uint8_t op = *pos_++;
    if (op <= 0x7f) {
        v.type = Type::kUint;
        v.uint = op;
        return true;
    }
    if (op >= 0xe0) {
        return integer(v, static_cast<int8_t>(op));
    }
    if (op <= 0x8f) {
        return container(v, Type::kMap, op & 0x0f);
    }
    if (op <= 0x9f) {
        return container(v, Type::kArray, op & 0x0f);
    }
    if (op <= 0xbf) {
        return data(v, Type::kStr, op & 0x1f);
    }
    uint32_t n = 0;
    switch (op) {
        case 0xc0:
            v.type = Type::kNil;
            return true;
        case 0xc2:
        case 0xc3:
            v.type = Type::kBool;
            v.boolean = op == 0xc3;
            return true;
        case 0xc4:
            return length<uint8_t>(n) && data(v, Type::kBin, n);
        case 0xc5:
            return length<uint16_t>(n) && data(v, Type::kBin, n);
        case 0xc6:
            return length<uint32_t>(n) && data(v, Type::kBin, n);
        case 0xc7:
            return length<uint8_t>(n) && ext(v, n);
        case 0xc8:
            return length<uint16_t>(n) && ext(v, n);
        case 0xc9:
            return length<uint32_t>(n) && ext(v, n);
        case 0xca:
            return floating<uint32_t, float>(v);
        case 0xcb:
            return floating<uint64_t, double>(v);
        case 0xcc:
            return number<uint8_t>(v);
        case 0xcd:
            return number<uint16_t>(v);
        case 0xce:
            return number<uint32_t>(v);
        case 0xcf:
            return number<uint64_t>(v);
        case 0xd0:
            return number<int8_t>(v);
        case 0xd1:
            return number<int16_t>(v);
        case 0xd2:
            return number<int32_t>(v);
        case 0xd3:
            return number<int64_t>(v);
        case 0xd4:
            return ext(v, 1);
        case 0xd5:
            return ext(v, 2);
        case 0xd6:
            return ext(v, 4);
        case 0xd7:
            return ext(v, 8);
        case 0xd8:
            return ext(v, 16);
        case 0xd9:
            return length<uint8_t>(n) && data(v, Type::kStr, n);
        case 0xda:
            return length<uint16_t>(n) && data(v, Type::kStr, n);
        case 0xdb:
            return length<uint32_t>(n) && data(v, Type::kStr, n);
        case 0xdc:
            return length<uint16_t>(n) && container(v, Type::kArray, n);
        case 0xdd:
            return length<uint32_t>(n) && container(v, Type::kArray, n);
        case 0xde:
            return length<uint16_t>(n) && container(v, Type::kMap, n);
        case 0xdf:
            return length<uint32_t>(n) && container(v, Type::kMap, n);
        default:  // 0xc1, never used
            return false;
    }
}

inline bool Reader::skip_children(const Value& v, uint32_t depth_left) {
    if (!v.is_container()) {
        return true;
    }
    if (depth_left == 0) {
        return false;
    }
    if (depth_left > kMaxDepth) {
        depth_left = kMaxDepth;
    }
    // pending[i]: values still to skip in the container open at level i + 1 (`v` is level
    // 1). A level is pushed only when it has elements, so the loop ends at the last one.
    uint64_t pending[kMaxDepth];
    uint32_t open = 0;
    if (v.children() > 0) {
        pending[open++] = v.children();
    }
    while (open > 0) {
        if (pending[open - 1] == 0) {
            open--;
            continue;
        }
        pending[open - 1]--;
        Value child;
        if (!read(child)) {
            return false;
        }
        if (child.is_container()) {
            if (open + 1 > depth_left) {
                return false;
            }
            if (child.children() > 0) {
                pending[open++] = child.children();
            }
        }
    }
    return true;
}

}  // namespace kvc::msgpack
