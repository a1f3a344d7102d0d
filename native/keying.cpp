#include "keying.hpp"

#include <stdexcept>

#include "token_keys.hpp"

namespace kvc {

namespace {

// A block's extra keys with the LoRA name taken off the front (translate.py _without_lora):
// how many are left, and the first of them when it is a str.
struct Rest {
    uint32_t length;
    bool first_is_str;
    std::string_view first;
};

Rest rest_of(const BlockExtra& extra, const Event& event) {
    if (event.has_lora_name && extra.length > 0 && extra.first_is_str &&
        extra.first == event.lora_name) {
        return Rest{extra.length - 1, extra.second_is_str, extra.second};
    }
    return Rest{extra.length, extra.first_is_str, extra.first};
}

// translate.py _is_plain: no extra keys but the LoRA name, and on a prompt's first block
// perhaps a cache_salt string.
bool is_plain(const BlockExtra& extra, const Event& event, bool first) {
    if (extra.kind == BlockExtra::kNil) {
        return true;
    }
    Rest rest = rest_of(extra, event);
    return rest.length == 0 || (first && rest.length == 1 && rest.first_is_str);
}

struct Plainness {
    std::optional<std::string_view> salt;
    bool plain = true;
};

// translate.py _salt_and_plainness.
Plainness plainness(const Batch& batch, const Event& event, bool starts_prompt) {
    Plainness result;
    if (!event.has_extra_keys || event.hashes_count == 0) {
        return result;
    }
    const BlockExtra* extras = &batch.extras[event.extras_begin];
    if (starts_prompt && extras[0].kind == BlockExtra::kArray) {
        Rest rest = rest_of(extras[0], event);
        if (rest.length == 1 && rest.first_is_str) {
            result.salt = rest.first;
        }
    }
    for (uint32_t i = 0; i < event.hashes_count && result.plain; i++) {
        result.plain = is_plain(extras[i], event, starts_prompt && i == 0);
    }
    return result;
}

std::optional<std::string_view> lora_of(const Event& event) {
    if (event.has_lora_name) {
        return event.lora_name;
    }
    return std::nullopt;
}

uint64_t root_of(std::optional<std::string_view> lora, std::optional<std::string_view> salt) {
    uint64_t root = lora ? tokens_root(*lora) : tokens_root();
    return salt ? salted_root(root, *salt) : root;
}

}  // namespace

ModelKeying::ModelKeying(std::string name, const KeyingSettings& settings,
                         uint64_t max_engine_hashes, uint64_t max_parents)
    : name_(std::move(name)), settings_(settings), engine_keys_(max_engine_hashes) {
    if (settings_.mode == KeyMode::kVllm) {
        hasher_ = std::make_unique<VllmHasher>(settings_.algorithm,
                                               settings_.seed ? *settings_.seed : "vllm-none-hash");
        digests_ = std::make_unique<DigestMemory>(max_parents);
    }
}

uint64_t ModelKeying::translate(const Batch& batch, const Event& event,
                                std::vector<uint64_t>& scratch, IndexOp& op,
                                uint64_t (&skips)[kTranslateSkipCount]) {
    op = IndexOp{};
    uint64_t mismatches = 0;
    switch (event.kind) {
        case EventKind::kStored:
            stored(batch, event, scratch, op, skips, mismatches);
            break;
        case EventKind::kRemoved:
            resolve(batch, event, scratch, op, skips);
            if (op.count != 0) {
                op.kind = IndexOp::kRemove;
            }
            break;
        case EventKind::kCleared:
            op.kind = IndexOp::kClear;
            break;
    }
    return mismatches;
}

void ModelKeying::resolve(const Batch& batch, const Event& event, std::vector<uint64_t>& scratch,
                          IndexOp& op, uint64_t (&skips)[kTranslateSkipCount]) const {
    const uint64_t* hashes = &batch.hashes[event.hashes_begin];
    op.tier = static_cast<int>(event.tier);
    if (settings_.mode == KeyMode::kVllm) {
        op.keys = hashes;
        op.count = event.hashes_count;
        return;
    }
    scratch.clear();
    for (uint32_t i = 0; i < event.hashes_count; i++) {
        uint64_t key;
        if (engine_keys_.get(hashes[i], key)) {
            scratch.push_back(key);
        }
    }
    if (scratch.size() < event.hashes_count) {
        skips[static_cast<int>(TranslateSkip::kUnmapped)]++;
    }
    op.keys = scratch.data();
    op.count = scratch.size();
}

void ModelKeying::stored(const Batch& batch, const Event& event, std::vector<uint64_t>& scratch,
                         IndexOp& op, uint64_t (&skips)[kTranslateSkipCount],
                         uint64_t& mismatches) {
    if (event.tokens_count == 0 || event.block_size == 0) {
        // An offload event: hashes only, and it never sets the block size.
        resolve(batch, event, scratch, op, skips);
        if (op.count != 0) {
            op.kind = IndexOp::kStore;
        }
        return;
    }
    block_size_ = event.block_size;
    const uint64_t* hashes = &batch.hashes[event.hashes_begin];
    op.tier = static_cast<int>(event.tier);
    if (settings_.mode == KeyMode::kVllm) {
        mismatches = check(batch, event);
        op.kind = IndexOp::kStore;
        op.keys = hashes;
        op.count = event.hashes_count;
        return;
    }
    bool has_parent = false;
    uint64_t parent = 0;
    if (event.has_parent) {
        // A parent in use (a shared system prompt, say) counts as recently stored.
        if (!engine_keys_.touch(event.parent, parent)) {
            skips[static_cast<int>(TranslateSkip::kUnknownParent)]++;
            return;
        }
        has_parent = true;
    }
    Plainness plain = plainness(batch, event, !has_parent);
    const uint32_t* tokens = &batch.tokens[event.tokens_begin];
    const size_t size = static_cast<size_t>(event.block_size);
    scratch.resize(event.hashes_count);
    if (plain.plain) {
        uint64_t seed = has_parent ? parent : root_of(lora_of(event), plain.salt);
        chain_keys(tokens, event.tokens_count, size, seed, scratch.data());
    } else {
        // Some block carries multimodal keys: key block by block, those by engine hash.
        const BlockExtra* extras = &batch.extras[event.extras_begin];
        for (uint32_t i = 0; i < event.hashes_count; i++) {
            bool first = !has_parent && i == 0;
            uint64_t key = hashes[i];
            if (is_plain(extras[i], event, first)) {
                uint64_t seed = has_parent ? parent
                                           : root_of(lora_of(event), i == 0 ? plain.salt
                                                                             : std::nullopt);
                chain_keys(tokens + i * size, size, size, seed, &key);
            }
            scratch[i] = key;
            parent = key;
            has_parent = true;
        }
    }
    for (uint32_t i = 0; i < event.hashes_count; i++) {
        engine_keys_.put(hashes[i], scratch[i]);
    }
    op.kind = IndexOp::kStore;
    op.keys = scratch.data();
    op.count = event.hashes_count;
}

uint64_t ModelKeying::check(const Batch& batch, const Event& event) {
    Plainness plain = plainness(batch, event, !event.has_parent);
    if (!plain.plain) {
        return 0;
    }
    HashCheck outcome;
    try {
        outcome = check_published(
            *hasher_, *digests_, &batch.tokens[event.tokens_begin], event.tokens_count,
            static_cast<size_t>(event.block_size), &batch.hashes[event.hashes_begin],
            event.hashes_count, event.has_parent ? &event.parent : nullptr, lora_of(event),
            plain.salt);
    } catch (const std::invalid_argument&) {
        return 0;  // tokens that do not make the event's blocks: the decoder refuses those
    }
    if (outcome == HashCheck::kMatch) {
        hash_matches_++;
    } else if (outcome == HashCheck::kMismatch) {
        hash_mismatches_++;
        return 1;
    }
    return 0;
}

void ModelKeying::query_keys(const uint32_t* tokens, size_t count,
                             std::optional<std::string_view> lora,
                             std::optional<std::string_view> salt,
                             std::vector<uint64_t>& out) const {
    out.clear();
    if (block_size_ == 0) {
        return;
    }
    const size_t size = static_cast<size_t>(block_size_);
    if (settings_.mode == KeyMode::kTokens) {
        out.resize(count / size);
        chain_keys(tokens, count, size, root_of(lora, salt), out.data());
        return;
    }
    // From the root, not remembering: the digest memory is neither read nor written.
    vllm_block_keys(*hasher_, *digests_, tokens, count, size, nullptr, lora, salt, false, out);
}

void ModelKeying::keys_of_engine_hashes(const uint64_t* hashes, size_t count,
                                        std::vector<uint64_t>& out) const {
    out.clear();
    if (settings_.mode == KeyMode::kVllm) {
        out.assign(hashes, hashes + count);
        return;
    }
    for (size_t i = 0; i < count; i++) {
        uint64_t key;
        if (!engine_keys_.get(hashes[i], key)) {
            break;
        }
        out.push_back(key);
    }
}

}  // namespace kvc
