// A REST body's token ids, read without a Python int per token.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace kvc {

// A JSON array of integers in [0, 2**32) written plainly (digits only: no sign, fraction,
// exponent or leading zero), with JSON whitespace around. Fills `out` and returns true;
// false for anything else, which the caller then validates the slow way to name the problem.
bool parse_json_tokens(const char* text, size_t size, std::vector<uint32_t>& out);

}  // namespace kvc
