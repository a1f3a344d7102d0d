// Python bindings of the native data plane (service/dataplane/native.py drives it). Every
// call that waits or computes releases the GIL; what crosses to Python is per batch, per
// query or per status read, never per block.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "bindings.hpp"
#include "grpc_front.hpp"
#include "http_front.hpp"
#include "plane.hpp"

namespace py = pybind11;

namespace kvc {

namespace {

const char* notice_name(Notice::Kind kind) {
    switch (kind) {
        case Notice::kStreamSeen: return "stream_seen";
        case Notice::kModelChanged: return "model_changed";
        case Notice::kGap: return "gap";
        case Notice::kRestart: return "restart";
        case Notice::kReplay: return "replay";
        case Notice::kUnidentified: return "unidentified";
        case Notice::kHashMismatch: return "hash_mismatch";
        case Notice::kOverflow: return "overflow";
    }
    return "unknown";
}

KeyingSettings keying_of(const std::string& key_mode, const std::string& algorithm,
                         std::optional<std::string> seed) {
    KeyingSettings keying;
    if (key_mode == "tokens") {
        keying.mode = KeyMode::kTokens;
    } else if (key_mode == "vllm") {
        keying.mode = KeyMode::kVllm;
    } else {
        throw py::value_error("key_mode must be 'tokens' or 'vllm', got '" + key_mode + "'");
    }
    if (algorithm == "sha256") {
        keying.algorithm = HashAlgorithm::kSha256;
    } else if (algorithm == "sha256_cbor") {
        keying.algorithm = HashAlgorithm::kSha256Cbor;
    } else {
        throw py::value_error("hash_algorithm must be 'sha256' or 'sha256_cbor', got '" +
                              algorithm + "'");
    }
    keying.seed = std::move(seed);
    return keying;
}

// A flat buffer of `Item`s (bytes, array, memoryview), held while the GIL is released.
template <class Item>
struct Flat {
    py::buffer_info info;
    const Item* data() const { return static_cast<const Item*>(info.ptr); }
    size_t size() const { return static_cast<size_t>(info.size * info.itemsize) / sizeof(Item); }
};

template <class Item>
Flat<Item> flat(const py::buffer& buffer, const char* what) {
    py::buffer_info info = buffer.request();
    size_t bytes = static_cast<size_t>(info.size * info.itemsize);
    if (info.ndim != 1 || (info.itemsize != sizeof(Item) && info.itemsize != 1) ||
        bytes % sizeof(Item) != 0 || info.strides[0] != info.itemsize) {
        throw py::value_error(std::string(what) + " must be a flat buffer of " +
                              std::to_string(8 * sizeof(Item)) + "-bit unsigned ints");
    }
    return Flat<Item>{std::move(info)};
}

py::tuple answer_tuple(const Answer& answer) {
    py::list pods;
    for (const PodAnswer& pod : answer.pods) {
        pods.append(py::make_tuple(pod.pod_id, pod.rank, pod.match_length, pod.block_count,
                                   pod.tiers[0], pod.tiers[1], pod.tiers[2], pod.score));
    }
    py::object block_size = answer.block_size == 0 ? py::object(py::none())
                                                   : py::object(py::int_(answer.block_size));
    return py::make_tuple(answer.known_model, block_size, answer.keys, pods);
}

class PlaneHandle {
   public:
    PlaneHandle(double ttl, uint64_t max_entries, uint64_t max_engine_hashes,
                uint64_t max_parents, uint64_t buffer_bytes, const std::string& topic_filter,
                int64_t max_frame_bytes, int receive_hwm, bool replay,
                std::map<std::string, std::string> replay_endpoints,
                std::vector<double> lag_buckets, std::vector<double> weights) {
        if (weights.size() != kTiers) {
            throw py::value_error("weights are (gpu, cpu, disk)");
        }
        std::copy(weights.begin(), weights.end(), weights_.tier);
        PlaneSettings settings;
        settings.ttl_seconds = ttl;
        settings.max_entries = max_entries;
        settings.max_engine_hashes = max_engine_hashes;
        settings.max_parents = max_parents;
        settings.buffer_bytes = buffer_bytes;
        settings.receiver.topic_filter = topic_filter;
        settings.receiver.max_frame_bytes = max_frame_bytes;
        settings.receiver.receive_hwm = receive_hwm;
        settings.replay = replay;
        settings.replay_endpoints = std::move(replay_endpoints);
        settings.lag_buckets = std::move(lag_buckets);
        plane_ = std::make_unique<DataPlane>(std::move(settings));
    }

