// Latencies and hits of the queries a native front answers itself, for the query metrics
// (service/telemetry.py merges them with those answered in Python).
#pragma once

#include <cstdint>
#include <mutex>
#include <vector>

namespace kvc {

struct FrontCounts {
    std::vector<uint64_t> buckets;  // per bound, then +Inf (not cumulative)
    double seconds = 0;
    uint64_t queries = 0;
    uint64_t blocks = 0;      // prompt blocks asked about
    uint64_t hit_blocks = 0;  // blocks the best pod held
    uint64_t relayed = 0;     // requests passed to the Python server behind the front
};

class QueryCounter {
   public:
    explicit QueryCounter(std::vector<double> bounds) : bounds_(std::move(bounds)) {
        counts_.buckets.assign(bounds_.size() + 1, 0);
    }

    void observe(double seconds, uint64_t blocks, uint64_t hits) {
        size_t bucket = 0;
        while (bucket < bounds_.size() && seconds > bounds_[bucket]) {
            bucket++;
        }
        std::lock_guard<std::mutex> lock(mutex_);
        counts_.buckets[bucket]++;
        counts_.seconds += seconds;
        counts_.queries++;
        counts_.blocks += blocks;
        counts_.hit_blocks += hits;
    }

    void relayed() {
        std::lock_guard<std::mutex> lock(mutex_);
        counts_.relayed++;
    }

    FrontCounts counts() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return counts_;
    }

   private:
    const std::vector<double> bounds_;
    mutable std::mutex mutex_;
    FrontCounts counts_;
};

}  // namespace kvc
