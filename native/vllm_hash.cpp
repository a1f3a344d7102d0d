#include "vllm_hash.hpp"

#include <openssl/evp.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>

namespace kvc {

namespace {

// --- pickle protocol 5, as CPython's C pickler (Modules/_pickle.c) writes it --------------
//
// What pickle.dumps((digest, tokens, extra), protocol=5) emits, checked byte for byte
// against CPython 3.11 (tests/unit/native/test_vllm_hash.py compares the bytes):
//   PROTO 5, then FRAME <8-byte length> around the rest (protocol 4 framing), ending STOP.
//   bytes(32)   SHORT_BINBYTES 32 <digest> MEMOIZE
//   int         BININT1 (< 2**8), BININT2 (< 2**16), BININT (< 2**31, 4 bytes LE signed);
//               2**31 .. 2**32-1 do not fit a signed 4-byte int: LONG1 5 <4 bytes LE, 00>
//               (two's complement, so a sign byte). Ints are never memoized.
//   tuple       empty: EMPTY_TUPLE (not memoized); 1-3 items: the items then TUPLE1/2/3;
//               more: MARK, the items, TUPLE; then MEMOIZE
//   str         UTF-8 length <= 255: SHORT_BINUNICODE <1-byte length>, else BINUNICODE
//               <4-byte LE length> (BINUNICODE8 past 4 GiB); then MEMOIZE
//   None        NONE
// and the memo: an object pickled again within one dumps is a BINGET of its memo index.

constexpr uint8_t kProto = 0x80;
constexpr uint8_t kFrame = 0x95;
constexpr uint8_t kStop = '.';
constexpr uint8_t kMemoize = 0x94;
constexpr uint8_t kBinGet = 'h';
constexpr uint8_t kLongBinGet = 'j';
constexpr uint8_t kMark = '(';
constexpr uint8_t kTuple = 't';
constexpr uint8_t kEmptyTuple = ')';
constexpr uint8_t kTupleOf[] = {kEmptyTuple, 0x85, 0x86, 0x87};  // TUPLE1, TUPLE2, TUPLE3
constexpr uint8_t kNone = 'N';
constexpr uint8_t kBinInt1 = 'K';
constexpr uint8_t kBinInt2 = 'M';
constexpr uint8_t kBinInt = 'J';
constexpr uint8_t kLong1 = 0x8a;
constexpr uint8_t kShortBinBytes = 'C';
constexpr uint8_t kShortBinUnicode = 0x8c;
constexpr uint8_t kBinUnicode = 'X';
constexpr uint8_t kBinUnicode8 = 0x8d;

// _pickle.c: FRAME_HEADER_SIZE, FRAME_SIZE_MIN, FRAME_SIZE_TARGET.
constexpr size_t kFrameHeader = 9;
constexpr size_t kFrameMin = 4;
constexpr size_t kFrameTarget = 64 * 1024;
constexpr size_t kNoFrame = SIZE_MAX;

void put_le(uint8_t* at, uint64_t value, size_t width) {
    for (size_t i = 0; i < width; i++) {
        at[i] = static_cast<uint8_t>(value >> (8 * i));
    }
}

// Appends to a byte vector through a raw pointer. The vector is sized to its capacity up
// front and cut to the written length once, when the sink goes, so a warm buffer costs
// neither an allocation nor a size update per write (a vector::resize per opcode was a
// third of the time of a block).
class ByteSink {
 public:
    explicit ByteSink(std::vector<uint8_t>& out) : out_(out), size_(out.size()) {
        out_.resize(std::max(out_.capacity(), size_));
    }
    ByteSink(const ByteSink&) = delete;
    ByteSink& operator=(const ByteSink&) = delete;
    ~ByteSink() { out_.resize(size_); }

    uint8_t* claim(size_t count) {
        if (size_ + count > out_.size()) {
            out_.resize(std::max(size_ + count, 2 * out_.size()));
        }
        uint8_t* at = out_.data() + size_;
        size_ += count;
        return at;
    }
    void unclaim(size_t count) { size_ -= count; }  // the unused end of the last claim
    void put(uint8_t byte) { *claim(1) = byte; }
    void put(const void* data, size_t count) {
        if (count > 0) {
            std::memcpy(claim(count), data, count);
        }
    }
    size_t size() const { return size_; }
    uint8_t* at(size_t offset) { return out_.data() + offset; }
    void erase(size_t offset, size_t count) {
        std::memmove(out_.data() + offset, out_.data() + offset + count, size_ - offset - count);
        size_ -= count;
    }