    void configure_model(const std::string& name, const std::string& key_mode,
                         const std::string& algorithm, std::optional<std::string> seed) {
        plane_->configure_model(name, keying_of(key_mode, algorithm, std::move(seed)));
    }

    void start() { plane_->start(); }

    void stop(double drain_seconds) {
        py::gil_scoped_release released;
        plane_->stop(drain_seconds);
    }

    std::vector<std::string> bind(const std::string& endpoint, uint32_t size) {
        py::gil_scoped_release released;
        return plane_->bind(endpoint, size);
    }

    void connect(const std::string& pod_id, const std::string& endpoint,
                 const std::string& replay_endpoint, const std::string& model, uint32_t size) {
        py::gil_scoped_release released;
        plane_->connect(pod_id, endpoint, replay_endpoint, model, size);
    }

    void disconnect(const std::string& pod_id) {
        py::gil_scoped_release released;
        plane_->disconnect(pod_id);
    }

    void forget_pod(const std::string& pod_id, double at) { plane_->forget_pod(pod_id, at); }

    void replay_done(uint64_t stream, const py::list& batches, bool ok) {
        std::vector<std::pair<uint64_t, std::string>> copied;
        copied.reserve(batches.size());
        for (const py::handle& item : batches) {
            auto pair = item.cast<py::tuple>();
            copied.emplace_back(pair[0].cast<uint64_t>(), pair[1].cast<std::string>());
        }
        plane_->replay_done(stream, std::move(copied), ok);
    }

    int notice_fd() const { return plane_->notice_fd(); }

    // [(kind, stream, pod_id, rank, model, text: bytes, seq, other)]
    py::list take_notices() {
        py::list out;
        for (const Notice& notice : plane_->take_notices()) {
            out.append(py::make_tuple(notice_name(notice.kind), notice.stream, notice.pod_id,
                                      notice.rank, notice.model, py::bytes(notice.text),
                                      notice.seq, notice.other));
        }
        return out;
    }

    // (known model, block size or None, keys, [(pod_id, rank, match_length, block_count,
    //  gpu, cpu, disk, score)] sorted by score, pod id, rank)
    py::tuple locality_tokens(const std::string& model, const py::buffer& tokens,
                              std::optional<std::string> lora, std::optional<std::string> salt) {
        Flat<uint32_t> ids = flat<uint32_t>(tokens, "token ids");
        Answer answer;
        {
            py::gil_scoped_release released;
            std::optional<std::string_view> lora_view, salt_view;
            if (lora) lora_view = *lora;
            if (salt) salt_view = *salt;
            plane_->locality_tokens(model, ids.data(), ids.size(), lora_view, salt_view,
                                    weights_, answer);
        }
        return answer_tuple(answer);
    }

    py::tuple locality_hashes(const std::string& model, const py::buffer& hashes) {
        Flat<uint64_t> chain = flat<uint64_t>(hashes, "block hashes");
        Answer answer;
        {
            py::gil_scoped_release released;
            plane_->locality_hashes(model, chain.data(), chain.size(), weights_, answer);
        }
        return answer_tuple(answer);
    }

    std::optional<uint64_t> block_size(const std::string& model) const {
        auto size = plane_->block_size(model);
        if (size && *size == 0) {
            return std::nullopt;
        }
        return size;
    }

    py::list streams() const {
        std::vector<StreamStatus> streams;
        {
            py::gil_scoped_release released;
            streams = plane_->streams();
        }
        py::list out;
        for (const StreamStatus& s : streams) {
            py::dict row;
            row["serial"] = s.serial;
            row["pod_id"] = s.pod_id;
            row["rank"] = s.rank;
            row["model"] = s.model;
            row["blocks"] = s.blocks;
            row["replaying"] = s.replaying;
            row["resync"] = s.resync;
            row["last_seq"] = s.has_last_seq ? py::object(py::int_(s.last_seq)) : py::none();
            row["last_time"] = s.last_time == 0 ? py::object(py::none())
                                                : py::object(py::float_(s.last_time));
            row["lag"] = s.lag;
            row["batches"] = s.batches;
            row["gaps"] = s.gaps;
            row["lost"] = s.lost;
            row["replays"] = s.replays;
            row["restarts"] = s.restarts;
            row["dropped"] = s.dropped;
            out.append(row);
        }
        return out;
    }

    py::list models() const {
        std::vector<ModelStatus> models;
        {
            py::gil_scoped_release released;
            models = plane_->models();
        }
        py::list out;
        for (const ModelStatus& m : models) {
            py::dict row;
            row["name"] = m.name;
            row["key_mode"] = m.key_mode;
            row["configured"] = m.configured;
            row["block_size"] = m.block_size == 0 ? py::object(py::none())
                                                  : py::object(py::int_(m.block_size));
            row["blocks"] = m.blocks;
            row["pods"] = m.pods;
            row["hash_matches"] = m.hash_matches;
            row["hash_mismatches"] = m.hash_mismatches;
            row["engine_hashes"] = m.engine_hashes;
            out.append(row);
        }
        return out;
    }

