// The gRPC port, served natively: the hot path (KVCacheService Locality, Score and
// GetCandidates for token ids or block hashes) is answered here from the data plane, on
// gRPC's own threads, with no Python and no GIL; every other call (other methods, prompts,
// chat messages, candidate pods, anything malformed, health, reflection) is relayed whole
// to the Python gRPC server behind it on a private socket, so its semantics, errors and
// status codes stay defined in one place (service/api/grpc_server.py).
//
// Measured on the 2-core VM (docs/performance.md): a round trip from the Python client to
// this front costs about a quarter of one through grpc.aio.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "query_counts.hpp"

namespace kvc {

class DataPlane;

struct GrpcFrontSettings {
    std::string address;          // host:port to serve; port 0 picks one
    std::string backend;          // the Python server, e.g. unix:/tmp/.../grpc.sock
    int max_message_bytes = 8 << 20;
    uint64_t max_tokens = 131072;
    double weights[3] = {1.0, 0.8, 0.5};
};

class GrpcFront {
   public:
    GrpcFront(const DataPlane& plane, GrpcFrontSettings settings, std::vector<double> buckets);
    ~GrpcFront();
    GrpcFront(const GrpcFront&) = delete;
    GrpcFront& operator=(const GrpcFront&) = delete;

    // Binds and starts serving; returns the bound port. Throws std::runtime_error.
    int start();
    // Stops taking calls; calls in flight get `grace_seconds` to finish.
    void stop(double grace_seconds);

    FrontCounts counts() const;

    struct Impl;

   private:
    std::unique_ptr<Impl> impl_;
};

}  // namespace kvc