 private:
    std::vector<uint8_t>& out_;
    size_t size_;
};

// save_long for 0 <= value < 2**32, written at `at`; returns the end.
constexpr size_t kWidestInt = 7;  // LONG1 5 <5 bytes>
inline uint8_t* pickle_int(uint8_t* at, uint32_t value) {
    if (value < (1u << 8)) {
        at[0] = kBinInt1;
        at[1] = static_cast<uint8_t>(value);
        return at + 2;
    }
    if (value < (1u << 16)) {
        at[0] = kBinInt2;
        put_le(at + 1, value, 2);
        return at + 3;
    }
    if (value < (1u << 31)) {
        at[0] = kBinInt;
        put_le(at + 1, value, 4);
        return at + 5;
    }
    // 2**31 and above do not fit BININT's signed 4 bytes: LONG1 with the two's complement
    // little-endian bytes, a zero sign byte included (else the top bit would read negative).
    at[0] = kLong1;
    at[1] = 5;
    put_le(at + 2, value, 4);
    at[6] = 0;
    return at + 7;
}

// Appends to a byte vector, with CPython's framing. Frames only matter past 64 KiB (a
// seed or LoRA name that long, a block of more than ~9000 tokens); below that the whole
// pickle is one frame. One writer does both, so the rare case runs the same code as the
// common one; only the loop over a block's tokens has a shortcut, where it cannot matter.
class PickleWriter {
 public:
    explicit PickleWriter(std::vector<uint8_t>& out) : out_(out) {
        // dump() writes PROTO before it turns framing on: PROTO is outside every frame.
        const uint8_t proto[] = {kProto, 5};
        write(proto, 2);
        framing_ = true;
    }

    // CPython's save() starts every object, nested ones and tuple items included, with
    // _Pickler_OpcodeBoundary: a frame that has reached 64 KiB is closed there, and the
    // next write opens a new one. Call it where save() is called.
    void object_boundary() {
        if (frame_start_ != kNoFrame && frame_length() >= kFrameTarget) {
            commit_frame();
        }
    }

    void op(uint8_t opcode) { write(&opcode, 1); }

    void write(const void* data, size_t size) {
        if (framing_ && frame_start_ == kNoFrame) {
            // The first write after a commit opens a frame; its header is filled in later.
            frame_start_ = out_.size();
            out_.claim(kFrameHeader);
        }
        out_.put(data, size);
    }

    // _Pickler_write_bytes: a bytes or str payload of 64 KiB or more closes the current
    // frame and goes out, header and all, outside any frame.
    void payload(const uint8_t* header, size_t header_size, const void* data, size_t size) {
        if (size >= kFrameTarget) {
            commit_frame();
            framing_ = false;
            write(header, header_size);
            write(data, size);
            framing_ = true;
        } else {
            write(header, header_size);
            write(data, size);
        }
    }

    void memoize() {
        op(kMemoize);
        memo_size_++;
    }
    size_t memo_size() const { return memo_size_; }

    void memo_get(size_t index) {
        if (index < 256) {
            const uint8_t get[] = {kBinGet, static_cast<uint8_t>(index)};
            write(get, 2);
        } else {
            uint8_t get[5] = {kLongBinGet};
            put_le(get + 1, index, 4);
            write(get, 5);
        }
    }

    // The items of a tuple of ints: one boundary and one int per item, as save() would go.
    // When the open frame cannot reach 64 KiB within them, no boundary can act, so they
    // are written in one pass into space claimed for the widest encoding.
    void integers(const uint32_t* values, size_t count) {
        if (frame_start_ != kNoFrame &&
            frame_length() + kWidestInt * count < kFrameTarget) {
            uint8_t* const start = out_.claim(kWidestInt * count);
            uint8_t* at = start;
            for (size_t i = 0; i < count; i++) {
                at = pickle_int(at, values[i]);
            }
            out_.unclaim(static_cast<size_t>(start + kWidestInt * count - at));
            return;
        }
        for (size_t i = 0; i < count; i++) {
            object_boundary();
            uint8_t code[kWidestInt];
            write(code, static_cast<size_t>(pickle_int(code, values[i]) - code));
        }
    }

