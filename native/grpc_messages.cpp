#include "grpc_messages.hpp"

#include <cstring>

#include "utf8.hpp"

namespace kvc {

namespace {

enum WireType : uint32_t { kVarint = 0, kFixed64 = 1, kLength = 2, kFixed32 = 5 };

class Reader {
   public:
    explicit Reader(std::string_view bytes)
        : p_(reinterpret_cast<const uint8_t*>(bytes.data())), end_(p_ + bytes.size()) {}

    bool done() const { return p_ == end_; }

    bool varint(uint64_t& value) {
        value = 0;
        for (int shift = 0; shift < 64; shift += 7) {
            if (p_ == end_) {
                return false;
            }
            uint8_t byte = *p_++;
            value |= static_cast<uint64_t>(byte & 0x7F) << shift;
            if (!(byte & 0x80)) {
                return true;
            }
        }
        return false;  // more than 10 bytes
    }

    bool bytes(std::string_view& out) {
        uint64_t size;
        if (!varint(size) || size > static_cast<uint64_t>(end_ - p_)) {
            return false;
        }
        out = std::string_view(reinterpret_cast<const char*>(p_), size);
        p_ += size;
        return true;
    }

    bool skip(uint32_t wire_type) {
        uint64_t ignored;
        std::string_view view;
        switch (wire_type) {
            case kVarint:
                return varint(ignored);
            case kFixed64:
                return advance(8);
            case kLength:
                return bytes(view);
            case kFixed32:
                return advance(4);
            default:
                return false;  // groups: not in proto3
        }
    }

   private:
    bool advance(size_t n) {
        if (static_cast<size_t>(end_ - p_) < n) {
            return false;
        }
        p_ += n;
        return true;
    }

    const uint8_t* p_;
    const uint8_t* end_;
};

// Repeated scalars arrive packed (one length-delimited run) or one varint per tag.
template <class Item>
bool repeated(Reader& reader, uint32_t wire_type, std::vector<Item>& out, uint64_t limit,
              bool& needs_python) {
    uint64_t value;
    if (wire_type == kVarint) {
        if (!reader.varint(value)) {
            return false;
        }
        needs_python = needs_python || value > limit;
        out.push_back(static_cast<Item>(value));
        return true;
    }
    if (wire_type != kLength) {
        return false;
    }
    std::string_view run;
    if (!reader.bytes(run)) {
        return false;
    }
    Reader items(run);
    while (!items.done()) {
        if (!items.varint(value)) {
            return false;
        }
        needs_python = needs_python || value > limit;
        out.push_back(static_cast<Item>(value));
    }
    return true;
}

bool text(Reader& reader, uint32_t wire_type, std::string_view& out) {
    return wire_type == kLength && reader.bytes(out) && valid_utf8(out);
}

class Writer {
   public:
    explicit Writer(std::string& out) : out_(out) {}

    void varint(uint64_t value) {
        while (value >= 0x80) {
            out_.push_back(static_cast<char>(value | 0x80));
            value >>= 7;
        }
        out_.push_back(static_cast<char>(value));
    }
    void tag(uint32_t field, WireType type) { varint(field << 3 | type); }

    // proto3: a scalar at its default is left out.
    void uint(uint32_t field, uint64_t value) {
        if (value != 0) {
            tag(field, kVarint);
            varint(value);
        }
    }
    void present_uint(uint32_t field, uint64_t value) {  // an `optional` field
        tag(field, kVarint);
        varint(value);
    }
    void real(uint32_t field, double value) {
        if (value != 0) {
            tag(field, kFixed64);
            char bytes[8];
            std::memcpy(bytes, &value, 8);  // little-endian hosts only (token_keys.hpp)
            out_.append(bytes, 8);
        }
    }
    void string(uint32_t field, std::string_view value) {
        if (!value.empty()) {
            tag(field, kLength);
            varint(value.size());
            out_.append(value);
        }
    }
    // A nested message: written by `body` into a scratch string, then length-prefixed.
    template <class Body>
    void message(uint32_t field, Body body) {
        std::string nested;
        Writer inner(nested);
        body(inner);
        tag(field, kLength);
        varint(nested.size());
        out_.append(nested);
    }

