#include "grpc_front.hpp"

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstring>
#include <mutex>
#include <stdexcept>

#include "grpc_messages.hpp"
#include "plane.hpp"

namespace kvc {

namespace {

enum class Method { kLocality, kScore, kCandidates, kOther };

Method method_of(const std::string& name) {
    if (name == "/kvcache.v1.KVCacheService/Locality") return Method::kLocality;
    if (name == "/kvcache.v1.KVCacheService/Score") return Method::kScore;
    if (name == "/kvcache.v1.KVCacheService/GetCandidates") return Method::kCandidates;
    return Method::kOther;
}

// Headers gRPC sets itself on the relayed call; passing them on would duplicate them.
bool relayed_header(std::string_view key) {
    return !(key.empty() || key[0] == ':' || key.rfind("grpc-", 0) == 0 ||
             key == "content-type" || key == "te" || key == "user-agent");
}

void copy_out(const grpc::ByteBuffer& buffer, std::string& out) {
    std::vector<grpc::Slice> slices;
    out.clear();
    if (!buffer.Dump(&slices).ok()) {
        return;
    }
    for (const grpc::Slice& slice : slices) {
        out.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
    }
}

}  // namespace

struct GrpcFront::Impl final : public grpc::CallbackGenericService {
    Impl(const DataPlane& plane_, GrpcFrontSettings settings_, std::vector<double> bounds)
        : plane(plane_), settings(std::move(settings_)), counter(std::move(bounds)) {}

    grpc::ServerGenericBidiReactor* CreateReactor(
        grpc::GenericCallbackServerContext* context) override;

    const DataPlane& plane;
    const GrpcFrontSettings settings;
    QueryCounter counter;
    std::shared_ptr<grpc::Channel> channel;
    std::unique_ptr<grpc::GenericStub> stub;
    std::unique_ptr<grpc::Server> server;
};

namespace {

// One call on the front. A hot-path method reads its request first and answers it natively
// when it can; otherwise, and for every other method, the call is relayed message by
// message to the Python server and its status passed back. Reactions of the two sides can
// run on different threads at once; each touches its own buffer, and gRPC serialises the
// operations of each stream. Holds on the relayed call keep its OnDone back until no more
// operations will be started on it (one hold per direction).
class Call final : public grpc::ServerGenericBidiReactor {
   public:
    Call(GrpcFront::Impl& front, grpc::GenericCallbackServerContext* context)
        : front_(front), context_(context), method_(method_of(context->method())) {
        if (method_ == Method::kOther) {
            relay();
        }
        StartRead(&down_);
    }

    void OnReadDone(bool ok) override {
        if (!relaying_) {
            if (ok && answer()) {
                StartWriteAndFinish(&reply_, grpc::WriteOptions(), grpc::Status::OK);
                return;
            }
            relay();
        }
        if (ok) {
            upstream_.StartWrite(&down_);
        } else {
            upstream_.StartWritesDone();
        }
    }

    void OnWriteDone(bool ok) override {
        if (ok) {
            upstream_.StartRead(&up_);
            return;
        }
        relayed_context_.TryCancel();  // the caller is gone
        upstream_.RemoveHold();
    }

    void OnCancel() override {
        if (relaying_) {
            relayed_context_.TryCancel();
        }
    }

    void OnDone() override { release(); }

   private:
    class Upstream final : public grpc::ClientBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
       public:
        explicit Upstream(Call& call) : call_(call) {}
        void OnReadDone(bool ok) override {
            if (ok) {
                call_.StartWrite(&call_.up_);
            } else {
                RemoveHold();  // no more replies
            }
        }
        void OnWriteDone(bool ok) override {
            if (ok) {
                call_.StartRead(&call_.down_);
            } else {
                RemoveHold();  // the server side broke: it finishes with its status
            }
        }
        void OnWritesDoneDone(bool) override { RemoveHold(); }
        void OnDone(const grpc::Status& status) override { call_.relayed_done(status); }

       private:
        Call& call_;
    };

