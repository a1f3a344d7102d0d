// The receiving end of vLLM's live KV-event stream: ZeroMQ SUB sockets, drained by one
// thread of their own into the applier's inbox (the Python twin is
// service/events/subscriber.py).
//
// Draining is all this thread does, so the sockets stay empty even while the applier works
// through a burst: ZeroMQ drops frames silently once a subscriber's queue is full, and that
// is the loss this design exists to prevent. A frame the inbox has no room for is dropped
// here instead, counted per pod with a reason, and reported to the applier so the pod is
// resynced.
//
// Bind mode: the service binds an endpoint (plus port + r for DP rank r) and engines
// connect; the topic names the sender. Connect mode: the service connects to each
// engine's PUB socket (rank r on port + r) and the configured pod id names the sender.
// Socket changes are asked from any thread and carried out by the receiving thread, the only
// one that touches the sockets.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "inbox.hpp"

namespace kvc {

struct ReceiverSettings {
    std::string topic_filter = "kv@";
    int64_t max_frame_bytes = 64 << 20;  // ZMQ_MAXMSGSIZE: larger frames never reach us
    int receive_hwm = 100000;            // ZMQ_RCVHWM, frames queued inside ZeroMQ
};

struct ReceiverCounts {
    uint64_t frames = 0;
    uint64_t bad_frames = 0;  // not [topic, seq (8 bytes), payload]
    uint64_t dropped = 0;     // the inbox was full
    std::map<std::string, uint64_t> dropped_by_pod;  // by the pod the frame named
};

// "tcp://host:5557" + 2 -> "tcp://host:5559" (service/events/subscriber.py, offset_port).
// Throws std::invalid_argument for a non-tcp endpoint when offset != 0.
std::string offset_port(const std::string& endpoint, uint32_t offset);

class Receiver {
   public:
    // A pod's frame that finds the inbox full is dropped, and a marker (Frame::dropped)
    // queued in its place, bound or not: one until a frame of the pod is queued again or
    // the marker is acknowledged (acknowledge_overflow), so that the marker stands in order
    // among the pod's frames.
    Receiver(Inbox& inbox, ReceiverSettings settings);
    ~Receiver();
    Receiver(const Receiver&) = delete;
    Receiver& operator=(const Receiver&) = delete;

    // Binds `endpoint` and the next ranks' ports; returns the endpoints bound. Throws
    // std::runtime_error naming the endpoint when one cannot be bound.
    std::vector<std::string> bind(const std::string& endpoint, uint32_t data_parallel_size);
    // Subscribes to an engine's PUB socket(s); replaces an earlier entry for the pod.
    void connect(const std::string& pod_id, const std::string& endpoint,
                 const std::string& replay_endpoint, const std::string& model,
                 uint32_t data_parallel_size);
    void disconnect(const std::string& pod_id);
    void stop();  // closes every socket and ends the thread; idempotent

    ReceiverCounts counts() const;
    void acknowledge_overflow(const std::string& pod_id);

   private:
    struct Socket;
    struct Request {
        std::function<void()> run;
        std::promise<void> done;
    };

    void run();
    void call(std::function<void()> work);  // runs `work` on the receiving thread and waits
    void drain(Socket& socket);
    void accept(Socket& socket, std::string&& topic, std::string&& seq, std::string&& payload);
    void* open_socket();

    Inbox& inbox_;
    const ReceiverSettings settings_;
    void* context_;
    int wake_fd_;
    std::atomic<bool> stopping_{false};
    bool stopped_ = false;

    // Touched by the receiving thread only.
    std::map<std::string, std::vector<std::unique_ptr<Socket>>> sockets_;

    mutable std::mutex mutex_;  // guards requests_, counts_, overflowed_
    std::vector<std::unique_ptr<Request>> requests_;
    ReceiverCounts counts_;
    std::set<std::string> overflowed_;  // pods with a marker queued and no frame since

    std::thread thread_;
};

}  // namespace kvc
