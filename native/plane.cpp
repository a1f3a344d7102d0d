#include "plane.hpp"

#include "utf8.hpp"

#include <malloc.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <ctime>
#include <stdexcept>

namespace kvc {

namespace {

// Held frames per stream while its replay runs (service/dataplane/sequencing.py).
constexpr size_t kMaxPending = 10000;
constexpr uint32_t kMaxIdleReplays = 2;  // sequencing.py MAX_IDLE_REPLAYS
// DP ranks a stream may claim: more is a broken or hostile sender.
constexpr uint64_t kMaxRank = 1u << 16;
constexpr size_t kMaxWarnedTopics = 1000;
constexpr size_t kSweepBudget = 20000;
constexpr auto kSweepEvery = std::chrono::milliseconds(100);
constexpr uint64_t kTrimAfterBytes = 8u << 20;

const char* const kDropNames[kDropReasons] = {
    "msgpack",       "batch_shape",    "unknown_type", "event_shape",  "bad_hash",
    "bad_field",     "unknown_medium", "unknown_parent", "unmapped",   "bad_tokens",
    "unidentified",  "buffer_full",    "replay_buffer_full", "bad_frame", "pod_dropped",
    "limit",
};

double unix_now() {
    timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    return static_cast<double>(now.tv_sec) + static_cast<double>(now.tv_nsec) * 1e-9;
}

// "kv@<pod>@<model>" -> (pod, model); missing parts are empty (ingest.py, parse_topic).
void parse_topic(const std::string& topic, std::string& pod, std::string& model) {
    pod.clear();
    model.clear();
    size_t first = topic.find('@');
    if (first == std::string::npos) {
        return;
    }
    size_t second = topic.find('@', first + 1);
    if (second == std::string::npos) {
        pod = topic.substr(first + 1);
        return;
    }
    pod = topic.substr(first + 1, second - first - 1);
    model = topic.substr(second + 1);
}

}  // namespace

const char* const* drop_reason_names() { return kDropNames; }

DataPlane::DataPlane(PlaneSettings settings)
    : settings_(std::move(settings)),
      inbox_(settings_.buffer_bytes),
      index_(settings_.ttl_seconds, settings_.max_entries) {
    counts_.lag_counts.assign(settings_.lag_buckets.size() + 1, 0);
    notice_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (notice_fd_ < 0) {
        throw std::runtime_error(std::string("eventfd: ") + std::strerror(errno));
    }
    receiver_ = std::make_unique<Receiver>(inbox_, settings_.receiver);
}

DataPlane::~DataPlane() {
    stop(0);
    close(notice_fd_);
}

void DataPlane::configure_model(const std::string& name, const KeyingSettings& keying) {
    std::unique_lock<std::shared_mutex> lock(lock_);
    configured_[name] = keying;
    configured_[name].configured = true;
    model_id(name);
}

void DataPlane::start() {
    if (started_) {
        return;
    }
    started_ = true;
    applier_ = std::thread([this] { apply_loop(); });
}

void DataPlane::stop(double drain_seconds) {
    if (stopped_) {
        return;
    }
    stopped_ = true;
    receiver_->stop();
    if (started_) {
        auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration<double>(std::max(0.0, drain_seconds));
        while (inbox_.frames() != 0 && std::chrono::steady_clock::now() < deadline) {
            std::this_thread::sleep_for(std::chrono::milliseconds(5));
        }
        stopping_ = true;
        inbox_.close();
        applier_.join();
    }
}

std::vector<std::string> DataPlane::bind(const std::string& endpoint, uint32_t size) {
    return receiver_->bind(endpoint, size);
}

void DataPlane::connect(const std::string& pod_id, const std::string& endpoint,
                        const std::string& replay_endpoint, const std::string& model,
                        uint32_t size) {
    receiver_->connect(pod_id, endpoint, replay_endpoint, model, size);
}

void DataPlane::disconnect(const std::string& pod_id) { receiver_->disconnect(pod_id); }

void DataPlane::forget_pod(const std::string& pod_id, double at) {
    // At once, not through the inbox: the caller sees the pod gone when this returns.
    std::unique_lock<std::shared_mutex> lock(lock_);
    forget(pod_id, at);
}

void DataPlane::replay_done(uint64_t stream,
                            std::vector<std::pair<uint64_t, std::string>> batches, bool ok) {
    Command command{Command::kReplayDone};
    command.stream = stream;
    command.ok = ok;
    command.batches = std::move(batches);
    inbox_.command(std::move(command));
}

std::vector<Notice> DataPlane::take_notices() {
    uint64_t ignored;
    (void)!read(notice_fd_, &ignored, sizeof ignored);
    std::lock_guard<std::mutex> lock(notices_mutex_);
    std::vector<Notice> taken;
    taken.swap(notices_);
    return taken;
}

void DataPlane::notify(Notice&& notice) {
    bool first;
    {
        std::lock_guard<std::mutex> lock(notices_mutex_);
        first = notices_.empty();
        notices_.push_back(std::move(notice));
    }
    if (first) {
        uint64_t one = 1;
        (void)!write(notice_fd_, &one, sizeof one);
    }
}

Tick DataPlane::now_tick() const {
    double frozen = test_clock_;
    if (!std::isnan(frozen)) {
        return BlockIndex::tick_of(frozen);
    }
    auto since = std::chrono::steady_clock::now().time_since_epoch();
    return BlockIndex::tick_of(std::chrono::duration<double>(since).count());
}

// -- the applier thread ----------------------------------------------------------------

void DataPlane::apply_loop() {
    std::deque<Frame> frames;
    std::deque<Command> commands;
    auto next_sweep = std::chrono::steady_clock::now() + kSweepEvery;
    while (inbox_.take(frames, commands, kSweepEvery)) {
        for (Command& command : commands) {
            on_command(command);
        }
        commands.clear();
        for (Frame& frame : frames) {
            on_frame(frame);
        }
        frames.clear();
        // A burst's frames were malloc'd by the receiver and freed here: give the pages back
        // once it is over, or the process keeps a burst's worth of RSS for good.
        if (inbox_.drained_peak() >= kTrimAfterBytes) {
            malloc_trim(0);
        }
        if (std::chrono::steady_clock::now() >= next_sweep) {
            sweep();
            next_sweep = std::chrono::steady_clock::now() + kSweepEvery;
        }
    }
}

void DataPlane::sweep() {
    // Small steps with the lock let go between them, so no lookup waits on a big expiry.
    for (int step = 0; step < 100 && !stopping_; step++) {
        std::unique_lock<std::shared_mutex> lock(lock_);
        if (index_.sweep(now_tick(), kSweepBudget) < kSweepBudget) {
            return;
        }
    }
}

void DataPlane::apply_frame_for_test(Frame&& frame) {
    if (started_) {
        throw std::logic_error("apply_frame_for_test runs before start()");
    }
    on_frame(frame);
}

void DataPlane::on_frame(Frame& frame) {
    if (frame.dropped) {
        std::unique_lock<std::shared_mutex> lock(lock_);
        overflowed(frame.topic);
        return;
    }
    const Source& source = *frame.source;
    std::string pod_id, model;
    // Topics name pods and models: garbage is refused, not mangled.
    bool named = valid_utf8(frame.topic);
    if (named) {
        parse_topic(frame.topic, pod_id, model);
        if (!source.pod_id.empty()) {
            pod_id = source.pod_id;
        }
        if (model.empty()) {
            model = source.model;
        }
    }
    if (!named || pod_id.empty() || model.empty()) {
        std::unique_lock<std::shared_mutex> lock(lock_);
        count(Drop::kUnidentified);
        if (warned_topics_.size() < kMaxWarnedTopics && warned_topics_.insert(frame.topic).second) {
            notify(Notice{Notice::kUnidentified, 0, "", 0, "", frame.topic});
        }
        return;
    }
    // Decoding needs no lock: lookups go on meanwhile.
    bool decoded = decode_batch(frame.payload, batch_);
    std::unique_lock<std::shared_mutex> lock(lock_);
    auto forgotten = forgotten_.find(pod_id);
    if (forgotten != forgotten_.end()) {
        if (frame.received <= forgotten->second) {
            count(Drop::kPodDropped);
            return;
        }
        forgotten_.erase(forgotten);
    }
    count_decoded(decoded);
    uint64_t rank = source.rank;
    if (decoded && batch_.has_rank) {
        rank = batch_.rank;
    }
    counts_.batches_live++;
    if (rank >= kMaxRank) {
        count(Drop::kLimit);
        return;
    }
    Stream* stream = stream_for(pod_id, static_cast<uint32_t>(rank), model_id(model), frame.seq);
    if (stream == nullptr) {
        count(Drop::kLimit);
        return;
    }
    stream->last_time = frame.received;
    std::string endpoint = source.replay_endpoint.empty()
                               ? replay_endpoint_for(pod_id, static_cast<uint32_t>(rank))
                               : source.replay_endpoint;
    if (stream->replay_endpoint != endpoint) {
        stream->replay_endpoint = endpoint;
    }
    if (stream->replaying) {
        hold(*stream, frame.seq, frame.payload, decoded);
        return;
    }
    sequence(*stream, frame.seq, decoded, frame.payload, endpoint, false, true, frame.received);
}

void DataPlane::count_decoded(bool decoded) {
    if (!decoded) {
        count(batch_.error == BatchError::kMsgpack ? Drop::kMsgpack : Drop::kBatchShape);
        return;
    }
    for (int reason = 0; reason < kEventSkipCount; reason++) {
        counts_.drops[static_cast<int>(Drop::kUnknownType) + reason] += batch_.skipped[reason];
    }
}

uint16_t DataPlane::model_id(const std::string& name) {
    auto found = model_ids_.find(name);
    if (found != model_ids_.end()) {
        return found->second;
    }
    auto settings = configured_.find(name);
    KeyingSettings keying = settings == configured_.end() ? KeyingSettings{} : settings->second;
    uint16_t id = index_.add_model(name);
    models_.push_back(std::make_unique<ModelKeying>(name, keying, settings_.max_engine_hashes,
                                                    settings_.max_parents));
    model_ids_.emplace(name, id);
    return id;
}

DataPlane::Stream* DataPlane::stream_for(const std::string& pod_id, uint32_t rank,
                                         uint16_t model, uint64_t seq) {
    auto key = std::make_pair(pod_id, rank);
    auto found = streams_.find(key);
    if (found == streams_.end()) {
        if (streams_.size() >= BlockIndex::kMaxSlots - 1) {
            return nullptr;
        }
        auto stream = std::make_unique<Stream>();
        stream->serial = next_serial_++;
        stream->pod_id = pod_id;
        stream->rank = rank;
        stream->model = model;
        stream->slot = index_.add_slot(model, pod_id, rank);
        by_serial_[stream->serial] = stream.get();
        by_slot_[stream->slot] = stream.get();
        auto overflowed = unseen_overflows_.find(pod_id);
        if (overflowed != unseen_overflows_.end()) {
            stream->dropped += overflowed->second;
            stream->resync = true;
            unseen_overflows_.erase(overflowed);
        }
        Notice notice{Notice::kStreamSeen, stream->serial, pod_id, rank,
                      models_[model]->name(), "", seq};
        found = streams_.emplace(key, std::move(stream)).first;
        notify(std::move(notice));
    }
    Stream& stream = *found->second;
    if (stream.model != model) {
        // The pod now serves another model (an IP reused by a new engine): what it held for
        // the old one is gone.
        notify(Notice{Notice::kModelChanged, stream.serial, pod_id, rank, models_[model]->name(),
                      models_[stream.model]->name()});
        by_slot_.erase(stream.slot);
        index_.release_slot(stream.slot);
        stream.model = model;
        stream.slot = index_.add_slot(model, pod_id, rank);
        by_slot_[stream.slot] = &stream;
    }
    return &stream;
}

std::string DataPlane::replay_endpoint_for(const std::string& pod_id, uint32_t rank) const {
    auto found = settings_.replay_endpoints.find(pod_id);
    if (found == settings_.replay_endpoints.end()) {
        return "";
    }
    try {
        return offset_port(found->second, rank);
    } catch (const std::invalid_argument&) {
        return "";
    }
}

// CONTRACT.md section 6; the Python twin is sequencing.py's StreamSequencer.sequence.
void DataPlane::sequence(Stream& stream, uint64_t seq, bool decoded, std::string& payload,
                         const std::string& endpoint, bool gap_counted, bool live,
                         double received) {
    bool can_replay = settings_.replay && !endpoint.empty();
    if (!stream.has_last) {
        if (can_replay) {
            start_replay(stream, endpoint, 0);
            hold(stream, seq, payload, decoded);
            return;
        }
    } else if (seq > stream.last_seq + 1) {
        if (!gap_counted) {
            stream.gaps++;
            notify(Notice{Notice::kGap, stream.serial, stream.pod_id, stream.rank, "", "",
                          stream.last_seq + 1, seq});
        }
        stream.resync = false;
        if (can_replay) {
            start_replay(stream, endpoint, stream.last_seq + 1);
            hold(stream, seq, payload, decoded);
            return;
        }
        stream.lost += seq - stream.last_seq - 1;
    } else if (seq <= stream.last_seq) {
        // A batch the replay already brought, still in flight or queued when it answered:
        // the engine stamped it no later than the last one replayed. A restarted engine
        // starts its numbers again, but its batches are newer than any replayed.
        if (stream.replayed && seq <= stream.replayed_through &&
            (decoded ? batch_.ts <= stream.replayed_ts : received <= stream.replay_applied_at)) {
            return;
        }
        stream.restarts++;
        notify(Notice{Notice::kRestart, stream.serial, stream.pod_id, stream.rank, "", "",
                      stream.last_seq, seq});
        index_.clear(stream.slot);
        stream.has_last = false;
        stream.resync = false;
        if (can_replay) {
            start_replay(stream, endpoint, 0);
            hold(stream, seq, payload, decoded);
            return;
        }
    }
    apply(stream, seq, decoded, live);
}

void DataPlane::start_replay(Stream& stream, const std::string& endpoint, uint64_t from) {
    stream.replaying = true;
    stream.replays++;
    stream.replay_endpoint = endpoint;
    stream.dropped_in_replay = false;
    notify(Notice{Notice::kReplay, stream.serial, stream.pod_id, stream.rank,
                  models_[stream.model]->name(), endpoint, from});
}

void DataPlane::hold(Stream& stream, uint64_t seq, std::string& payload, bool decoded) {
    if (stream.pending.size() >= kMaxPending) {
        count(Drop::kReplayBufferFull);
        return;
    }
    stream.pending.push_back(Held{seq, std::move(payload), decoded});
}

void DataPlane::apply(Stream& stream, uint64_t seq, bool decoded, bool live) {
    stream.has_last = true;
    stream.last_seq = seq;
    stream.batches++;
    if (!decoded || batch_.events.empty()) {
        return;
    }
    ModelKeying& keying = *models_[stream.model];
    uint64_t skips[kTranslateSkipCount] = {};
    Tick now = now_tick();
    for (const Event& event : batch_.events) {
        counts_.events[static_cast<int>(event.kind)]++;
        IndexOp op;
        uint64_t mismatches = keying.translate(batch_, event, keys_, op, skips);
        if (mismatches != 0 && mismatch_reported_.insert(stream.model).second) {
            notify(Notice{Notice::kHashMismatch, stream.serial, stream.pod_id, stream.rank,
                          keying.name()});
        }
        switch (op.kind) {
            case IndexOp::kStore:
                index_.store(stream.slot, op.keys, op.count, op.tier, now);
                break;
            case IndexOp::kRemove:
                index_.remove(stream.slot, op.keys, op.count, op.tier, now);
                break;
            case IndexOp::kClear:
                index_.clear(stream.slot);
                break;
            case IndexOp::kNothing:
                break;
        }
    }
    // Per batch, as a networked index applies one batch per round trip.
    index_.enforce_capacity();
    for (int reason = 0; reason < kTranslateSkipCount; reason++) {
        counts_.drops[static_cast<int>(Drop::kUnknownParent) + reason] += skips[reason];
    }
    if (live) {  // a replayed batch is late by design: its lag says nothing of the stream
        stream.lag = std::max(0.0, unix_now() - batch_.ts);
        observe_lag(stream.lag);
    }
}

void DataPlane::observe_lag(double lag) {
    size_t bucket = 0;
    while (bucket < settings_.lag_buckets.size() && lag > settings_.lag_buckets[bucket]) {
        bucket++;
    }
    counts_.lag_counts[bucket]++;
    counts_.lag_sum += lag;
}

// -- commands --------------------------------------------------------------------------

void DataPlane::on_command(Command& command) {
    std::unique_lock<std::shared_mutex> lock(lock_);
    switch (command.kind) {
        case Command::kReplayDone: {
            auto found = by_serial_.find(command.stream);
            if (found != by_serial_.end() && found->second->replaying) {
                found->second->replaying = !apply_replay(*found->second, command);
            }
            break;
        }
    }
}

// sequencing.py's StreamSequencer._apply_replay: replayed batches, then the live frames held
// meanwhile, in order. Another replay starts when frames dropped after the engine answered
// leave a gap this one cannot fill.
bool DataPlane::apply_replay(Stream& stream, Command& command) {
    uint64_t applied = 0;
    for (auto& [seq, payload] : command.batches) {
        if (stream.has_last && seq <= stream.last_seq) {
            continue;
        }
        if (stream.has_last && seq > stream.last_seq + 1) {
            stream.lost += seq - stream.last_seq - 1;
        }
        counts_.batches_replay++;
        bool decoded = decode_batch(payload, batch_);
        count_decoded(decoded);
        apply(stream, seq, decoded, false);
        applied++;
        stream.replayed = true;
        stream.replayed_through = seq;
        if (decoded) {
            stream.replayed_ts = std::max(stream.replayed_ts, batch_.ts);
        }
    }
    stream.idle_replays = applied != 0 ? 0 : stream.idle_replays + 1;
    bool replay_again = command.ok && !stream.replay_endpoint.empty() &&
                        stream.idle_replays < kMaxIdleReplays;
    // Live frames sent before the engine answered may still be queued behind this; they
    // carry sequence numbers at or below what the replay brought, and are not a restart.
    stream.replay_applied_at = unix_now();
    // The first held frame is the one that started the replay: its gap was counted then.
    // A frame numbered below the one before it is an engine restart, never a duplicate.
    bool first = true;
    bool has_previous = false;
    uint64_t previous = 0;
    while (!stream.pending.empty()) {
        Held& front = stream.pending.front();
        bool restarted = has_previous && front.seq < previous;
        has_previous = true;
        previous = front.seq;
        if (!restarted && stream.has_last && front.seq <= stream.last_seq) {
            stream.pending.pop_front();
            first = false;
            continue;  // the replay already brought it
        }
        if (replay_again && !restarted && stream.has_last && front.seq > stream.last_seq + 1) {
            if (!first) {
                stream.gaps++;
            }
            start_replay(stream, stream.replay_endpoint, stream.last_seq + 1);
            return false;
        }
        Held held = std::move(front);
        stream.pending.pop_front();
        // Its decode errors were counted when it arrived.
        bool decoded = held.decoded && decode_batch(held.payload, batch_);
        sequence(stream, held.seq, decoded, held.payload, "", first, true, 0);
        first = false;
    }
    if (stream.dropped_in_replay && replay_again && stream.has_last) {
        start_replay(stream, stream.replay_endpoint, stream.last_seq + 1);
        return false;
    }
    return true;
}

void DataPlane::forget(const std::string& pod_id, double at) {
    forgotten_[pod_id] = at;
    for (auto it = streams_.begin(); it != streams_.end();) {
        if (it->first.first != pod_id) {
            ++it;
            continue;
        }
        Stream& stream = *it->second;
        by_serial_.erase(stream.serial);
        by_slot_.erase(stream.slot);
        index_.release_slot(stream.slot);
        it = streams_.erase(it);
    }
}

void DataPlane::overflowed(const std::string& pod_id) {
    receiver_->acknowledge_overflow(pod_id);
    notify(Notice{Notice::kOverflow, 0, pod_id});
    bool tracked = false;
    for (auto& [key, stream] : streams_) {
        tracked = tracked || key.first == pod_id;
    }
    if (!tracked) {
        // Its first frames were the ones dropped: the stream, when it comes, starts flagged.
        if (unseen_overflows_.size() < kMaxWarnedTopics || unseen_overflows_.count(pod_id)) {
            unseen_overflows_[pod_id]++;
        }
        return;
    }
    for (auto& [key, stream] : streams_) {
        if (key.first != pod_id) {
            continue;
        }
        stream->dropped++;
        if (stream->replaying) {
            stream->dropped_in_replay = true;
            continue;
        }
        // A replay from where it stands recovers what was dropped, even when nothing
        // follows to show the gap; without a replay endpoint the pod is flagged until a gap
        // settles it.
        std::string endpoint = stream->replay_endpoint.empty()
                                   ? replay_endpoint_for(stream->pod_id, stream->rank)
                                   : stream->replay_endpoint;
        if (settings_.replay && !endpoint.empty() && stream->has_last) {
            start_replay(*stream, endpoint, stream->last_seq + 1);
        } else {
            stream->resync = true;
        }
    }
}

// -- lookups ---------------------------------------------------------------------------

void DataPlane::score(const std::vector<SlotMatch>& matches, uint64_t total,
                      const Weights& weights, Answer& answer) const {
    double best[1 << kTiers];
    for (unsigned set = 0; set < (1u << kTiers); set++) {
        best[set] = 0;
        for (int t = 0; t < kTiers; t++) {
            if (set & (1u << t)) {
                best[set] = std::max(best[set], weights.tier[t]);
            }
        }
    }
    answer.pods.clear();
    for (const SlotMatch& match : matches) {
        if (match.block_count == 0) {
            continue;
        }
        auto stream = by_slot_.find(match.slot);
        if (stream == by_slot_.end()) {
            continue;
        }
        PodAnswer pod{stream->second->pod_id, stream->second->rank, match.match_length,
                      match.block_count, {0, 0, 0}, 0.0};
        double weighted = 0;
        // In ascending tier-set order, as scoring.py sums them: the same float every time.
        for (unsigned set = 1; set < (1u << kTiers); set++) {
            uint32_t n = match.prefix_tier_sets[set];
            weighted += best[set] * n;
            for (int t = 0; t < kTiers; t++) {
                if (set & (1u << t)) {
                    pod.tiers[t] += n;
                }
            }
        }
        pod.score = total == 0 ? 0.0 : std::min(1.0, weighted / static_cast<double>(total));
        answer.pods.push_back(std::move(pod));
    }
    std::sort(answer.pods.begin(), answer.pods.end(), [](const PodAnswer& a, const PodAnswer& b) {
        if (a.score != b.score) {
            return a.score > b.score;
        }
        if (a.pod_id != b.pod_id) {
            return a.pod_id < b.pod_id;
        }
        return a.rank < b.rank;
    });
}

void DataPlane::locality_tokens(const std::string& model, const uint32_t* tokens, size_t count,
                                std::optional<std::string_view> lora,
                                std::optional<std::string_view> salt, const Weights& weights,
                                Answer& answer) const {
    thread_local std::vector<uint64_t> keys;
    thread_local std::vector<SlotMatch> matches;
    std::shared_lock<std::shared_mutex> lock(lock_);
    answer = Answer{};
    auto found = model_ids_.find(model);
    if (found == model_ids_.end()) {
        return;
    }
    const ModelKeying& keying = *models_[found->second];
    answer.known_model = true;
    answer.block_size = keying.block_size();
    keying.query_keys(tokens, count, lora, salt, keys);
    answer.keys = keys.size();
    if (keys.empty()) {
        return;
    }
    index_.lookup(found->second, keys.data(), keys.size(), now_tick(), {}, matches);
    score(matches, keys.size(), weights, answer);
}

void DataPlane::locality_hashes(const std::string& model, const uint64_t* hashes, size_t count,
                                const Weights& weights, Answer& answer) const {
    thread_local std::vector<uint64_t> keys;
    thread_local std::vector<SlotMatch> matches;
    std::shared_lock<std::shared_mutex> lock(lock_);
    answer = Answer{};
    auto found = model_ids_.find(model);
    if (found == model_ids_.end()) {
        return;
    }
    const ModelKeying& keying = *models_[found->second];
    answer.known_model = true;
    answer.block_size = keying.block_size();
    keying.keys_of_engine_hashes(hashes, count, keys);
    answer.keys = keys.size();
    if (keys.empty()) {
        return;
    }
    index_.lookup(found->second, keys.data(), keys.size(), now_tick(), {}, matches);
    // The score is over the chain as asked, not the part of it that resolved.
    score(matches, count, weights, answer);
}

std::optional<uint64_t> DataPlane::block_size(const std::string& model) const {
    std::shared_lock<std::shared_mutex> lock(lock_);
    auto found = model_ids_.find(model);
    if (found == model_ids_.end()) {
        return std::nullopt;
    }
    return models_[found->second]->block_size();
}

// -- status ----------------------------------------------------------------------------

std::vector<StreamStatus> DataPlane::streams() const {
    std::shared_lock<std::shared_mutex> lock(lock_);
    std::vector<StreamStatus> out;
    out.reserve(streams_.size());
    for (const auto& [key, stream] : streams_) {
        out.push_back(StreamStatus{stream->serial, stream->pod_id, stream->rank,
                                   models_[stream->model]->name(), index_.slot_entries(stream->slot),
                                   stream->replaying, stream->resync, stream->has_last,
                                   stream->last_seq, stream->last_time, stream->lag,
                                   stream->batches, stream->gaps, stream->lost, stream->replays,
                                   stream->restarts, stream->dropped});
    }
    return out;
}

std::vector<ModelStatus> DataPlane::models() const {
    std::shared_lock<std::shared_mutex> lock(lock_);
    std::vector<ModelStatus> out;
    for (size_t id = 0; id < models_.size(); id++) {
        const ModelKeying& keying = *models_[id];
        uint64_t blocks = 0, pods = 0;
        for (const auto& [key, stream] : streams_) {
            if (stream->model == id) {
                blocks += index_.slot_entries(stream->slot);
                pods++;
            }
        }
        out.push_back(ModelStatus{keying.name(),
                                  keying.mode() == KeyMode::kTokens ? "tokens" : "vllm",
                                  keying.configured(), keying.block_size(), blocks, pods,
                                  keying.hash_matches(), keying.hash_mismatches(),
                                  keying.engine_hashes_known()});
    }
    return out;
}

PlaneCounts DataPlane::counts() const {
    PlaneCounts out;
    {
        std::shared_lock<std::shared_mutex> lock(lock_);
        out = counts_;
        out.index = index_.stats();
    }
    out.inbox_frames = inbox_.frames();
    out.inbox_bytes = inbox_.bytes();
    out.inbox_max_bytes = inbox_.max_bytes();
    ReceiverCounts received = receiver_->counts();
    out.received_frames = received.frames;
    out.drops[static_cast<int>(Drop::kBufferFull)] += received.dropped;
    out.drops[static_cast<int>(Drop::kBadFrame)] += received.bad_frames;
    return out;
}

ReceiverCounts DataPlane::receiver_counts() const { return receiver_->counts(); }

}  // namespace kvc
