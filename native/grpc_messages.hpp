// The protobuf wire format of the gRPC hot path (proto/kvcache/v1/kvcache.proto):
// LocalityRequest in, LocalityResponse / ScoreResponse / GetCandidatesResponse out, written
// by hand for these messages only, so the native front needs no protobuf runtime. The
// Python server behind the front (service/api/grpc_server.py) answers everything else, and
// the tests hold the two to the same answers.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "plane.hpp"

namespace kvc {

// A LocalityRequest, as far as the native path reads it. Views point into the bytes.
struct LocalityRequest {
    std::string_view model;
    std::vector<uint32_t> token_ids;     // field 2 (packed or not)
    std::vector<uint64_t> block_hashes;  // field 3
    std::string_view token_ids_packed;   // field 10: little-endian uint32
    std::optional<std::string_view> lora_name, cache_salt;
    // Fields the native path leaves to Python: prompt (4), messages (5), pods (8), tools (9).
    bool needs_python = false;
};

// False for bytes that are not a well-formed LocalityRequest (the Python server then
// answers, and says what is wrong).
bool decode_locality_request(std::string_view bytes, LocalityRequest& out);

void encode_locality_response(const std::string& model, const Answer& answer,
                              uint64_t total_blocks, std::string& out);
void encode_score_response(const std::string& model, const Answer& answer, std::string& out);
void encode_candidates_response(const std::string& model, const Answer& answer,
                                uint64_t total_blocks, std::string& out);

// ``pod_id`` for rank 0, ``pod_id@dp<r>`` otherwise (service/api/query.py, pod_label).
std::string pod_label(const PodAnswer& pod);

}  // namespace kvc