   private:
    std::string& out_;
};

double coverage_of(const Answer& answer, uint64_t total_blocks) {
    uint32_t hits = answer.pods.empty() ? 0 : answer.pods.front().match_length;
    return total_blocks == 0 ? 0.0 : static_cast<double>(hits) / static_cast<double>(total_blocks);
}

const char* const kTierLabels[kTiers] = {"gpu", "cpu", "disk"};

}  // namespace

bool decode_locality_request(std::string_view bytes, LocalityRequest& out) {
    out = LocalityRequest{};
    Reader reader(bytes);
    while (!reader.done()) {
        uint64_t key;
        if (!reader.varint(key) || key >> 3 == 0 || key >> 3 > 0x1FFFFFFF) {
            return false;
        }
        uint32_t field = static_cast<uint32_t>(key >> 3);
        uint32_t type = static_cast<uint32_t>(key & 7);
        std::string_view view;
        bool ok;
        switch (field) {
            case 1:
                ok = text(reader, type, out.model);
                break;
            case 2:
                ok = repeated(reader, type, out.token_ids, 0xFFFFFFFFull, out.needs_python);
                break;
            case 3:
                ok = repeated(reader, type, out.block_hashes, UINT64_MAX, out.needs_python);
                break;
            case 6:
                ok = text(reader, type, view);
                out.lora_name = view;
                break;
            case 7:
                ok = text(reader, type, view);
                out.cache_salt = view;
                break;
            case 10:
                ok = type == kLength && reader.bytes(out.token_ids_packed);
                break;
            case 4:
            case 5:
            case 8:
            case 9:
                out.needs_python = true;
                ok = reader.skip(type);
                break;
            default:
                ok = reader.skip(type);  // unknown fields are ignored, as protobuf does
        }
        if (!ok) {
            return false;
        }
    }
    return true;
}

void encode_locality_response(const std::string& model, const Answer& answer,
                              uint64_t total_blocks, std::string& out) {
    out.clear();
    Writer writer(out);
    writer.string(1, model);
    if (answer.block_size != 0) {
        writer.present_uint(2, answer.block_size);
    }
    writer.uint(3, total_blocks);
    writer.uint(4, answer.pods.empty() ? 0 : answer.pods.front().match_length);
    writer.real(5, coverage_of(answer, total_blocks));
    for (const PodAnswer& pod : answer.pods) {
        writer.message(6, [&](Writer& w) {
            w.string(1, pod.pod_id);
            w.uint(2, pod.rank);
            w.uint(3, pod.match_length);
            w.uint(4, static_cast<uint64_t>(pod.match_length) * answer.block_size);
            w.uint(5, pod.block_count);
            for (int tier = 0; tier < kTiers; tier++) {
                if (pod.tiers[tier] != 0) {
                    w.message(6, [&](Writer& entry) {
                        entry.string(1, kTierLabels[tier]);
                        entry.uint(2, pod.tiers[tier]);
                    });
                }
            }
            w.real(7, pod.score);
        });
    }
}

void encode_score_response(const std::string& model, const Answer& answer, std::string& out) {
    out.clear();
    Writer writer(out);
    writer.string(1, model);
    for (const PodAnswer& pod : answer.pods) {
        writer.message(2, [&](Writer& entry) {
            entry.string(1, pod_label(pod));
            entry.real(2, pod.score);
        });
    }
}

void encode_candidates_response(const std::string& model, const Answer& answer,
                                uint64_t total_blocks, std::string& out) {
    out.clear();
    Writer writer(out);
    writer.string(1, model);
    writer.uint(2, total_blocks);
    for (const PodAnswer& pod : answer.pods) {
        writer.message(3, [&](Writer& w) {
            w.string(1, pod_label(pod));
            w.real(2, pod.score);
            w.uint(3, pod.match_length);
        });
    }
}

std::string pod_label(const PodAnswer& pod) {
    return pod.rank == 0 ? pod.pod_id : pod.pod_id + "@dp" + std::to_string(pod.rank);
}

}  // namespace kvc