    void str(std::string_view utf8) {
        uint8_t header[9];
        size_t header_size;
        if (utf8.size() <= 0xff) {
            header[0] = kShortBinUnicode;
            header[1] = static_cast<uint8_t>(utf8.size());
            header_size = 2;
        } else if (utf8.size() <= 0xffffffffu) {
            header[0] = kBinUnicode;
            put_le(header + 1, utf8.size(), 4);
            header_size = 5;
        } else {
            header[0] = kBinUnicode8;
            put_le(header + 1, utf8.size(), 8);
            header_size = 9;
        }
        payload(header, header_size, utf8.data(), utf8.size());
        memoize();
    }

    void finish() {
        op(kStop);
        commit_frame();
    }

 private:
    size_t frame_length() const { return out_.size() - frame_start_ - kFrameHeader; }

    // _Pickler_CommitFrame: a frame of fewer than 4 bytes loses its header.
    void commit_frame() {
        if (frame_start_ == kNoFrame) {
            return;
        }
        const size_t length = frame_length();
        uint8_t* header = out_.at(frame_start_);
        if (length >= kFrameMin) {
            header[0] = kFrame;
            put_le(header + 1, length, 8);
        } else {
            out_.erase(frame_start_, kFrameHeader);
        }
        frame_start_ = kNoFrame;
    }

