// The native data plane: from received frames to index writes on threads of its own, and
// lookups that run beside them (docs/design.md, "The native data plane").
//
//   receiver thread   transport.hpp: drains the SUB sockets into the inbox (bounded by bytes)
//   applier thread    this file: decode, identify, sequence, key, write the index
//   callers           lookups and snapshots, from any thread, under a shared lock
//
// Per (pod, DP rank) stream it follows CONTRACT.md section 6 exactly as the Python data
// plane does (service/dataplane/sequencing.py is the twin): replay from 0 on first contact
// when the pod has a replay endpoint, replay from last + 1 on a gap, clear and replay from 0
// when the sequence goes back (the engine restarted); frames arriving meanwhile wait and
// apply after the replay. The decisions that need the outside world are the control plane's
// (Python): the plane hands it notices (a stream seen, a gap, a replay to fetch, a
// misconfigured hash...) through a queue signalled on an eventfd, and takes back commands
// (the replayed batches, a pod to forget). Nothing here touches Python objects.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <shared_mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "decode.hpp"
#include "inbox.hpp"
#include "index.hpp"
#include "keying.hpp"
#include "transport.hpp"

namespace kvc {

// Every reason something is counted and skipped (the metric kv_cache_event_decode_errors),
// in the order of drop_reason_names().
enum class Drop : uint8_t {
    kMsgpack,
    kBatchShape,
    kUnknownType,
    kEventShape,
    kBadHash,
    kBadField,
    kUnknownMedium,
    kUnknownParent,
    kUnmapped,
    kBadTokens,
    kUnidentified,
    kBufferFull,
    kReplayBufferFull,
    kBadFrame,
    kPodDropped,
    kLimit,
    kCount
};
constexpr int kDropReasons = static_cast<int>(Drop::kCount);
const char* const* drop_reason_names();

struct PlaneSettings {
    double ttl_seconds = 3600;
    uint64_t max_entries = 1000000;
    uint64_t max_engine_hashes = 1000000;  // per model, tokens mode
    uint64_t max_parents = 1000000;        // per model, vllm mode's digest memory
    uint64_t buffer_bytes = 256ull << 20;
    ReceiverSettings receiver;
    bool replay = true;  // whether gaps and first contacts are replayed where possible
    // Bind mode: pod id -> its replay endpoint (rank 0; rank r on port + r).
    std::map<std::string, std::string> replay_endpoints;
    std::vector<double> lag_buckets;  // upper bounds of the visible-lag histogram, seconds
};

struct Notice {
    enum Kind : uint8_t {
        kStreamSeen,    // pod_id, rank, model, seq
        kModelChanged,  // pod_id, rank, model (new), text (old)
        kGap,           // pod_id, rank, seq (expected), other (got)
        kRestart,       // pod_id, rank, seq (last), other (got)
        kReplay,        // stream, pod_id, rank, text (endpoint), seq (from)
        kUnidentified,  // text (topic), once per topic
        kHashMismatch,  // pod_id, rank, model: the model's first mismatch
        kOverflow,      // pod_id: frames dropped, the inbox was full
    } kind;
    uint64_t stream = 0;
    std::string pod_id;
    uint32_t rank = 0;
    std::string model;
    std::string text;
    uint64_t seq = 0;
    uint64_t other = 0;
};

struct PodAnswer {
    std::string pod_id;
    uint32_t rank;
    uint32_t match_length;
    uint32_t block_count;
    uint32_t tiers[kTiers];  // blocks of the matched prefix per tier
    double score;
};

struct Answer {
    bool known_model = false;
    uint64_t block_size = 0;  // 0: not learnt yet
    uint64_t keys = 0;        // full blocks keyed (hash queries: resolved)
    std::vector<PodAnswer> pods;  // by score, then pod id, then rank
};

struct Weights {
    double tier[kTiers] = {1.0, 0.8, 0.5};
};

struct StreamStatus {
    uint64_t serial;
    std::string pod_id;
    uint32_t rank;
    std::string model;
    uint64_t blocks;
    bool replaying;
    bool resync;  // frames were dropped (full inbox) and not yet recovered
    bool has_last_seq;
    uint64_t last_seq;
    double last_time;  // unix seconds of its last frame; 0: none
    double lag;        // now - engine timestamp of its last live batch
    uint64_t batches, gaps, lost, replays, restarts, dropped;
};

struct ModelStatus {
    std::string name;
    std::string key_mode;
    bool configured;
    uint64_t block_size;
    uint64_t blocks;
    uint64_t pods;
    uint64_t hash_matches, hash_mismatches;
    uint64_t engine_hashes;
};

struct PlaneCounts {
    uint64_t drops[kDropReasons] = {};
    uint64_t events[3] = {};            // BlockStored, BlockRemoved, AllBlocksCleared
    uint64_t batches_live = 0, batches_replay = 0;
    std::vector<uint64_t> lag_counts;  // per bucket, then +Inf
    double lag_sum = 0;
    uint64_t inbox_frames = 0, inbox_bytes = 0, inbox_max_bytes = 0;
    uint64_t received_frames = 0;
    IndexStats index;
};

class DataPlane {
   public:
    explicit DataPlane(PlaneSettings settings);
    ~DataPlane();
    DataPlane(const DataPlane&) = delete;
    DataPlane& operator=(const DataPlane&) = delete;

    // Configured models (before any event names them); others get tokens mode.
    void configure_model(const std::string& name, const KeyingSettings& keying);
    void start();
    // Stops receiving, applies what is queued for up to `drain_seconds`, ends the threads.
    void stop(double drain_seconds);