    // The hot path: a plain token-ids or block-hashes query, answered from the data plane.
    // False for anything the Python server must see (it then says what is wrong).
    bool answer() {
        thread_local std::string bytes;
        thread_local std::vector<uint32_t> packed;
        copy_out(down_, bytes);
        LocalityRequest request;
        if (!decode_locality_request(bytes, request) || request.needs_python ||
            request.model.empty()) {
            return false;
        }
        int given = !request.token_ids.empty() + !request.token_ids_packed.empty() +
                    !request.block_hashes.empty();
        if (given != 1) {
            return false;
        }
        const GrpcFrontSettings& settings = front_.settings;
        auto started = std::chrono::steady_clock::now();
        std::string model(request.model);
        Answer found;
        uint64_t total;
        if (!request.block_hashes.empty()) {
            if (request.lora_name || request.cache_salt ||
                request.block_hashes.size() > settings.max_tokens) {
                return false;
            }
            Weights weights;
            std::copy(std::begin(settings.weights), std::end(settings.weights), weights.tier);
            front_.plane.locality_hashes(model, request.block_hashes.data(),
                                         request.block_hashes.size(), weights, found);
            total = request.block_hashes.size();
        } else {
            const uint32_t* tokens = request.token_ids.data();
            size_t count = request.token_ids.size();
            if (!request.token_ids_packed.empty()) {
                if (request.token_ids_packed.size() % 4 != 0) {
                    return false;
                }
                count = request.token_ids_packed.size() / 4;
                packed.resize(count);  // aligned: the bytes inside a message may not be
                std::memcpy(packed.data(), request.token_ids_packed.data(), count * 4);
                tokens = packed.data();
            }
            if (count > settings.max_tokens) {
                return false;
            }
            Weights weights;
            std::copy(std::begin(settings.weights), std::end(settings.weights), weights.tier);
            front_.plane.locality_tokens(model, tokens, count, request.lora_name,
                                         request.cache_salt, weights, found);
            total = found.keys;
        }
        std::string reply;
        switch (method_) {
            case Method::kScore:
                encode_score_response(model, found, reply);
                break;
            case Method::kCandidates:
                encode_candidates_response(model, found, total, reply);
                break;
            default:
                encode_locality_response(model, found, total, reply);
        }
        grpc::Slice slice(std::move(reply));
        reply_ = grpc::ByteBuffer(&slice, 1);
        std::chrono::duration<double> took = std::chrono::steady_clock::now() - started;
        front_.counter.observe(took.count(), total,
                               found.pods.empty() ? 0 : found.pods[0].match_length);
        return true;
    }

    void relay() {
        relaying_ = true;
        front_.counter.relayed();
        refs_.fetch_add(1);
        for (const auto& [key, value] : context_->client_metadata()) {
            std::string_view name(key.data(), key.size());
            if (relayed_header(name)) {
                relayed_context_.AddMetadata(std::string(name),
                                             std::string(value.data(), value.size()));
            }
        }
        relayed_context_.set_deadline(context_->deadline());
        front_.stub->PrepareBidiStreamingCall(&relayed_context_, context_->method(),
                                              grpc::StubOptions(), &upstream_);
        upstream_.AddMultipleHolds(2);  // the read side and the write side
        upstream_.StartRead(&up_);
        upstream_.StartCall();
    }

    void relayed_done(const grpc::Status& status) {
        for (const auto& [key, value] : relayed_context_.GetServerTrailingMetadata()) {
            std::string_view name(key.data(), key.size());
            if (relayed_header(name)) {
                context_->AddTrailingMetadata(std::string(name),
                                              std::string(value.data(), value.size()));
            }
        }
        Finish(status);
        release();
    }

    void release() {
        if (refs_.fetch_sub(1) == 1) {
            delete this;
        }
    }

    GrpcFront::Impl& front_;
    grpc::GenericCallbackServerContext* context_;
    const Method method_;
    std::atomic<bool> relaying_{false};
    grpc::ByteBuffer down_, up_, reply_;
    grpc::ClientContext relayed_context_;
    Upstream upstream_{*this};
    std::atomic<int> refs_{1};  // this side's OnDone, and the relayed call's OnDone
};

}  // namespace

grpc::ServerGenericBidiReactor* GrpcFront::Impl::CreateReactor(
    grpc::GenericCallbackServerContext* context) {
    return new Call(*this, context);
}

GrpcFront::GrpcFront(const DataPlane& plane, GrpcFrontSettings settings,
                     std::vector<double> buckets)
    : impl_(std::make_unique<Impl>(plane, std::move(settings), std::move(buckets))) {}

GrpcFront::~GrpcFront() { stop(0); }

int GrpcFront::start() {
    Impl& impl = *impl_;
    grpc::ChannelArguments arguments;
    arguments.SetMaxReceiveMessageSize(impl.settings.max_message_bytes);
    arguments.SetMaxSendMessageSize(impl.settings.max_message_bytes);
    impl.channel = grpc::CreateCustomChannel(impl.settings.backend,
                                             grpc::InsecureChannelCredentials(), arguments);
    impl.stub = std::make_unique<grpc::GenericStub>(impl.channel);
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort(impl.settings.address, grpc::InsecureServerCredentials(), &port);
    builder.SetMaxReceiveMessageSize(impl.settings.max_message_bytes);
    // gRPC sets SO_REUSEPORT by default: a second server on a taken port would then start
    // "fine" and steal half the connections.
    builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
    builder.RegisterCallbackGenericService(&impl);
    impl.server = builder.BuildAndStart();
    if (impl.server == nullptr || port == 0) {
        impl.server.reset();
        throw std::runtime_error("cannot bind gRPC to " + impl.settings.address);
    }
    return port;
}

void GrpcFront::stop(double grace_seconds) {
    Impl& impl = *impl_;
    if (impl.server == nullptr) {
        return;
    }
    auto deadline = std::chrono::system_clock::now() +
                    std::chrono::duration_cast<std::chrono::system_clock::duration>(
                        std::chrono::duration<double>(std::max(0.0, grace_seconds)));
    impl.server->Shutdown(deadline);
    impl.server->Wait();
    impl.server.reset();
}

FrontCounts GrpcFront::counts() const { return impl_->counter.counts(); }

}  // namespace kvc