    ByteSink out_;
    size_t frame_start_ = kNoFrame;
    bool framing_ = false;
    size_t memo_size_ = 0;
};

// Two views of one Python object (see serialize_block in the header).
bool same_object(std::string_view a, std::string_view b) {
    return a.size() == b.size() && (a.data() == b.data() || a.empty());
}

void pickle_root(std::string_view seed, std::vector<uint8_t>& out) {
    PickleWriter w(out);
    w.object_boundary();
    w.str(seed);
    w.finish();
}

void pickle_block(const Digest& parent, const uint32_t* tokens, size_t count,
                  const std::string_view* extra, size_t extra_count, std::vector<uint8_t>& out) {
    PickleWriter w(out);
    w.object_boundary();  // the outer 3-tuple: its items, then TUPLE3

    w.object_boundary();
    const uint8_t bytes_header[] = {kShortBinBytes, 32};
    w.payload(bytes_header, 2, parent.data(), parent.size());
    w.memoize();

    w.object_boundary();
    if (count == 0) {
        w.op(kEmptyTuple);
    } else {
        if (count > 3) {
            w.op(kMark);
        }
        w.integers(tokens, count);
        w.op(count > 3 ? kTuple : kTupleOf[count]);
        w.memoize();
    }

    w.object_boundary();
    if (extra == nullptr || extra_count == 0) {
        w.op(kNone);
    } else {
        if (extra_count > 3) {
            w.op(kMark);
        }
        // The memo index of each str, to reference one that repeats (CPython's memo is
        // keyed by id(); ints and None are never in it).
        size_t small[4];
        std::vector<size_t> large;
        size_t* memo_index = small;
        if (extra_count > 4) {
            large.resize(extra_count);
            memo_index = large.data();
        }
        for (size_t i = 0; i < extra_count; i++) {
            w.object_boundary();
            size_t earlier = 0;
            while (earlier < i && !same_object(extra[earlier], extra[i])) {
                earlier++;
            }
            if (earlier < i) {
                memo_index[i] = memo_index[earlier];
                w.memo_get(memo_index[i]);
            } else {
                memo_index[i] = w.memo_size();
                w.str(extra[i]);
            }
        }
        w.op(extra_count > 3 ? kTuple : kTupleOf[extra_count]);
        w.memoize();
    }

    w.op(kTupleOf[3]);
    w.memoize();
    w.finish();
}

// --- canonical CBOR, as cbor2.dumps(obj, canonical=True) writes it ----------------------
//
// RFC 8949 heads with the shortest argument: major type << 5 | value below 24, else
// | 24, 25, 26, 27 followed by 1, 2, 4, 8 bytes big-endian. A tuple is an array (major
// 4), bytes a byte string (2), a str a UTF-8 text string (3), an int >= 0 an unsigned
// int (0), None the simple value null (0xf6). Canonical mode only orders maps and sets and
// shortens floats, none of which occur here; cbor2 shares no values or strings by default.

constexpr uint8_t kUnsigned = 0;
constexpr uint8_t kByteString = 2;
constexpr uint8_t kTextString = 3;
constexpr uint8_t kArray = 4;
constexpr uint8_t kNull = 0xf6;

constexpr size_t kWidestHead = 9;

// Fixed widths, so the compiler makes each a byte swap and one store.
inline void put_be(uint8_t* at, uint64_t value, size_t width) {
    for (size_t i = 0; i < width; i++) {
        at[i] = static_cast<uint8_t>(value >> (8 * (width - 1 - i)));
    }
}

// A head written at `at`; returns the end. Each width spelt out: a loop over a variable
// width made CBOR's token loop slower than pickle's.
inline uint8_t* cbor_head(uint8_t* at, uint8_t major, uint64_t value) {
    const uint8_t type = static_cast<uint8_t>(major << 5);
    if (value < 24) {
        at[0] = static_cast<uint8_t>(type | value);
        return at + 1;
    }
    if (value <= 0xff) {
        at[0] = type | 24;
        at[1] = static_cast<uint8_t>(value);
        return at + 2;
    }
    if (value <= 0xffff) {
        at[0] = type | 25;
        at[1] = static_cast<uint8_t>(value >> 8);
        at[2] = static_cast<uint8_t>(value);
        return at + 3;
    }
    if (value <= 0xffffffffu) {
        at[0] = type | 26;
        put_be(at + 1, value, 4);
        return at + 5;
    }
    at[0] = type | 27;
    put_be(at + 1, value, 8);
    return at + 9;
}

void cbor_head(ByteSink& out, uint8_t major, uint64_t value) {
    uint8_t* const start = out.claim(kWidestHead);
    out.unclaim(static_cast<size_t>(start + kWidestHead - cbor_head(start, major, value)));
}

void cbor_text(ByteSink& out, std::string_view utf8) {
    cbor_head(out, kTextString, utf8.size());
    out.put(utf8.data(), utf8.size());
}

void cbor_root(std::string_view seed, std::vector<uint8_t>& bytes) {
    ByteSink out(bytes);
    cbor_text(out, seed);
}

void cbor_block(const Digest& parent, const uint32_t* tokens, size_t count,
                const std::string_view* extra, size_t extra_count, std::vector<uint8_t>& bytes) {
    ByteSink out(bytes);
    cbor_head(out, kArray, 3);
    cbor_head(out, kByteString, parent.size());
    out.put(parent.data(), parent.size());
    // The array and its uints in one pass, in space claimed for the widest heads.
    uint8_t* const start = out.claim(kWidestHead * (count + 1));
    uint8_t* at = cbor_head(start, kArray, count);
    for (size_t i = 0; i < count; i++) {
        at = cbor_head(at, kUnsigned, tokens[i]);
    }
    out.unclaim(static_cast<size_t>(start + kWidestHead * (count + 1) - at));
    if (extra == nullptr || extra_count == 0) {
        out.put(kNull);
    } else {
        cbor_head(out, kArray, extra_count);
        for (size_t i = 0; i < extra_count; i++) {
            cbor_text(out, extra[i]);
        }
    }
}

// --- sha256 -------------------------------------------------------------------------------

// Fetched once: with EVP_sha256() OpenSSL 3 would look the implementation up again on
// every EVP_DigestInit.
const EVP_MD* sha256_md() {
    static const EVP_MD* const md = [] {
        EVP_MD* fetched = EVP_MD_fetch(nullptr, "SHA256", nullptr);
        if (fetched == nullptr) {
            throw std::runtime_error("OpenSSL has no SHA256 implementation");
        }
        return fetched;
    }();
    return md;
}

struct ContextFree {
    void operator()(EVP_MD_CTX* ctx) const { EVP_MD_CTX_free(ctx); }
};

EVP_MD_CTX* thread_context() {
    thread_local std::unique_ptr<EVP_MD_CTX, ContextFree> ctx(EVP_MD_CTX_new());
    if (!ctx) {
        throw std::bad_alloc();
    }
    return ctx.get();
}

// The serialization buffer of this thread: cleared per block, its capacity kept.
std::vector<uint8_t>& thread_buffer() {
    thread_local std::vector<uint8_t> buffer;
    buffer.clear();
    return buffer;
}

void require_block_size(size_t block_size) {
    if (block_size < 1) {
        throw std::invalid_argument("block_size must be an int >= 1, got 0");
    }
}

// vLLM's extra keys (vllm/v1/core/kv_cache_utils.py, generate_block_hash_extra_keys):
// the LoRA name in every block, then the cache_salt in the first block of a prompt when it
// is non-empty; None when there are none.
struct ExtraKeys {
    std::string_view keys[2];
    size_t first_count = 0;  // keys[0:first_count] for the chain's first block
    size_t rest_count = 0;   // keys[0:rest_count] for the others

