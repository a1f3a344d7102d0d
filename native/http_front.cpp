#include "http_front.hpp"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <stdexcept>
#include <string_view>
#include <unordered_set>

#include "answer_json.hpp"
#include "plane.hpp"
#include "rest_body.hpp"

namespace kvc {

namespace {

constexpr size_t kMaxHead = 64 << 10;      // a request head longer than this goes to Python
constexpr size_t kReadChunk = 64 << 10;
constexpr size_t kHighWater = 4 << 20;     // stop reading a side while this much waits
constexpr const char* kContinue = "HTTP/1.1 100 Continue\r\n\r\n";
// A native connection silent this long is closed (a relayed one is uvicorn's to time out).
constexpr double kIdleSeconds = 60;
// Out of file descriptors: stop accepting for this long rather than spin on the listener.
constexpr double kAcceptPause = 0.1;

double now_seconds() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

bool iequals(std::string_view a, std::string_view b) {
    return a.size() == b.size() &&
           std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
               return (x | 0x20) == (y | 0x20);  // ASCII header names and tokens
           });
}

std::string_view trim(std::string_view text) {
    while (!text.empty() && (text.front() == ' ' || text.front() == '\t')) text.remove_prefix(1);
    while (!text.empty() && (text.back() == ' ' || text.back() == '\t')) text.remove_suffix(1);
    return text;
}

// What the front makes of the bytes a connection has sent so far.
struct Parsed {
    enum Kind { kNeedMore, kRelay, kAnswer } kind = kNeedMore;
    size_t head = 0;  // bytes of the request line and headers, blank line included
    size_t body = 0;
    bool score = false;       // /v1/score rather than /v1/locality
    bool close = false;       // Connection: close
    bool expect = false;      // Expect: 100-continue
};

// Only a plain HTTP/1.1 POST to one of the two paths, with one Content-Length and nothing
// that changes how its bytes are framed, is answered natively; everything else is Python's.
Parsed parse(const std::string& in, uint64_t max_body) {
    Parsed parsed;
    size_t end = in.find("\r\n\r\n");
    if (end == std::string::npos || end > kMaxHead) {
        parsed.kind = in.size() > kMaxHead ? Parsed::kRelay : Parsed::kNeedMore;
        return parsed;
    }
    parsed.kind = Parsed::kRelay;
    parsed.head = end + 4;
    std::string_view head(in.data(), end);
    size_t line_end = head.find("\r\n");
    std::string_view request = head.substr(0, line_end);
    if (request == "POST /v1/locality HTTP/1.1") {
        parsed.score = false;
    } else if (request == "POST /v1/score HTTP/1.1") {
        parsed.score = true;
    } else {
        return parsed;
    }
    bool have_length = false;
    uint64_t length = 0;
    size_t at = line_end == std::string_view::npos ? head.size() : line_end + 2;
    while (at < head.size()) {
        size_t next = head.find("\r\n", at);
        std::string_view line = head.substr(at, next == std::string_view::npos ? next : next - at);
        at = next == std::string_view::npos ? head.size() : next + 2;
        if (line.empty() || line[0] == ' ' || line[0] == '\t') {
            return parsed;  // an obsolete folded header
        }
        size_t colon = line.find(':');
        if (colon == std::string_view::npos || colon == 0) {
            return parsed;
        }
        std::string_view name = line.substr(0, colon);
        std::string_view value = trim(line.substr(colon + 1));
        if (iequals(name, "content-length")) {
            if (have_length || value.empty() || value.size() > 18 ||
                value.find_first_not_of("0123456789") != std::string_view::npos) {
                return parsed;
            }
            have_length = true;
            for (char digit : value) length = length * 10 + static_cast<uint64_t>(digit - '0');
        } else if (iequals(name, "transfer-encoding") || iequals(name, "upgrade")) {
            return parsed;
        } else if (iequals(name, "expect")) {
            if (!iequals(value, "100-continue")) {
                return parsed;
            }
            parsed.expect = true;
        } else if (iequals(name, "connection")) {
            parsed.close = iequals(value, "close");
            if (!parsed.close && !iequals(value, "keep-alive")) {
                return parsed;
            }
        }
    }
    if (!have_length || length > max_body) {
        return parsed;  // the Python server answers 411/413 and the like
    }
    parsed.body = length;
    parsed.kind = in.size() - parsed.head >= length ? Parsed::kAnswer : Parsed::kNeedMore;
    return parsed;
}

}  // namespace

