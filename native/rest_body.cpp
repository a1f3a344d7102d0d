#include "rest_body.hpp"

#include "utf8.hpp"

namespace kvc {

namespace {

class Cursor {
   public:
    explicit Cursor(std::string_view text) : p_(text.data()), end_(text.data() + text.size()) {}

    void space() {
        while (p_ < end_ && (*p_ == ' ' || *p_ == '\t' || *p_ == '\n' || *p_ == '\r')) {
            p_++;
        }
    }
    bool take(char c) {
        space();
        if (p_ < end_ && *p_ == c) {
            p_++;
            return true;
        }
        return false;
    }
    bool at_end() {
        space();
        return p_ == end_;
    }
    bool null() {
        space();
        if (end_ - p_ >= 4 && std::string_view(p_, 4) == "null") {
            p_ += 4;
            return true;
        }
        return false;
    }

    // A string with no escapes or control characters, valid UTF-8.
    bool string(std::string_view& out) {
        if (!take('"')) {
            return false;
        }
        const char* start = p_;
        while (p_ < end_ && *p_ != '"') {
            if (*p_ == '\\' || static_cast<unsigned char>(*p_) < 0x20) {
                return false;
            }
            p_++;
        }
        if (p_ == end_) {
            return false;
        }
        out = std::string_view(start, static_cast<size_t>(p_ - start));
        p_++;
        return valid_utf8(out);
    }

    // [] or [n, ...] of plainly written integers in [0, 2**32). The hot loop of a query:
    // one pass, no call per character.
    bool tokens(std::vector<uint32_t>& out) {
        if (!take('[')) {
            return false;
        }
        out.resize(static_cast<size_t>(end_ - p_) / 2 + 1);  // at most one per "1,"
        uint32_t* next = out.data();
        const char* p = p_;
        const char* end = end_;
        auto skip_space = [&] {
            while (p < end && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t')) {
                p++;
            }
        };
        skip_space();
        if (p < end && *p == ']') {
            p_ = p + 1;
            out.clear();
            return true;
        }
        for (;;) {
            skip_space();
            const char* digits = p;
            uint64_t value = 0;
            unsigned digit;
            while (p < end && (digit = static_cast<unsigned char>(*p) - '0') <= 9) {
                value = value * 10 + digit;
                p++;
            }
            size_t length = static_cast<size_t>(p - digits);
            // (A run of digits long enough to wrap value is refused by its length.)
            if (length == 0 || length > 10 || value > 0xFFFFFFFFull ||
                (*digits == '0' && length > 1)) {
                return false;  // not a plain int in range; JSON has no leading zeros
            }
            *next++ = static_cast<uint32_t>(value);
            skip_space();
            if (p < end && *p == ',') {
                p++;
                continue;
            }
            if (p < end && *p == ']') {
                p++;
                break;
            }
            return false;  // a fraction, an exponent, another value, or the end
        }
        out.resize(static_cast<size_t>(next - out.data()));
        p_ = p;
        return true;
    }

    bool strings(std::vector<std::string_view>& out) {
        if (!take('[')) {
            return false;
        }
        if (take(']')) {
            return true;
        }
        do {
            std::string_view item;
            if (!string(item)) {
                return false;
            }
            out.push_back(item);
        } while (take(','));
        return take(']');
    }

   private:
    const char* p_;
    const char* end_;
};

bool optional_string(Cursor& cursor, std::optional<std::string_view>& out) {
    if (cursor.null()) {
        out.reset();
        return true;
    }
    std::string_view value;
    if (!cursor.string(value)) {
        return false;
    }
    out = value;
    return true;
}

}  // namespace

bool parse_plain_locality(std::string_view text, PlainLocality& out) {
    out = PlainLocality{};
    Cursor cursor(text);
    if (!cursor.take('{')) {
        return false;
    }
    unsigned seen = 0;
    constexpr unsigned kModel = 1, kTokens = 2, kLora = 4, kSalt = 8, kPods = 16;
    if (!cursor.take('}')) {
        do {
            std::string_view key;
            if (!cursor.string(key) || !cursor.take(':')) {
                return false;
            }
            unsigned field = key == "model"        ? kModel
                             : key == "token_ids"  ? kTokens
                             : key == "lora_name"  ? kLora
                             : key == "cache_salt" ? kSalt
                             : key == "pods"       ? kPods
                                                   : 0;
            if (field == 0 || (seen & field)) {
                return false;  // unknown or repeated: the validating path says what it thinks
            }
            seen |= field;
            bool ok;
            switch (field) {
                case kModel:
                    ok = cursor.string(out.model);
                    break;
                case kTokens:
                    ok = cursor.tokens(out.tokens);
                    break;
                case kLora:
                    ok = optional_string(cursor, out.lora_name);
                    break;
                case kSalt:
                    ok = optional_string(cursor, out.cache_salt);
                    break;
                default:
                    if (cursor.null()) {
                        ok = true;
                    } else {
                        out.pods.emplace();
                        ok = cursor.strings(*out.pods);
                    }
            }
            if (!ok) {
                return false;
            }
        } while (cursor.take(','));
        if (!cursor.take('}')) {
            return false;
        }
    }
    return cursor.at_end() && (seen & kModel) && (seen & kTokens) && !out.model.empty();
}

}  // namespace kvc