    py::dict counts() const {
        PlaneCounts counts;
        ReceiverCounts received;
        {
            py::gil_scoped_release released;
            counts = plane_->counts();
            received = plane_->receiver_counts();
        }
        py::dict drops;
        const char* const* names = drop_reason_names();
        for (int reason = 0; reason < kDropReasons; reason++) {
            drops[names[reason]] = counts.drops[reason];
        }
        py::dict events;
        events["BlockStored"] = counts.events[0];
        events["BlockRemoved"] = counts.events[1];
        events["AllBlocksCleared"] = counts.events[2];
        static const char* const kReasons[kEvictionReasons] = {"removed", "cleared", "ttl",
                                                               "capacity"};
        py::dict evictions;
        for (int reason = 0; reason < kEvictionReasons; reason++) {
            evictions[kReasons[reason]] = counts.index.evictions[reason];
        }
        py::dict dropped_by_pod;
        for (const auto& [pod, n] : received.dropped_by_pod) {
            dropped_by_pod[py::str(pod)] = n;
        }
        py::dict out;
        out["drops"] = drops;
        out["events"] = events;
        out["batches_live"] = counts.batches_live;
        out["batches_replay"] = counts.batches_replay;
        out["lag_counts"] = counts.lag_counts;
        out["lag_sum"] = counts.lag_sum;
        out["inbox_frames"] = counts.inbox_frames;
        out["inbox_bytes"] = counts.inbox_bytes;
        out["inbox_max_bytes"] = counts.inbox_max_bytes;
        out["received_frames"] = counts.received_frames;
        out["entries"] = counts.index.entries;
        out["evictions"] = evictions;
        out["garbage"] = counts.index.garbage;
        out["holders_allocated"] = counts.index.holders_allocated;
        out["bucket_capacity"] = counts.index.bucket_capacity;
        out["dropped_by_pod"] = dropped_by_pod;
        return out;
    }

    void apply_frame_for_test(const py::bytes& topic, uint64_t seq, const py::bytes& payload,
                              const std::string& pod_id, const std::string& model,
                              uint32_t rank, const std::string& replay_endpoint,
                              double received) {
        auto source = std::make_shared<Source>();
        source->pod_id = pod_id;
        source->model = model;
        source->rank = rank;
        source->replay_endpoint = replay_endpoint;
        Frame frame{std::move(source), std::string(topic), seq, std::string(payload), received};
        py::gil_scoped_release released;
        plane_->apply_frame_for_test(std::move(frame));
    }

    void set_clock_for_test(double seconds) { plane_->set_clock_for_test(seconds); }

    int serve_grpc(const std::string& address, const std::string& backend,
                   int max_message_bytes, uint64_t max_tokens, std::vector<double> buckets) {
        if (front_) {
            throw std::logic_error("the gRPC front is already serving");
        }
        GrpcFrontSettings settings;
        settings.address = address;
        settings.backend = backend;
        settings.max_message_bytes = max_message_bytes;
        settings.max_tokens = max_tokens;
        std::copy(std::begin(weights_.tier), std::end(weights_.tier), settings.weights);
        auto front = std::make_unique<GrpcFront>(*plane_, settings, std::move(buckets));
        int port;
        {
            py::gil_scoped_release released;
            port = front->start();
        }
        front_ = std::move(front);
        return port;
    }

    void stop_grpc(double grace_seconds) {
        if (front_) {
            py::gil_scoped_release released;
            front_->stop(grace_seconds);
        }
    }

    int serve_http(const std::string& host, int port, const std::string& backend,
                   uint64_t max_body_bytes, uint64_t max_tokens, std::vector<double> buckets) {
        if (http_) {
            throw std::logic_error("the HTTP front is already serving");
        }
        HttpFrontSettings settings;
        settings.host = host;
        settings.port = port;
        settings.backend = backend;
        settings.max_body_bytes = max_body_bytes;
        settings.max_tokens = max_tokens;
        std::copy(std::begin(weights_.tier), std::end(weights_.tier), settings.weights);
        auto front = std::make_unique<HttpFront>(*plane_, settings, std::move(buckets));
        int bound = front->start();
        http_ = std::move(front);
        return bound;
    }

    void stop_http(double grace_seconds) {
        if (http_) {
            py::gil_scoped_release released;
            http_->stop(grace_seconds);
        }
    }

