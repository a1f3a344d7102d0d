#include "answer_json.hpp"

#include <charconv>
#include <cmath>
#include <cstring>

#include "grpc_messages.hpp"

namespace kvc {

namespace {

const char* const kTierLabels[kTiers] = {"gpu", "cpu", "disk"};

void append_uint(uint64_t value, std::string& out) {
    char digits[24];
    auto [end, error] = std::to_chars(digits, digits + sizeof digits, value);
    (void)error;
    out.append(digits, end);
}

}  // namespace

void append_json_string(std::string_view text, std::string& out) {
    static const char kHex[] = "0123456789abcdef";
    out.push_back('"');
    for (char c : text) {
        auto byte = static_cast<unsigned char>(c);
        switch (c) {
            case '"':
                out.append("\\\"");
                break;
            case '\\':
                out.append("\\\\");
                break;
            case '\n':
                out.append("\\n");
                break;
            case '\r':
                out.append("\\r");
                break;
            case '\t':
                out.append("\\t");
                break;
            case '\b':
                out.append("\\b");
                break;
            case '\f':
                out.append("\\f");
                break;
            default:
                if (byte < 0x20) {
                    out.append("\\u00");
                    out.push_back(kHex[byte >> 4]);
                    out.push_back(kHex[byte & 15]);
                } else {
                    out.push_back(c);  // UTF-8 passes through, as msgspec writes it
                }
        }
    }
    out.push_back('"');
}

void append_json_double(double value, std::string& out) {
    char text[32];
    auto [end, error] = std::to_chars(text, text + sizeof text, value);
    (void)error;
    std::string_view written(text, static_cast<size_t>(end - text));
    out.append(written);
    if (std::isfinite(value) && written.find_first_of(".en") == std::string_view::npos) {
        out.append(".0");  // 1.0, not 1: a float reads back as a float
    }
}

void locality_json(std::string_view model, const Answer& answer, uint64_t total_blocks,
                   std::string& out) {
    out.clear();
    uint32_t hits = answer.pods.empty() ? 0 : answer.pods.front().match_length;
    out.append("{\"model\":");
    append_json_string(model, out);
    out.append(",\"block_size\":");
    if (answer.block_size == 0) {
        out.append("null");
    } else {
        append_uint(answer.block_size, out);
    }
    out.append(",\"total_blocks\":");
    append_uint(total_blocks, out);
    out.append(",\"cache_hits\":");
    append_uint(hits, out);
    out.append(",\"coverage\":");
    append_json_double(total_blocks == 0 ? 0.0
                                         : static_cast<double>(hits) /
                                               static_cast<double>(total_blocks),
                       out);
    out.append(",\"pods\":[");
    bool first = true;
    for (const PodAnswer& pod : answer.pods) {
        out.append(first ? "{\"pod_id\":" : ",{\"pod_id\":");
        first = false;
        append_json_string(pod.pod_id, out);
        out.append(",\"dp_rank\":");
        append_uint(pod.rank, out);
        out.append(",\"match_length\":");
        append_uint(pod.match_length, out);
        out.append(",\"matched_tokens\":");
        append_uint(static_cast<uint64_t>(pod.match_length) * answer.block_size, out);
        out.append(",\"block_count\":");
        append_uint(pod.block_count, out);
        out.append(",\"tiers\":{");
        bool first_tier = true;
        for (int tier = 0; tier < kTiers; tier++) {
            if (pod.tiers[tier] != 0) {
                out.append(first_tier ? "\"" : ",\"");
                first_tier = false;
                out.append(kTierLabels[tier]);
                out.append("\":");
                append_uint(pod.tiers[tier], out);
            }
        }
        out.append("},\"score\":");
        append_json_double(pod.score, out);
        out.push_back('}');
    }
    out.append("]}");
}

void score_json(std::string_view model, const Answer& answer, std::string& out) {
    out.clear();
    out.append("{\"model\":");
    append_json_string(model, out);
    out.append(",\"scores\":{");
    bool first = true;
    for (const PodAnswer& pod : answer.pods) {
        if (!first) {
            out.push_back(',');
        }
        first = false;
        append_json_string(pod_label(pod), out);
        out.push_back(':');
        append_json_double(pod.score, out);
    }
    out.append("}}");
}

}  // namespace kvc