    std::vector<std::string> bind(const std::string& endpoint, uint32_t data_parallel_size);
    void connect(const std::string& pod_id, const std::string& endpoint,
                 const std::string& replay_endpoint, const std::string& model,
                 uint32_t data_parallel_size);
    void disconnect(const std::string& pod_id);

    // Control plane -> applier.
    void forget_pod(const std::string& pod_id, double at);
    void replay_done(uint64_t stream, std::vector<std::pair<uint64_t, std::string>> batches,
                     bool ok);

    // Applier -> control plane. The fd is readable while notices wait.
    int notice_fd() const { return notice_fd_; }
    std::vector<Notice> take_notices();

    // Lookups: any thread, concurrently with ingest.
    void locality_tokens(const std::string& model, const uint32_t* tokens, size_t count,
                         std::optional<std::string_view> lora,
                         std::optional<std::string_view> salt, const Weights& weights,
                         Answer& answer) const;
    void locality_hashes(const std::string& model, const uint64_t* hashes, size_t count,
                         const Weights& weights, Answer& answer) const;
    std::optional<uint64_t> block_size(const std::string& model) const;

    std::vector<StreamStatus> streams() const;
    std::vector<ModelStatus> models() const;
    PlaneCounts counts() const;
    ReceiverCounts receiver_counts() const;

    // For tests: apply one frame as if received, synchronously, on the caller's thread.
    // Only before start().
    void apply_frame_for_test(Frame&& frame);
    // For tests: the monotonic clock the index stamps and expires by, in seconds; NaN goes
    // back to the real one.
    void set_clock_for_test(double seconds) { test_clock_ = seconds; }

   private:
    struct Held {
        uint64_t seq;
        std::string payload;
        bool decoded;  // false: it failed to decode (and was counted) when it arrived
    };
    struct Stream {
        uint64_t serial;
        std::string pod_id;
        uint32_t rank;
        uint16_t model;
        uint16_t slot;
        bool has_last = false;
        uint64_t last_seq = 0;
        double last_time = 0;
        double lag = 0;
        uint64_t batches = 0, gaps = 0, lost = 0, replays = 0, restarts = 0, dropped = 0;
        bool replaying = false;
        bool resync = false;
        bool replayed = false;         // a replay has applied batches, up to:
        uint64_t replayed_through = 0;
        double replayed_ts = 0;        // the newest engine timestamp among replayed batches
        double replay_applied_at = 0;  // unix seconds when the last replay was applied
        bool dropped_in_replay = false;  // the replay may have answered before they were sent
        uint32_t idle_replays = 0;       // replays in a row that brought nothing new
        std::deque<Held> pending;
        std::string replay_endpoint;  // of its last frame's socket or the configuration
    };

    void apply_loop();
    void on_frame(Frame& frame);
    void on_command(Command& command);
    void sweep();

    void count_decoded(bool decoded);  // batch_'s errors and skipped events
    uint16_t model_id(const std::string& name);
    Stream* stream_for(const std::string& pod_id, uint32_t rank, uint16_t model, uint64_t seq);
    // `received`: when a live frame arrived (0 for a held one, which apply_replay orders).
    void sequence(Stream& stream, uint64_t seq, bool decoded, std::string& payload,
                  const std::string& endpoint, bool gap_counted, bool live, double received);
    void apply(Stream& stream, uint64_t seq, bool decoded, bool live);
    void start_replay(Stream& stream, const std::string& endpoint, uint64_t from);
    void hold(Stream& stream, uint64_t seq, std::string& payload, bool decoded);
    // False when it started another replay instead of finishing.
    bool apply_replay(Stream& stream, Command& command);
    void forget(const std::string& pod_id, double at);
    void overflowed(const std::string& pod_id);
    void notify(Notice&& notice);
    void count(Drop reason, uint64_t n = 1) { counts_.drops[static_cast<int>(reason)] += n; }
    void observe_lag(double lag);
    std::string replay_endpoint_for(const std::string& pod_id, uint32_t rank) const;
    Tick now_tick() const;
    void score(const std::vector<SlotMatch>& matches, uint64_t total, const Weights& weights,
               Answer& answer) const;

    const PlaneSettings settings_;
    Inbox inbox_;
    std::unique_ptr<Receiver> receiver_;

    // Guards everything below it that lookups and snapshots read.
    mutable std::shared_mutex lock_;
    BlockIndex index_;
    std::vector<std::unique_ptr<ModelKeying>> models_;  // by index model id
    std::unordered_map<std::string, uint16_t> model_ids_;
    std::map<std::string, KeyingSettings> configured_;
    std::map<std::pair<std::string, uint32_t>, std::unique_ptr<Stream>> streams_;
    std::unordered_map<uint64_t, Stream*> by_serial_;
    std::unordered_map<uint16_t, Stream*> by_slot_;
    PlaneCounts counts_;

    std::unordered_map<std::string, double> forgotten_;  // pod -> frames up to then are stale
    std::unordered_map<std::string, uint64_t> unseen_overflows_;  // drops before a stream

    // The applier's own.
    uint64_t next_serial_ = 1;
    std::set<std::string> warned_topics_;
    std::set<uint16_t> mismatch_reported_;
    Batch batch_;
    std::vector<uint64_t> keys_;

    mutable std::mutex notices_mutex_;
    std::vector<Notice> notices_;
    int notice_fd_;

    std::atomic<double> test_clock_{std::numeric_limits<double>::quiet_NaN()};
    std::atomic<bool> stopping_{false};
    bool started_ = false;
    bool stopped_ = false;
    std::thread applier_;
};

}  // namespace kvc
