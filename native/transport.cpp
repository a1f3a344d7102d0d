#include "transport.hpp"

#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>
#include <zmq.h>

#include <cerrno>
#include <cstring>
#include <ctime>
#include <stdexcept>

namespace kvc {

namespace {

// Frames taken from one socket per round, so one busy engine cannot hold up the others.
constexpr int kDrainMax = 256;
constexpr int kParts = 3;  // [topic, seq (8 bytes), payload]
constexpr size_t kMaxPodsCounted = 4096;

double unix_now() {
    timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    return static_cast<double>(now.tv_sec) + static_cast<double>(now.tv_nsec) * 1e-9;
}

std::string zmq_error(const std::string& what) {
    return what + ": " + zmq_strerror(zmq_errno());
}

// The pod a topic "kv@<pod>@<model>" names, for counting a frame dropped before decoding.
std::string topic_pod(const std::string& topic) {
    size_t first = topic.find('@');
    if (first == std::string::npos) {
        return "";
    }
    size_t second = topic.find('@', first + 1);
    return topic.substr(first + 1, second == std::string::npos ? std::string::npos
                                                               : second - first - 1);
}

}  // namespace

std::string offset_port(const std::string& endpoint, uint32_t offset) {
    if (offset == 0) {
        return endpoint;
    }
    size_t scheme = endpoint.find("://");
    size_t colon = endpoint.rfind(':');
    std::string port = colon == std::string::npos ? "" : endpoint.substr(colon + 1);
    bool digits = !port.empty() && port.size() <= 5 &&
                  port.find_first_not_of("0123456789") == std::string::npos;
    if (scheme == std::string::npos || endpoint.compare(0, scheme, "tcp") != 0 ||
        colon <= scheme + 2 || !digits) {
        throw std::invalid_argument("data parallel ranks need a tcp://host:port endpoint, got '" +
                                    endpoint + "'");
    }
    return endpoint.substr(0, colon + 1) + std::to_string(std::stoul(port) + offset);
}

struct Receiver::Socket {
    void* handle;
    std::shared_ptr<const Source> source;
};

Receiver::Receiver(Inbox& inbox, ReceiverSettings settings)
    : inbox_(inbox), settings_(std::move(settings)) {
    context_ = zmq_ctx_new();
    if (context_ == nullptr) {
        throw std::runtime_error(zmq_error("cannot create a ZeroMQ context"));
    }
    wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (wake_fd_ < 0) {
        zmq_ctx_term(context_);
        throw std::runtime_error(std::string("eventfd: ") + std::strerror(errno));
    }
    thread_ = std::thread([this] { run(); });
}

Receiver::~Receiver() { stop(); }

void Receiver::stop() {
    if (stopped_) {
        return;
    }
    stopped_ = true;
    stopping_ = true;
    uint64_t one = 1;
    (void)!write(wake_fd_, &one, sizeof one);
    thread_.join();
    for (auto& [pod, sockets] : sockets_) {
        for (auto& socket : sockets) {
            zmq_close(socket->handle);
        }
    }
    sockets_.clear();
    zmq_ctx_term(context_);
    close(wake_fd_);
    // Requests that raced with the stop: answer them, so no caller waits forever.
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& request : requests_) {
        request->done.set_exception(
            std::make_exception_ptr(std::runtime_error("the receiver has stopped")));
    }
    requests_.clear();
}

void Receiver::call(std::function<void()> work) {
    auto request = std::make_unique<Request>();
    request->run = std::move(work);
    std::future<void> done = request->done.get_future();
    {
        std::lock_guard<std::mutex> lock(mutex_);
        if (stopped_) {
            throw std::runtime_error("the receiver has stopped");
        }
        requests_.push_back(std::move(request));
    }
    uint64_t one = 1;
    (void)!write(wake_fd_, &one, sizeof one);
    done.get();  // rethrows what the work threw
}