struct HttpFront::Connection {
    struct Tag {
        Connection* connection;
        bool upstream;
    };

    int client = -1;
    int upstream = -1;
    bool relaying = false;
    bool client_eof = false;
    bool upstream_eof = false;
    bool close_after_write = false;
    bool sent_continue = false;
    uint32_t client_events = 0;
    uint32_t upstream_events = 0;
    double active = 0;  // when it last sent or was sent anything
    std::string in;      // client bytes not yet answered (before relaying)
    std::string out;     // bytes for the client
    size_t out_done = 0;
    std::string up;      // bytes for the Python server
    size_t up_done = 0;
    Tag client_tag{this, false};
    Tag upstream_tag{this, true};

    size_t out_pending() const { return out.size() - out_done; }
    size_t up_pending() const { return up.size() - up_done; }
};

struct HttpFront::Worker {
    int epoll = -1;
    int wake = -1;
    std::unordered_set<Connection*> connections;
};

namespace {

char kListenerTag, kWakeTag;  // addresses that tell epoll events apart

epoll_event event_of(uint32_t events, void* tag) {
    epoll_event event{};
    event.events = events;
    event.data.ptr = tag;
    return event;
}

// Writes what is pending without blocking; false when the peer is gone.
bool flush(int fd, std::string& data, size_t& done) {
    while (done < data.size()) {
        ssize_t n = ::send(fd, data.data() + done, data.size() - done, MSG_NOSIGNAL);
        if (n < 0) {
            return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR;
        }
        done += static_cast<size_t>(n);
    }
    data.clear();
    done = 0;
    return true;
}

// Reads what is there, up to `limit` bytes; false at end of stream or on an error.
bool drain(int fd, std::string& into, size_t limit) {
    char buffer[kReadChunk];
    size_t taken = 0;
    while (taken < limit) {
        ssize_t n = ::recv(fd, buffer, sizeof buffer, 0);
        if (n > 0) {
            into.append(buffer, static_cast<size_t>(n));
            taken += static_cast<size_t>(n);
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            return true;
        }
        if (n < 0 && errno == EINTR) {
            continue;
        }
        return false;
    }
    return true;
}

}  // namespace

HttpFront::HttpFront(const DataPlane& plane, HttpFrontSettings settings,
                     std::vector<double> buckets)
    : plane_(plane), settings_(std::move(settings)), counter_(std::move(buckets)) {}

HttpFront::~HttpFront() { stop(0); }

