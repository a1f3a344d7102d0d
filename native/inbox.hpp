// What the applier thread works through: live frames from the receiver, in arrival order,
// bounded by bytes, and commands from the control plane (Python), which go first.
#pragma once

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace kvc {

// What the receiving socket knows about the sender (service/events/subscriber.py, Source).
struct Source {
    std::string pod_id;           // connect mode: the configured pod; empty in bind mode
    std::string model;            // connect mode: the pod entry's model, if any
    uint32_t rank = 0;            // bind: the port's offset; connect: the socket's rank
    std::string replay_endpoint;  // connect mode, this rank's; empty: none
};

struct Frame {
    std::shared_ptr<const Source> source;
    std::string topic;
    uint64_t seq = 0;
    std::string payload;
    double received = 0;  // unix seconds
    bool dropped = false;  // a marker: frames of the pod `topic` were dropped here
};

struct Command {
    enum Kind : uint8_t { kReplayDone } kind;
    uint64_t stream = 0;   // kReplayDone: the stream's serial number
    bool ok = false;       // kReplayDone: whether the fetch succeeded
    std::vector<std::pair<uint64_t, std::string>> batches;  // kReplayDone: (seq, payload)
};

class Inbox {
   public:
    explicit Inbox(uint64_t max_bytes) : max_bytes_(max_bytes) {}

    // False (and nothing queued) when the frame would take the buffer past its bound.
    bool push(Frame&& frame) {
        std::lock_guard<std::mutex> lock(mutex_);
        uint64_t size = frame.payload.size() + frame.topic.size() + kOverhead;
        if (bytes_ + size > max_bytes_) {
            return false;
        }
        bytes_ += size;
        peak_bytes_ = std::max(peak_bytes_, bytes_);
        frames_.push_back(std::move(frame));
        if (frames_.size() == 1) {
            wake_.notify_one();
        }
        return true;
    }

    // Past the bound too: for markers, one per pod between its frames.
    void push_unbounded(Frame&& frame) {
        std::lock_guard<std::mutex> lock(mutex_);
        bytes_ += frame.payload.size() + frame.topic.size() + kOverhead;
        peak_bytes_ = std::max(peak_bytes_, bytes_);
        frames_.push_back(std::move(frame));
        if (frames_.size() == 1) {
            wake_.notify_one();
        }
    }

    void command(Command&& command) {
        std::lock_guard<std::mutex> lock(mutex_);
        commands_.push_back(std::move(command));
        wake_.notify_one();
    }

    void close() {
        std::lock_guard<std::mutex> lock(mutex_);
        closed_ = true;
        wake_.notify_all();
    }

    // Waits up to `timeout` for work; moves out what there is. Returns false once closed
    // and empty.
    template <class Rep, class Period>
    bool take(std::deque<Frame>& frames, std::deque<Command>& commands,
              std::chrono::duration<Rep, Period> timeout) {
        std::unique_lock<std::mutex> lock(mutex_);
        if (frames_.empty() && commands_.empty() && !closed_) {
            wake_.wait_for(lock, timeout);
        }
        commands.swap(commands_);
        // A bounded slice of frames, so commands (a replay's end, a pod dropped) are not
        // kept waiting behind a long backlog.
        size_t count = std::min<size_t>(frames_.size(), kSlice);
        for (size_t i = 0; i < count; i++) {
            bytes_ -= frames_.front().payload.size() + frames_.front().topic.size() + kOverhead;
            frames.push_back(std::move(frames_.front()));
            frames_.pop_front();
        }
        return !(closed_ && frames.empty() && commands.empty());
    }

    uint64_t bytes() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return bytes_;
    }
    uint64_t frames() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return frames_.size();
    }
    uint64_t max_bytes() const { return max_bytes_; }

    // The most bytes held at once since the last call, when nothing is held now; else 0.
    uint64_t drained_peak() {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!frames_.empty()) {
            return 0;
        }
        uint64_t peak = peak_bytes_;
        peak_bytes_ = 0;
        return peak;
    }

   private:
    static constexpr uint64_t kOverhead = sizeof(Frame);
    static constexpr size_t kSlice = 256;

    const uint64_t max_bytes_;
    mutable std::mutex mutex_;
    std::condition_variable wake_;
    std::deque<Frame> frames_;
    std::deque<Command> commands_;
    uint64_t bytes_ = 0;
    uint64_t peak_bytes_ = 0;
    bool closed_ = false;
};

}  // namespace kvc
