// libFuzzer target for kvc::decode_batch (scripts/fuzz_decode.sh builds and runs it): any
// bytes, under AddressSanitizer and UBSan, and the promises callers rely on, checked on
// every input:
// - an error leaves an empty batch; a success has no error;
// - the events' ranges tile Batch's arrays in order, and each kind has only its own fields;
// - a BlockStored's tokens fill its blocks, its extra_keys has one entry per block;
// - every view lies inside the payload (an extra entry's strs inside the entry);
// - the result does not depend on what the reused Batch held before.
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "decode.hpp"
#include "msgpack_reader.hpp"

namespace {

void check(bool ok) {
    if (!ok) {
        std::abort();
    }
}

bool within(std::string_view view, std::string_view outer) {
    return view.empty() || (view.data() >= outer.data() &&
                            view.data() + view.size() <= outer.data() + outer.size());
}

bool same_view(std::string_view a, std::string_view b) {
    return a.data() == b.data() && a.size() == b.size();
}

bool same_event(const kvc::Event& a, const kvc::Event& b) {
    return a.kind == b.kind && a.tier == b.tier && a.has_parent == b.has_parent &&
           a.parent == b.parent && a.block_size == b.block_size &&
           a.hashes_begin == b.hashes_begin && a.hashes_count == b.hashes_count &&
           a.tokens_begin == b.tokens_begin && a.tokens_count == b.tokens_count &&
           a.has_lora_name == b.has_lora_name && same_view(a.lora_name, b.lora_name) &&
           a.has_lora_id == b.has_lora_id && a.lora_id_unsigned == b.lora_id_unsigned &&
           a.lora_id == b.lora_id && a.has_extra_keys == b.has_extra_keys &&
           a.extras_begin == b.extras_begin;
}

bool same_extra(const kvc::BlockExtra& a, const kvc::BlockExtra& b) {
    return a.kind == b.kind && a.length == b.length && a.first_is_str == b.first_is_str &&
           same_view(a.first, b.first) && a.second_is_str == b.second_is_str &&
           same_view(a.second, b.second) && same_view(a.bytes, b.bytes);
}

bool same_batch(const kvc::Batch& a, const kvc::Batch& b) {
    bool same = a.error == b.error && a.has_rank == b.has_rank && a.rank == b.rank &&
                (a.ts == b.ts || (a.ts != a.ts && b.ts != b.ts)) &&  // NaN == NaN here
                a.events.size() == b.events.size() && a.hashes == b.hashes &&
                a.tokens == b.tokens && a.extras.size() == b.extras.size();
    for (size_t i = 0; same && i < a.events.size(); i++) {
        same = same_event(a.events[i], b.events[i]);
    }
    for (size_t i = 0; same && i < a.extras.size(); i++) {
        same = same_extra(a.extras[i], b.extras[i]);
    }
    for (int i = 0; same && i < kvc::kEventSkipCount; i++) {
        same = a.skipped[i] == b.skipped[i];
    }
    return same;
}

void check_extra(const kvc::BlockExtra& extra, std::string_view payload) {
    check(within(extra.bytes, payload));
    kvc::msgpack::Reader entry(extra.bytes);
    kvc::msgpack::Value head;
    check(entry.read(head));
    if (extra.kind == kvc::BlockExtra::kNil) {
        check(head.type == kvc::msgpack::Type::kNil && extra.length == 0 &&
              !extra.first_is_str && !extra.second_is_str);
        return;
    }
    check(extra.kind == kvc::BlockExtra::kArray && head.type == kvc::msgpack::Type::kArray &&
          head.count == extra.length);
    check(!extra.first_is_str || (extra.length >= 1 && within(extra.first, extra.bytes)));
    check(!extra.second_is_str || (extra.length >= 2 && within(extra.second, extra.bytes)));
}

void check_batch(const kvc::Batch& batch, bool decoded, std::string_view payload) {
    check(decoded == (batch.error == kvc::BatchError::kNone));
    uint64_t skipped = 0;
    for (uint32_t count : batch.skipped) {
        skipped += count;
    }
    if (!decoded) {
        check(batch.events.empty() && batch.hashes.empty() && batch.tokens.empty() &&
              batch.extras.empty() && skipped == 0 && !batch.has_rank);
        return;
    }
    check(batch.events.size() + skipped <= payload.size());  // an event takes a byte at least
    uint64_t hashes = 0, tokens = 0, extras = 0;
    for (const kvc::Event& e : batch.events) {
        check(static_cast<int>(e.tier) < kvc::kTierCount);
        check(e.hashes_begin == hashes && e.tokens_begin == tokens && e.extras_begin == extras);
        hashes += e.hashes_count;
        if (e.kind != kvc::EventKind::kStored) {
            check(!e.has_parent && e.block_size == 0 && e.tokens_count == 0 &&
                  !e.has_lora_name && !e.has_lora_id && !e.has_extra_keys);
            check(e.kind == kvc::EventKind::kRemoved ||
                  (e.hashes_count == 0 && e.tier == kvc::Tier::kGpu));
            continue;
        }
        tokens += e.tokens_count;
        check(e.tokens_count == 0 ||
              e.tokens_count == static_cast<unsigned __int128>(e.hashes_count) * e.block_size);
        check(!e.has_lora_name || within(e.lora_name, payload));
        check(!e.lora_id_unsigned || (e.has_lora_id && e.lora_id < 0));
        if (e.has_extra_keys) {
            for (uint32_t i = 0; i < e.hashes_count; i++) {
                check_extra(batch.extras[e.extras_begin + i], payload);
            }
            extras += e.hashes_count;
        }
    }
    check(hashes == batch.hashes.size() && tokens == batch.tokens.size() &&
          extras == batch.extras.size());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    const std::string_view payload(reinterpret_cast<const char*>(data), size);
    static kvc::Batch reused;  // holds the previous input's batch, as on the ingest path
    const bool decoded = kvc::decode_batch(payload, reused);
    check_batch(reused, decoded, payload);
    kvc::Batch fresh;
    check(kvc::decode_batch(payload, fresh) == decoded && same_batch(reused, fresh));
    return 0;
}