    ExtraKeys(std::optional<std::string_view> lora_name,
              std::optional<std::string_view> cache_salt, bool starts_prompt) {
        if (lora_name) {
            keys[rest_count++] = *lora_name;
        }
        first_count = rest_count;
        if (starts_prompt && cache_salt && !cache_salt->empty()) {
            keys[first_count++] = *cache_salt;
        }
    }
    size_t count(size_t block) const { return block == 0 ? first_count : rest_count; }
};

// The digest a chain continues from: the root, or the remembered digest of `parent`
// (copied, as the memory may move it on the next put).
bool chain_start(const VllmHasher& hasher, DigestMemory& memory, const uint64_t* parent,
                 Digest& start) {
    if (parent == nullptr) {
        start = hasher.root();
        return true;
    }
    const Digest* remembered = memory.get(*parent);
    if (remembered == nullptr) {
        return false;
    }
    start = *remembered;
    return true;
}

}  // namespace

std::string_view hash_algorithm_name(HashAlgorithm algorithm) {
    return algorithm == HashAlgorithm::kSha256 ? "sha256" : "sha256_cbor";
}

std::optional<HashAlgorithm> parse_hash_algorithm(std::string_view name) {
    if (name == "sha256") {
        return HashAlgorithm::kSha256;
    }
    if (name == "sha256_cbor") {
        return HashAlgorithm::kSha256Cbor;
    }
    return std::nullopt;
}

uint64_t published(const Digest& digest) {
    uint64_t value = 0;
    for (size_t i = 24; i < 32; i++) {
        value = value << 8 | digest[i];
    }
    return value;
}

void serialize_root(HashAlgorithm algorithm, std::string_view seed, std::vector<uint8_t>& out) {
    if (algorithm == HashAlgorithm::kSha256) {
        pickle_root(seed, out);
    } else {
        cbor_root(seed, out);
    }
}

void serialize_block(HashAlgorithm algorithm, const Digest& parent, const uint32_t* tokens,
                     size_t count, const std::string_view* extra, size_t extra_count,
                     std::vector<uint8_t>& out) {
    if (algorithm == HashAlgorithm::kSha256) {
        pickle_block(parent, tokens, count, extra, extra_count, out);
    } else {
        cbor_block(parent, tokens, count, extra, extra_count, out);
    }
}

Digest sha256(const uint8_t* data, size_t size) {
    EVP_MD_CTX* ctx = thread_context();
    Digest digest;
    unsigned int length = 0;
    if (EVP_DigestInit_ex2(ctx, sha256_md(), nullptr) != 1 ||
        EVP_DigestUpdate(ctx, data, size) != 1 ||
        EVP_DigestFinal_ex(ctx, digest.data(), &length) != 1 || length != digest.size()) {
        throw std::runtime_error("OpenSSL sha256 failed");
    }
    return digest;
}

VllmHasher::VllmHasher(HashAlgorithm algorithm, std::string_view seed) : algorithm_(algorithm) {
    std::vector<uint8_t>& buffer = thread_buffer();
    serialize_root(algorithm, seed, buffer);
    root_ = sha256(buffer.data(), buffer.size());
}

Digest VllmHasher::block(const Digest& parent, const uint32_t* tokens, size_t count,
                         const std::string_view* extra, size_t extra_count) const {
    std::vector<uint8_t>& buffer = thread_buffer();
    serialize_block(algorithm_, parent, tokens, count, extra, extra_count, buffer);
    return sha256(buffer.data(), buffer.size());
}

// --- DigestMemory ---------------------------------------------------------------------------

DigestMemory::DigestMemory(size_t capacity) : capacity_(capacity), generation_(capacity / 2) {
    if (capacity < 2) {
        throw std::invalid_argument("max_parents must be an int >= 2, got " +
                                    std::to_string(capacity));
    }
}

const Digest* DigestMemory::get(uint64_t published) {
    if (const Digest* young = young_.find(published)) {
        return young;
    }
    if (const Digest* old = old_.find(published)) {
        const Digest copy = *old;  // the put may drop the table `old` points into
        return put_young(published, copy);
    }
    return nullptr;
}

void DigestMemory::put(uint64_t published, const Digest& digest) {
    put_young(published, digest);
}

Digest* DigestMemory::put_young(uint64_t published, const Digest& digest) {
    Digest* stored = young_.assign(published, digest);
    if (young_.size() >= generation_) {
        // The young generation becomes the old one; swapping keeps both tables' storage
        // (and `stored`, now in old_), and the previous old one is dropped by a clear.
        std::swap(young_, old_);
        young_.clear();
    }
    return stored;
}

size_t DigestMemory::Table::slot_of(uint64_t key) const {
    // Fibonacci hashing: the top bits of key * 2**64/phi. Published hashes are already
    // uniform, but a parent in a query is whatever the client sent.
    const unsigned bits = static_cast<unsigned>(__builtin_ctzll(keys_.size()));
    return static_cast<size_t>((key * 0x9E3779B97F4A7C15ull) >> (64 - bits));
}

const Digest* DigestMemory::Table::find(uint64_t key) const {
    if (used_ == 0) {
        return nullptr;
    }
    const size_t mask = keys_.size() - 1;
    for (size_t i = slot_of(key); full_[i]; i = (i + 1) & mask) {
        if (keys_[i] == key) {
            return &digests_[i];
        }
    }
    return nullptr;
}

Digest* DigestMemory::Table::assign(uint64_t key, const Digest& digest) {
    if ((used_ + 1) * 4 > keys_.size() * 3) {  // at most 3/4 full, so probes stay short
        grow();
    }
    const size_t mask = keys_.size() - 1;
    size_t i = slot_of(key);
    for (; full_[i]; i = (i + 1) & mask) {
        if (keys_[i] == key) {
            digests_[i] = digest;
            return &digests_[i];
        }
    }
    full_[i] = 1;
    keys_[i] = key;
    digests_[i] = digest;
    used_++;
    return &digests_[i];
}

void DigestMemory::Table::grow() {
    std::vector<uint64_t> keys(std::max<size_t>(16, keys_.size() * 2));
    std::vector<Digest> digests(keys.size());
    std::vector<uint8_t> full(keys.size(), 0);
    std::swap(keys, keys_);
    std::swap(digests, digests_);
    std::swap(full, full_);
    used_ = 0;
    for (size_t i = 0; i < keys.size(); i++) {
        if (full[i]) {
            assign(keys[i], digests[i]);
        }
    }
}

void DigestMemory::Table::clear() {
    std::fill(full_.begin(), full_.end(), 0);
    used_ = 0;
}

// --- the chains -----------------------------------------------------------------------------

HashCheck check_published(const VllmHasher& hasher, DigestMemory& memory,
                          const uint32_t* tokens, size_t count, size_t block_size,
                          const uint64_t* published_hashes, size_t published_count,
                          const uint64_t* parent, std::optional<std::string_view> lora_name,
                          std::optional<std::string_view> cache_salt) {
    require_block_size(block_size);
    if (count % block_size != 0 || count / block_size != published_count) {
        throw std::invalid_argument(std::to_string(count) + " token ids do not make " +
                                    std::to_string(published_count) + " blocks of " +
                                    std::to_string(block_size) + " tokens");
    }
    Digest digest;
    if (!chain_start(hasher, memory, parent, digest)) {
        return HashCheck::kUnknownParent;
    }
    const ExtraKeys extra(lora_name, cache_salt, parent == nullptr);
    // Digests are remembered only once the whole event matches.
    thread_local std::vector<Digest> digests;
    digests.clear();
    for (size_t i = 0; i < published_count; i++) {
        digest = hasher.block(digest, tokens + i * block_size, block_size, extra.keys,
                              extra.count(i));
        if (published(digest) != published_hashes[i]) {
            return HashCheck::kMismatch;  // the rest cannot match: they chain on this one
        }
        digests.push_back(digest);
    }
    for (size_t i = 0; i < published_count; i++) {
        memory.put(published_hashes[i], digests[i]);
    }
    return HashCheck::kMatch;
}

bool vllm_block_keys(const VllmHasher& hasher, DigestMemory& memory, const uint32_t* tokens,
                     size_t count, size_t block_size, const uint64_t* parent,
                     std::optional<std::string_view> lora_name,
                     std::optional<std::string_view> cache_salt, bool remember,
                     std::vector<uint64_t>& out) {
    require_block_size(block_size);
    out.clear();
    Digest digest;
    if (!chain_start(hasher, memory, parent, digest)) {
        return false;
    }
    const ExtraKeys extra(lora_name, cache_salt, parent == nullptr);
    const size_t blocks = count / block_size;
    out.reserve(blocks);
    for (size_t i = 0; i < blocks; i++) {
        digest = hasher.block(digest, tokens + i * block_size, block_size, extra.keys,
                              extra.count(i));
        out.push_back(published(digest));
        if (remember) {
            memory.put(out.back(), digest);
        }
    }
    return true;
}

}  // namespace kvc