int HttpFront::start() {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICHOST | AI_NUMERICSERV;
    addrinfo* found = nullptr;
    std::string port = std::to_string(settings_.port);
    std::string where = settings_.host + ":" + port;
    if (getaddrinfo(settings_.host.c_str(), port.c_str(), &hints, &found) != 0 || !found) {
        throw std::runtime_error("cannot serve HTTP on " + where + ": not a numeric address");
    }
    int fd = ::socket(found->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (fd < 0 || ::bind(fd, found->ai_addr, found->ai_addrlen) != 0 || ::listen(fd, 1024) != 0) {
        std::string error = std::strerror(errno);
        freeaddrinfo(found);
        if (fd >= 0) ::close(fd);
        throw std::runtime_error("cannot serve HTTP on " + where + ": " + error);
    }
    freeaddrinfo(found);
    sockaddr_storage bound{};
    socklen_t size = sizeof bound;
    getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &size);
    int bound_port = ntohs(bound.ss_family == AF_INET6
                               ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                               : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
    listener_ = fd;
    for (int i = 0; i < std::max(1, settings_.threads); i++) {
        auto worker = std::make_unique<Worker>();
        worker->epoll = epoll_create1(EPOLL_CLOEXEC);
        worker->wake = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        epoll_event listen = event_of(EPOLLIN | EPOLLEXCLUSIVE, &kListenerTag);
        epoll_ctl(worker->epoll, EPOLL_CTL_ADD, listener_, &listen);
        epoll_event wake = event_of(EPOLLIN, &kWakeTag);
        epoll_ctl(worker->epoll, EPOLL_CTL_ADD, worker->wake, &wake);
        workers_.push_back(std::move(worker));
    }
    for (auto& worker : workers_) {
        threads_.emplace_back([this, w = worker.get()] { run(*w); });
    }
    return bound_port;
}

void HttpFront::stop(double grace_seconds) {
    if (threads_.empty()) {
        return;
    }
    close_by_ = now_seconds() + std::max(0.0, grace_seconds);
    stopping_ = true;
    ::close(listener_);  // no more connections; workers finish the ones they have
    for (auto& worker : workers_) {
        uint64_t one = 1;
        (void)!::write(worker->wake, &one, sizeof one);
    }
    for (std::thread& thread : threads_) {
        thread.join();
    }
    threads_.clear();
    for (auto& worker : workers_) {
        ::close(worker->epoll);
        ::close(worker->wake);
    }
    workers_.clear();
}

void HttpFront::run(Worker& worker) {
    epoll_event events[64];

    auto want = [&](Connection& c) {
        // Read a side only while what it sends has room to go; write while anything waits.
        uint32_t client = EPOLLRDHUP;
        if (!c.client_eof && (c.relaying ? c.up_pending() < kHighWater
                                         : c.out_pending() < kHighWater)) {
            client |= EPOLLIN;
        }
        if (c.out_pending()) client |= EPOLLOUT;
        if (client != c.client_events) {
            epoll_event event = event_of(client, &c.client_tag);
            epoll_ctl(worker.epoll, EPOLL_CTL_MOD, c.client, &event);
            c.client_events = client;
        }
        if (c.upstream >= 0) {
            uint32_t upstream = 0;
            if (!c.upstream_eof && c.out_pending() < kHighWater) upstream |= EPOLLIN;
            if (c.up_pending()) upstream |= EPOLLOUT;
            if (upstream != c.upstream_events) {
                epoll_event event = event_of(upstream, &c.upstream_tag);
                epoll_ctl(worker.epoll, EPOLL_CTL_MOD, c.upstream, &event);
                c.upstream_events = upstream;
            }
        }
    };

    auto close_connection = [&](Connection* c) {
        ::close(c->client);
        if (c->upstream >= 0) ::close(c->upstream);
        worker.connections.erase(c);
        delete c;
    };

    auto start_relay = [&](Connection& c) -> bool {
        counter_.relayed();
        int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        sockaddr_un address{};
        address.sun_family = AF_UNIX;
        std::strncpy(address.sun_path, settings_.backend.c_str(), sizeof address.sun_path - 1);
        if (fd < 0 || (::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0 &&
                       errno != EINPROGRESS && errno != EAGAIN)) {
            if (fd >= 0) ::close(fd);
            static const std::string unavailable =
                "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                "content-length: 43\r\nconnection: close\r\n\r\n"
                "{\"detail\":\"the API server is not running\"}";
            c.out += unavailable;
            c.close_after_write = true;
            return false;
        }
        c.upstream = fd;
        c.relaying = true;
        c.up = std::move(c.in);  // what the client sent and we did not answer, in order
        c.up_done = 0;
        c.in.clear();
        epoll_event event = event_of(EPOLLIN | EPOLLOUT, &c.upstream_tag);
        epoll_ctl(worker.epoll, EPOLL_CTL_ADD, fd, &event);
        c.upstream_events = EPOLLIN | EPOLLOUT;
        return true;
    };

    // Answers every complete request at the front of `in`, until one is not ours.
    auto serve = [&](Connection& c) {
        thread_local PlainLocality query;
        thread_local std::string json;
        while (!c.relaying && !c.close_after_write) {
            Parsed parsed = parse(c.in, settings_.max_body_bytes);
            if (parsed.kind == Parsed::kNeedMore) {
                if (parsed.expect && !c.sent_continue) {
                    c.out += kContinue;
                    c.sent_continue = true;
                }
                return;
            }
            std::string_view body(c.in.data() + parsed.head, parsed.body);
            if (parsed.kind == Parsed::kRelay || !parse_plain_locality(body, query) ||
                query.pods || query.tokens.size() > settings_.max_tokens) {
                start_relay(c);
                return;
            }
            auto started = std::chrono::steady_clock::now();
            Weights weights;
            std::copy(std::begin(settings_.weights), std::end(settings_.weights), weights.tier);
            Answer answer;
            std::string model(query.model);
            plane_.locality_tokens(model, query.tokens.data(), query.tokens.size(),
                                   query.lora_name, query.cache_salt, weights, answer);
            if (parsed.score) {
                score_json(model, answer, json);
            } else {
                locality_json(model, answer, answer.keys, json);
            }
            c.out += "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: ";
            c.out += std::to_string(json.size());
            c.out += parsed.close ? "\r\nconnection: close\r\n\r\n" : "\r\n\r\n";
            c.out += json;
            c.in.erase(0, parsed.head + parsed.body);
            c.sent_continue = false;
            c.close_after_write = parsed.close;
            std::chrono::duration<double> took = std::chrono::steady_clock::now() - started;
            counter_.observe(took.count(), answer.keys,
                             answer.pods.empty() ? 0 : answer.pods.front().match_length);
        }
    };

    // Runs a connection's state forward after an event; false when it is finished.
    auto advance = [&](Connection& c) -> bool {
        if (!c.relaying) {
            serve(c);
        }
        if (!flush(c.client, c.out, c.out_done)) {
            return false;
        }
        if (c.relaying) {
            if (!flush(c.upstream, c.up, c.up_done)) {
                return false;
            }
            if (c.client_eof && !c.up_pending()) {
                ::shutdown(c.upstream, SHUT_WR);
            }
            if (c.upstream_eof && !c.out_pending()) {
                return false;
            }
        } else if ((c.client_eof || c.close_after_write) && !c.out_pending()) {
            return false;
        }
        want(c);
        return true;
    };

    double paused_until = 0;
    double next_idle_check = now_seconds() + 1;
    for (;;) {
        double now = now_seconds();
        if (paused_until != 0 && now >= paused_until && !stopping_) {
            epoll_event listen = event_of(EPOLLIN | EPOLLEXCLUSIVE, &kListenerTag);
            epoll_ctl(worker.epoll, EPOLL_CTL_ADD, listener_, &listen);
            paused_until = 0;
        }
        if (now >= next_idle_check) {
            next_idle_check = now + 1;
            for (Connection* c : std::vector<Connection*>(worker.connections.begin(),
                                                          worker.connections.end())) {
                if (!c->relaying && now - c->active > kIdleSeconds) {
                    close_connection(c);
                }
            }
        }
        bool stopping = stopping_;
        if (stopping) {
            // Connections between requests close now; the others finish first (a relayed
            // one may be mid-request: only the Python server knows).
            for (Connection* c : std::vector<Connection*>(worker.connections.begin(),
                                                          worker.connections.end())) {
                if (!c->relaying && c->in.empty() && !c->out_pending()) {
                    close_connection(c);
                }
            }
        }
        if (stopping && (worker.connections.empty() || now_seconds() >= close_by_)) {
            for (Connection* c : std::vector<Connection*>(worker.connections.begin(),
                                                          worker.connections.end())) {
                close_connection(c);
            }
            return;
        }
        int n = epoll_wait(worker.epoll, events, 64, stopping || paused_until != 0 ? 20 : 1000);
        for (int i = 0; i < n; i++) {
            void* tag = events[i].data.ptr;
            if (tag == &kWakeTag) {
                uint64_t ignored;
                (void)!::read(worker.wake, &ignored, sizeof ignored);
                continue;
            }
            if (tag == &kListenerTag) {
                for (;;) {
                    int fd = ::accept4(listener_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (fd < 0) {
                        if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS ||
                            errno == ENOMEM) {
                            epoll_ctl(worker.epoll, EPOLL_CTL_DEL, listener_, nullptr);
                            paused_until = now_seconds() + kAcceptPause;
                        }
                        break;
                    }
                    int one = 1;
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    auto* c = new Connection();
                    c->client = fd;
                    c->active = now_seconds();
                    c->client_events = EPOLLIN | EPOLLRDHUP;
                    epoll_event event = event_of(c->client_events, &c->client_tag);
                    epoll_ctl(worker.epoll, EPOLL_CTL_ADD, fd, &event);
                    worker.connections.insert(c);
                }
                continue;
            }
            auto* side = static_cast<Connection::Tag*>(tag);
            Connection& c = *side->connection;
            c.active = now;
            uint32_t happened = events[i].events;
            bool alive = true;
            if (side->upstream) {
                if (happened & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                    c.upstream_eof = !drain(c.upstream, c.out, kHighWater);
                }
            } else if (happened & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
                c.client_eof = !drain(c.client, c.relaying ? c.up : c.in,
                                      c.relaying ? kHighWater : settings_.max_body_bytes + kMaxHead);
            }
            alive = advance(c);
            if (!alive) {
                close_connection(&c);
            }
        }
    }
}

}  // namespace kvc