    py::dict http_counts() const { return counts_dict(http_ ? http_->counts() : FrontCounts{}); }

    py::dict grpc_counts() const {
        return counts_dict(front_ ? front_->counts() : FrontCounts{});
    }

    static py::dict counts_dict(const FrontCounts& counts) {
        py::dict out;
        out["buckets"] = counts.buckets;
        out["seconds"] = counts.seconds;
        out["queries"] = counts.queries;
        out["blocks"] = counts.blocks;
        out["hit_blocks"] = counts.hit_blocks;
        out["relayed"] = counts.relayed;
        return out;
    }

    ~PlaneHandle() {
        py::gil_scoped_release released;
        // The fronts go before the plane they read.
        if (http_) http_->stop(0);
        if (front_) front_->stop(0);
    }

   private:
    std::unique_ptr<DataPlane> plane_;
    std::unique_ptr<GrpcFront> front_;
    std::unique_ptr<HttpFront> http_;
    Weights weights_;
};

}  // namespace

void bind_plane(py::module_& m) {
    py::class_<PlaneHandle>(m, "DataPlane", "The native data plane (service/dataplane/native.py).")
        .def(py::init<double, uint64_t, uint64_t, uint64_t, uint64_t, const std::string&, int64_t,
                      int, bool, std::map<std::string, std::string>, std::vector<double>,
                      std::vector<double>>(),
             py::kw_only(), py::arg("ttl"), py::arg("max_entries"), py::arg("max_engine_hashes"),
             py::arg("max_parents"), py::arg("buffer_bytes"), py::arg("topic_filter"),
             py::arg("max_frame_bytes"), py::arg("receive_hwm"), py::arg("replay"),
             py::arg("replay_endpoints"), py::arg("lag_buckets"), py::arg("weights"))
        .def("configure_model", &PlaneHandle::configure_model, py::arg("name"),
             py::arg("key_mode"), py::arg("hash_algorithm"), py::arg("hash_seed"))
        .def("start", &PlaneHandle::start)
        .def("stop", &PlaneHandle::stop, py::arg("drain_seconds"))
        .def("bind", &PlaneHandle::bind, py::arg("endpoint"), py::arg("data_parallel_size"))
        .def("connect", &PlaneHandle::connect, py::arg("pod_id"), py::arg("endpoint"),
             py::arg("replay_endpoint"), py::arg("model"), py::arg("data_parallel_size"))
        .def("disconnect", &PlaneHandle::disconnect, py::arg("pod_id"))
        .def("forget_pod", &PlaneHandle::forget_pod, py::arg("pod_id"), py::arg("at"))
        .def("replay_done", &PlaneHandle::replay_done, py::arg("stream"), py::arg("batches"),
             py::arg("ok"))
        .def("notice_fd", &PlaneHandle::notice_fd)
        .def("take_notices", &PlaneHandle::take_notices)
        .def("locality_tokens", &PlaneHandle::locality_tokens, py::arg("model"),
             py::arg("tokens"), py::arg("lora_name"), py::arg("cache_salt"))
        .def("locality_hashes", &PlaneHandle::locality_hashes, py::arg("model"),
             py::arg("hashes"))
        .def("block_size", &PlaneHandle::block_size, py::arg("model"))
        .def("streams", &PlaneHandle::streams)
        .def("models", &PlaneHandle::models)
        .def("counts", &PlaneHandle::counts)
        .def("set_clock_for_test", &PlaneHandle::set_clock_for_test, py::arg("seconds"))
        .def("serve_grpc", &PlaneHandle::serve_grpc, py::arg("address"), py::arg("backend"),
             py::arg("max_message_bytes"), py::arg("max_tokens"), py::arg("buckets"))
        .def("stop_grpc", &PlaneHandle::stop_grpc, py::arg("grace_seconds"))
        .def("grpc_counts", &PlaneHandle::grpc_counts)
        .def("serve_http", &PlaneHandle::serve_http, py::arg("host"), py::arg("port"),
             py::arg("backend"), py::arg("max_body_bytes"), py::arg("max_tokens"),
             py::arg("buckets"))
        .def("stop_http", &PlaneHandle::stop_http, py::arg("grace_seconds"))
        .def("http_counts", &PlaneHandle::http_counts)
        .def("apply_frame_for_test", &PlaneHandle::apply_frame_for_test, py::arg("topic"),
             py::arg("seq"), py::arg("payload"), py::arg("pod_id") = "", py::arg("model") = "",
             py::arg("rank") = 0, py::arg("replay_endpoint") = "", py::arg("received") = 0.0);
}

}  // namespace kvc
