// The HTTP port, served natively: POST /v1/locality and /v1/score with a plain body of token
// ids (native/rest_body.hpp) are answered here from the data plane, on threads of their
// own, with no Python and no GIL. A connection's first request that is anything else hands
// the connection over to the Python server (uvicorn, FastAPI: service/api/rest.py) on a
// private unix socket: the bytes read so far and everything after are relayed both ways
// unchanged, so every other route, every error and every limit stays defined in one place.
//
// A scheduler's connection that only asks locality questions stays native for its life; a
// connection that mixes in other requests goes to Python at its first other request.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "query_counts.hpp"

namespace kvc {

class DataPlane;

struct HttpFrontSettings {
    std::string host = "0.0.0.0";
    int port = 8080;               // 0 picks one
    std::string backend;           // the Python server's unix socket path
    uint64_t max_body_bytes = 8 << 20;
    uint64_t max_tokens = 131072;
    double weights[3] = {1.0, 0.8, 0.5};
    int threads = 2;
};

class HttpFront {
   public:
    HttpFront(const DataPlane& plane, HttpFrontSettings settings, std::vector<double> buckets);
    ~HttpFront();
    HttpFront(const HttpFront&) = delete;
    HttpFront& operator=(const HttpFront&) = delete;

    // Binds, listens and starts the threads; returns the bound port. Throws
    // std::runtime_error naming the address.
    int start();
    // Stops accepting; open connections get up to `grace_seconds` to finish what they are
    // doing, then close.
    void stop(double grace_seconds);

    FrontCounts counts() const { return counter_.counts(); }

   private:
    struct Connection;
    struct Worker;

    void run(Worker& worker);

    const DataPlane& plane_;
    const HttpFrontSettings settings_;
    QueryCounter counter_;
    int listener_ = -1;
    std::vector<std::unique_ptr<Worker>> workers_;
    std::vector<std::thread> threads_;
    std::atomic<bool> stopping_{false};
    std::atomic<double> close_by_{0};  // steady-clock seconds when open connections close
};

}  // namespace kvc
