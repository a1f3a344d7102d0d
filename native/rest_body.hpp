// The common body of POST /v1/locality and /v1/score, read in one pass without Python
// objects: {"model": str, "token_ids": [uint32...], "lora_name": str|null,
// "cache_salt": str|null, "pods": [str...]|null}, keys in any order, JSON whitespace.
//
// Anything else (another key, a repeated key, an escape or a control character in a string,
// a token id written other than plainly, invalid UTF-8, an empty model) is refused, and the
// REST edge then validates the body the slow way (pydantic), which names the problem. So what
// this accepts, that path accepts alike, with the same values.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

namespace kvc {

struct PlainLocality {
    std::string_view model;
    std::vector<uint32_t> tokens;
    std::optional<std::string_view> lora_name;
    std::optional<std::string_view> cache_salt;
    std::optional<std::vector<std::string_view>> pods;
};

// Views point into `text`. False when the body is not of this plain shape.
bool parse_plain_locality(std::string_view text, PlainLocality& out);

}  // namespace kvc
