#include "json_tokens.hpp"

namespace kvc {

namespace {

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

}  // namespace

bool parse_json_tokens(const char* text, size_t size, std::vector<uint32_t>& out) {
    out.clear();
    const char* p = text;
    const char* end = text + size;
    auto skip_space = [&] {
        while (p < end && is_space(*p)) {
            p++;
        }
    };
    skip_space();
    if (p == end || *p++ != '[') {
        return false;
    }
    out.reserve(size / 2 + 1);  // at most one token per two bytes ("1,")
    skip_space();
    if (p < end && *p == ']') {
        p++;
    } else {
        for (;;) {
            if (p == end || *p < '0' || *p > '9') {
                return false;
            }
            const char* digits = p;
            uint64_t value = 0;
            while (p < end && *p >= '0' && *p <= '9') {
                value = value * 10 + static_cast<unsigned>(*p - '0');
                if (p - digits >= 10 || value > 0xFFFFFFFFull) {
                    return false;
                }
                p++;
            }
            if (*digits == '0' && p - digits > 1) {
                return false;  // JSON has no leading zeros
            }
            out.push_back(static_cast<uint32_t>(value));
            skip_space();
            if (p < end && *p == ',') {
                p++;
                skip_space();
                continue;
            }
            if (p < end && *p == ']') {
                p++;
                break;
            }
            return false;  // a fraction, an exponent, another value, or the end
        }
    }
    skip_space();
    return p == end;
}

}  // namespace kvc