void* Receiver::open_socket() {
    void* socket = zmq_socket(context_, ZMQ_SUB);
    if (socket == nullptr) {
        throw std::runtime_error(zmq_error("cannot create a SUB socket"));
    }
    int zero = 0, one = 1, hwm = settings_.receive_hwm;
    int64_t max_size = settings_.max_frame_bytes;
    zmq_setsockopt(socket, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(socket, ZMQ_IPV6, &one, sizeof one);  // else a tcp://[::1] engine is unheard
    zmq_setsockopt(socket, ZMQ_RCVHWM, &hwm, sizeof hwm);
    zmq_setsockopt(socket, ZMQ_MAXMSGSIZE, &max_size, sizeof max_size);
    zmq_setsockopt(socket, ZMQ_SUBSCRIBE, settings_.topic_filter.data(),
                   settings_.topic_filter.size());
    return socket;
}

std::vector<std::string> Receiver::bind(const std::string& endpoint,
                                        uint32_t data_parallel_size) {
    std::vector<std::string> bound;
    call([&] {
        for (uint32_t rank = 0; rank < data_parallel_size; rank++) {
            std::string address = offset_port(endpoint, rank);
            void* handle = open_socket();
            if (zmq_bind(handle, address.c_str()) != 0) {
                std::string error = zmq_error("cannot bind " + address);
                zmq_close(handle);
                throw std::runtime_error(error);
            }
            char last[256];
            size_t size = sizeof last;
            zmq_getsockopt(handle, ZMQ_LAST_ENDPOINT, last, &size);
            bound.emplace_back(last);
            auto source = std::make_shared<Source>();
            source->rank = rank;
            sockets_["bind:" + bound.back()].push_back(
                std::make_unique<Socket>(Socket{handle, std::move(source)}));
        }
    });
    return bound;
}

void Receiver::connect(const std::string& pod_id, const std::string& endpoint,
                       const std::string& replay_endpoint, const std::string& model,
                       uint32_t data_parallel_size) {
    // Checked here, in the caller's thread, so a bad endpoint is the caller's error.
    for (uint32_t rank = 0; rank < data_parallel_size; rank++) {
        offset_port(endpoint, rank);
        if (!replay_endpoint.empty()) {
            offset_port(replay_endpoint, rank);
        }
    }
    call([&] {
        auto old = sockets_.find(pod_id);
        if (old != sockets_.end()) {
            for (auto& socket : old->second) {
                zmq_close(socket->handle);
            }
            sockets_.erase(old);
        }
        std::vector<std::unique_ptr<Socket>> sockets;
        for (uint32_t rank = 0; rank < data_parallel_size; rank++) {
            auto source = std::make_shared<Source>();
            source->pod_id = pod_id;
            source->model = model;
            source->rank = rank;
            if (!replay_endpoint.empty()) {
                source->replay_endpoint = offset_port(replay_endpoint, rank);
            }
            void* handle = open_socket();
            std::string address = offset_port(endpoint, rank);
            if (zmq_connect(handle, address.c_str()) != 0) {
                std::string error = zmq_error("cannot connect to " + address);
                zmq_close(handle);
                for (auto& socket : sockets) {
                    zmq_close(socket->handle);
                }
                throw std::runtime_error(error);
            }
            sockets.push_back(std::make_unique<Socket>(Socket{handle, std::move(source)}));
        }
        sockets_[pod_id] = std::move(sockets);
    });
}

void Receiver::disconnect(const std::string& pod_id) {
    call([&] {
        auto found = sockets_.find(pod_id);
        if (found == sockets_.end()) {
            return;
        }
        for (auto& socket : found->second) {
            zmq_close(socket->handle);
        }
        sockets_.erase(found);
    });
}

ReceiverCounts Receiver::counts() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return counts_;
}

void Receiver::acknowledge_overflow(const std::string& pod_id) {
    std::lock_guard<std::mutex> lock(mutex_);
    overflowed_.erase(pod_id);
}

