// The JSON of POST /v1/locality and /v1/score answers, as service/api/rest.py writes them
// (_locality_json, LocalityAnswer.scores), for the native HTTP front. The values are the
// same (tests parse both and compare); floats are written as the shortest text that reads
// back to the same double, with ".0" on whole numbers, as Python does.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "plane.hpp"

namespace kvc {

void locality_json(std::string_view model, const Answer& answer, uint64_t total_blocks,
                   std::string& out);
void score_json(std::string_view model, const Answer& answer, std::string& out);

// Helpers, exposed for tests of the formatting itself.
void append_json_string(std::string_view text, std::string& out);
void append_json_double(double value, std::string& out);

}  // namespace kvc