void Receiver::run() {
    std::vector<zmq_pollitem_t> items;
    std::vector<Socket*> polled;
    bool changed = true;
    while (!stopping_) {
        if (changed) {
            items.assign(1, zmq_pollitem_t{nullptr, wake_fd_, ZMQ_POLLIN, 0});
            polled.clear();
            for (auto& [key, sockets] : sockets_) {
                for (auto& socket : sockets) {
                    items.push_back(zmq_pollitem_t{socket->handle, 0, ZMQ_POLLIN, 0});
                    polled.push_back(socket.get());
                }
            }
            changed = false;
        }
        if (zmq_poll(items.data(), static_cast<int>(items.size()), -1) < 0) {
            if (zmq_errno() == EINTR) {
                continue;
            }
            break;  // the context was terminated
        }
        for (size_t i = 1; i < items.size(); i++) {
            if (items[i].revents & ZMQ_POLLIN) {
                drain(*polled[i - 1]);
            }
        }
        if (items[0].revents & ZMQ_POLLIN) {
            uint64_t ignored;
            (void)!read(wake_fd_, &ignored, sizeof ignored);
            std::vector<std::unique_ptr<Request>> requests;
            {
                std::lock_guard<std::mutex> lock(mutex_);
                requests.swap(requests_);
            }
            for (auto& request : requests) {
                try {
                    request->run();
                    request->done.set_value();
                } catch (...) {
                    request->done.set_exception(std::current_exception());
                }
                changed = true;
            }
        }
    }
}

void Receiver::drain(Socket& socket) {
    for (int taken = 0; taken < kDrainMax; taken++) {
        std::string parts[kParts];
        int count = 0;
        bool more = true;
        while (more) {
            zmq_msg_t message;
            zmq_msg_init(&message);
            if (zmq_msg_recv(&message, socket.handle, ZMQ_DONTWAIT) < 0) {
                zmq_msg_close(&message);
                if (count == 0) {
                    return;  // nothing waiting (EAGAIN), or the socket is closing
                }
                break;
            }
            if (count < kParts) {
                parts[count].assign(static_cast<const char*>(zmq_msg_data(&message)),
                                    zmq_msg_size(&message));
            }
            count++;
            more = zmq_msg_more(&message) != 0;
            zmq_msg_close(&message);
        }
        if (count != kParts || parts[1].size() != 8) {
            std::lock_guard<std::mutex> lock(mutex_);
            counts_.bad_frames++;
            continue;
        }
        accept(socket, std::move(parts[0]), std::move(parts[1]), std::move(parts[2]));
    }
}

void Receiver::accept(Socket& socket, std::string&& topic, std::string&& seq,
                      std::string&& payload) {
    uint64_t number = 0;
    for (unsigned char byte : seq) {
        number = (number << 8) | byte;
    }
    const Source& source = *socket.source;
    auto pod_of = [&source](const std::string& named) {
        return source.pod_id.empty() ? topic_pod(named) : source.pod_id;
    };
    std::lock_guard<std::mutex> lock(mutex_);
    counts_.frames++;
    // Only this thread pushes, under this lock: the marker and frames keep their order.
    std::string pod = overflowed_.empty() ? std::string() : pod_of(topic);
    Frame frame{socket.source, std::move(topic), number, std::move(payload), unix_now()};
    if (inbox_.push(std::move(frame))) {
        if (!overflowed_.empty()) {
            overflowed_.erase(pod);
        }
        return;
    }
    // `frame` was not moved from when the push failed.
    if (pod.empty()) {
        pod = pod_of(frame.topic);
    }
    counts_.dropped++;
    // Topics are the sender's to choose: past a bound, unknown pods share one count.
    if (counts_.dropped_by_pod.size() >= kMaxPodsCounted && counts_.dropped_by_pod.count(pod) == 0) {
        pod = "";
    }
    counts_.dropped_by_pod[pod]++;
    if (overflowed_.insert(pod).second) {
        Frame marker{socket.source, std::move(pod), 0, std::string(), frame.received};
        marker.dropped = true;
        inbox_.push_unbounded(std::move(marker));
    }
}

}  // namespace kvc
