#include "index.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>

namespace kvc {

namespace {

constexpr uint8_t kSaturated = 255;
// Garbage holders unlinked per sweep: bounded, so one sweep never holds writers up long.
constexpr size_t kWipeBudget = 20000;

}  // namespace

struct BlockIndex::Model {
    std::string name;
    Buckets buckets;
};

struct BlockIndex::Slot {
    bool used = false;
    uint16_t model = 0;
    uint8_t gen = 0;
    uint8_t pending_clears = 0;  // garbage batches of this slot not yet wiped
    uint32_t newest = 0;
    uint32_t oldest = 0;
    uint64_t entries = 0;
    std::string pod_id;
    uint32_t rank = 0;
};

BlockIndex::BlockIndex(double ttl_seconds, uint64_t max_entries)
    : ttl_ticks_(std::max<Tick>(1, static_cast<Tick>(std::ceil(ttl_seconds * kTicksPerSecond)))),
      max_entries_(max_entries) {
    if (!(ttl_seconds > 0) || ttl_seconds * kTicksPerSecond >= 0x7FFFFFFF) {
        throw std::invalid_argument("ttl must be positive and under 4 years");
    }
    if (max_entries == 0) {
        throw std::invalid_argument("max_entries must be positive");
    }
}

BlockIndex::~BlockIndex() = default;

Tick BlockIndex::tick_of(double seconds) {
    return static_cast<Tick>(static_cast<int64_t>(std::floor(seconds * kTicksPerSecond)));
}

// -- registration ----------------------------------------------------------------------

uint16_t BlockIndex::add_model(const std::string& name) {
    if (models_.size() >= kMaxModels) {
        throw std::length_error("too many models");
    }
    models_.push_back(std::make_unique<Model>());
    models_.back()->name = name;
    return static_cast<uint16_t>(models_.size() - 1);
}

uint16_t BlockIndex::add_slot(uint16_t model, const std::string& pod_id, uint32_t rank) {
    uint16_t id;
    if (!free_slots_.empty()) {
        id = free_slots_.back();
        free_slots_.pop_back();
    } else {
        if (slots_.size() >= kMaxSlots) {
            throw std::length_error("too many engine streams");
        }
        slots_.emplace_back();
        id = static_cast<uint16_t>(slots_.size() - 1);
    }
    Slot& slot = slots_[id];
    slot.used = true;
    slot.model = model;
    slot.newest = slot.oldest = 0;
    slot.entries = 0;
    slot.pod_id = pod_id;
    slot.rank = rank;
    return id;
}

void BlockIndex::release_slot(uint16_t id) {
    clear(id);
    slots_[id].used = false;
    free_slots_.push_back(id);
}

bool BlockIndex::slot_used(uint16_t slot) const {
    return slot < slots_.size() && slots_[slot].used;
}

// -- the holder pool -------------------------------------------------------------------

uint32_t BlockIndex::alloc_holder() {
    allocated_++;
    if (free_list_ != 0) {
        uint32_t index = free_list_;
        free_list_ = at(index).next;
        return index;
    }
    if ((next_unused_ >> kChunkBits) >= chunks_.size()) {
        if (chunks_.size() >= (1u << (32 - kChunkBits))) {
            throw std::length_error("holder pool exhausted");
        }
        chunks_.emplace_back(new Holder[1u << kChunkBits]);
    }
    return next_unused_++;
}

void BlockIndex::free_holder(uint32_t index) {
    allocated_--;
    at(index).next = free_list_;
    free_list_ = index;
}

// -- holders ---------------------------------------------------------------------------

bool BlockIndex::live(const Holder& holder) const {
    const Slot& slot = slots_[holder.slot];
    return slot.used && slot.gen == holder.gen && slot.model == holder.model;
}

uint32_t BlockIndex::find_holder(const Bucket& bucket, uint16_t slot) const {
    for (uint32_t h = bucket.head; h != 0; h = at(h).next) {
        const Holder& holder = at(h);
        if (holder.slot == slot && live(holder)) {
            return h;
        }
    }
    return 0;
}

void BlockIndex::link_newest(Slot& slot, uint32_t index) {
    Holder& holder = at(index);
    holder.newer = 0;
    holder.older = slot.newest;
    if (slot.newest != 0) {
        at(slot.newest).newer = index;
    } else {
        slot.oldest = index;
    }
    slot.newest = index;
}

void BlockIndex::unlink_order(Slot& slot, uint32_t index) {
    Holder& holder = at(index);
    if (holder.newer != 0) {
        at(holder.newer).older = holder.older;
    } else {
        slot.newest = holder.older;
    }
    if (holder.older != 0) {
        at(holder.older).newer = holder.newer;
    } else {
        slot.oldest = holder.newer;
    }
}

void BlockIndex::unlink_chain(uint32_t index) {
    Holder& holder = at(index);
    Buckets& buckets = models_[holder.model]->buckets;
    Bucket* bucket = buckets.find(holder.key);
    if (bucket->head == index) {
        if (holder.next == 0) {
            buckets.erase(bucket);
        } else {
            bucket->head = holder.next;
        }
        return;
    }
    uint32_t previous = bucket->head;
    while (at(previous).next != index) {
        previous = at(previous).next;
    }
    at(previous).next = holder.next;
}

void BlockIndex::delete_holder(uint32_t index, Eviction reason) {
    Holder& holder = at(index);
    Slot& slot = slots_[holder.slot];
    unlink_order(slot, index);
    unlink_chain(index);
    slot.entries--;
    entries_--;
    evictions_[static_cast<int>(reason)]++;
    free_holder(index);
}

// -- writes ----------------------------------------------------------------------------

void BlockIndex::store(uint16_t slot_id, const uint64_t* keys, size_t count, int tier, Tick now) {
    Slot& slot = slots_[slot_id];
    Buckets& buckets = models_[slot.model]->buckets;
    for (size_t i = 0; i < count; i++) {
        auto [bucket, inserted] = buckets.insert(keys[i]);
        uint32_t index = inserted ? 0 : find_holder(*bucket, slot_id);
        if (index != 0 && expired(at(index), now)) {
            // Gone since its TTL ran out: it starts again from this copy.
            std::memset(at(index).copies, 0, kTiers);
            evictions_[static_cast<int>(Eviction::kTtl)]++;
        } else if (index == 0) {
            index = alloc_holder();
            Holder& holder = at(index);
            holder.key = keys[i];
            holder.slot = slot_id;
            holder.model = slot.model;
            holder.gen = slot.gen;
            std::memset(holder.copies, 0, kTiers);
            holder.next = inserted ? 0 : bucket->head;
            bucket->head = index;
            holder.older = holder.newer = 0;
            slot.entries++;
            entries_++;
            link_newest(slot, index);
        }
        Holder& holder = at(index);
        if (holder.copies[tier] != kSaturated) {
            holder.copies[tier]++;
        }
        holder.stamp = now;
        if (slot.newest != index) {
            unlink_order(slot, index);
            link_newest(slot, index);
        }
    }
}

void BlockIndex::remove(uint16_t slot_id, const uint64_t* keys, size_t count, int tier, Tick now) {
    const Buckets& buckets = models_[slots_[slot_id].model]->buckets;
    for (size_t i = 0; i < count; i++) {
        Bucket* bucket = buckets.find(keys[i]);
        if (bucket == nullptr) {
            continue;
        }
        uint32_t index = find_holder(*bucket, slot_id);
        if (index == 0) {
            continue;
        }
        Holder& holder = at(index);
        if (expired(holder, now) || holder.copies[tier] == 0) {
            continue;
        }
        if (holder.copies[tier] != kSaturated) {
            holder.copies[tier]--;
        }
        bool held = false;
        for (int t = 0; t < kTiers; t++) {
            held = held || holder.copies[t] != 0;
        }
        if (!held) {
            delete_holder(index, Eviction::kRemoved);
        }
    }
}

void BlockIndex::clear(uint16_t slot_id) {
    Slot& slot = slots_[slot_id];
    if (slot.newest == 0) {
        return;  // nothing held: the generation need not move
    }
    // Every generation step leaves one garbage batch behind, so with fewer than 255 batches
    // pending no garbage can carry the generation the slot moves to.
    if (slot.pending_clears == 255) {
        wipe_slot_garbage(slot_id);
    }
    garbage_batches_.push_back(GarbageBatch{slot.newest, slot.entries, slot_id});
    slot.pending_clears++;
    garbage_ += slot.entries;
    evictions_[static_cast<int>(Eviction::kCleared)] += slot.entries;
    entries_ -= slot.entries;
    slot.entries = 0;
    slot.newest = slot.oldest = 0;
    slot.gen++;
}

bool BlockIndex::colder(uint16_t a, uint16_t b) const {
    const Slot& x = slots_[a];
    const Slot& y = slots_[b];
    Tick stamp_a = at(x.oldest).stamp;
    Tick stamp_b = at(y.oldest).stamp;
    if (stamp_a != stamp_b) {
        // Stamps wrap: compare their difference, as ages are far below half the range.
        return static_cast<int32_t>(stamp_a - stamp_b) < 0;
    }
    const std::string& model_a = models_[x.model]->name;
    const std::string& model_b = models_[y.model]->name;
    if (model_a != model_b) {
        return model_a < model_b;
    }
    if (x.pod_id != y.pod_id) {
        return x.pod_id < y.pod_id;
    }
    return x.rank < y.rank;
}

void BlockIndex::enforce_capacity() {
    if (entries_ <= max_entries_) {
        return;
    }
    // A heap of slots by their oldest holder: the root holds the coldest entry of all.
    std::vector<uint16_t> heap;
    for (size_t id = 0; id < slots_.size(); id++) {
        if (slots_[id].used && slots_[id].oldest != 0) {
            heap.push_back(static_cast<uint16_t>(id));
        }
    }
    auto warmer = [this](uint16_t a, uint16_t b) { return colder(b, a); };
    std::make_heap(heap.begin(), heap.end(), warmer);
    while (entries_ > max_entries_ && !heap.empty()) {
        std::pop_heap(heap.begin(), heap.end(), warmer);
        uint16_t id = heap.back();
        delete_holder(slots_[id].oldest, Eviction::kCapacity);
        if (slots_[id].oldest != 0) {
            std::push_heap(heap.begin(), heap.end(), warmer);
        } else {
            heap.pop_back();
        }
    }
}

// -- background work -------------------------------------------------------------------

size_t BlockIndex::wipe_garbage(size_t budget) {
    size_t visited = 0;
    while (visited < budget && !garbage_batches_.empty()) {
        GarbageBatch& batch = garbage_batches_.front();
        while (visited < budget && batch.newest != 0) {
            uint32_t index = batch.newest;
            batch.newest = at(index).older;
            unlink_chain(index);
            free_holder(index);
            garbage_--;
            visited++;
        }
        if (batch.newest == 0) {
            slots_[batch.slot].pending_clears--;
            garbage_batches_.pop_front();
        }
    }
    return visited;
}

void BlockIndex::wipe_slot_garbage(uint16_t slot) {
    for (auto it = garbage_batches_.begin(); it != garbage_batches_.end();) {
        if (it->slot != slot) {
            ++it;
            continue;
        }
        for (uint32_t index = it->newest; index != 0;) {
            uint32_t older = at(index).older;
            unlink_chain(index);
            free_holder(index);
            garbage_--;
            index = older;
        }
        slots_[slot].pending_clears--;
        it = garbage_batches_.erase(it);
    }
}

size_t BlockIndex::sweep(Tick now, size_t budget) {
    wipe_garbage(kWipeBudget);
    // Expired holders sit at the old end of their slot's list: take them coldest first (as
    // capacity eviction does), from a heap of the slots whose oldest holder has expired.
    std::vector<uint16_t> heap;
    for (size_t id = 0; id < slots_.size(); id++) {
        const Slot& slot = slots_[id];
        if (slot.used && slot.oldest != 0 && expired(at(slot.oldest), now)) {
            heap.push_back(static_cast<uint16_t>(id));
        }
    }
    auto warmer = [this](uint16_t a, uint16_t b) { return colder(b, a); };
    std::make_heap(heap.begin(), heap.end(), warmer);
    size_t deleted = 0;
    while (deleted < budget && !heap.empty()) {
        std::pop_heap(heap.begin(), heap.end(), warmer);
        Slot& slot = slots_[heap.back()];
        delete_holder(slot.oldest, Eviction::kTtl);
        deleted++;
        if (slot.oldest != 0 && expired(at(slot.oldest), now)) {
            std::push_heap(heap.begin(), heap.end(), warmer);
        } else {
            heap.pop_back();
        }
    }
    return deleted;
}

// -- reads -----------------------------------------------------------------------------

void BlockIndex::lookup(uint16_t model_id, const uint64_t* keys, size_t count, Tick now,
                        const std::vector<uint16_t>& slot_filter,
                        std::vector<SlotMatch>& out) const {
    out.clear();
    if (model_id >= models_.size()) {
        return;
    }
    const Buckets& buckets = models_[model_id]->buckets;
    // slot -> position in `out`, for this call only (entries reset before returning).
    thread_local std::vector<int32_t> position;
    if (position.size() < slots_.size()) {
        position.resize(slots_.size(), -1);
    }
    bool filtered = !slot_filter.empty();
    if (filtered) {
        for (uint16_t slot : slot_filter) {
            if (slot < slots_.size()) {
                position[slot] = -2;  // wanted, not yet seen
            }
        }
    }
    for (size_t i = 0; i < count; i++) {
        const Bucket* bucket = buckets.find(keys[i]);
        if (bucket == nullptr) {
            continue;
        }
        for (uint32_t h = bucket->head; h != 0; h = at(h).next) {
            const Holder& holder = at(h);
            if (!live(holder) || expired(holder, now)) {
                continue;
            }
            int32_t& where = position[holder.slot];
            if (filtered && where == -1) {
                continue;
            }
            if (where < 0) {
                where = static_cast<int32_t>(out.size());
                out.push_back(SlotMatch{holder.slot, 0, 0, {}});
            }
            SlotMatch& match = out[where];
            match.block_count++;
            if (match.match_length == i) {
                match.match_length++;
                unsigned tiers = 0;
                for (int t = 0; t < kTiers; t++) {
                    tiers |= holder.copies[t] != 0 ? 1u << t : 0u;
                }
                match.prefix_tier_sets[tiers]++;
            }
        }
    }
    for (const SlotMatch& match : out) {
        position[match.slot] = -1;
    }
    for (uint16_t slot : slot_filter) {
        if (slot < slots_.size()) {
            position[slot] = -1;
        }
    }
    std::sort(out.begin(), out.end(),
              [](const SlotMatch& a, const SlotMatch& b) { return a.slot < b.slot; });
}

IndexStats BlockIndex::stats() const {
    IndexStats stats;
    stats.entries = entries_;
    std::copy(std::begin(evictions_), std::end(evictions_), stats.evictions);
    stats.garbage = garbage_;
    stats.holders_allocated = allocated_;
    for (const auto& model : models_) {
        stats.bucket_capacity += model->buckets.capacity();
    }
    return stats;
}

uint64_t BlockIndex::slot_entries(uint16_t slot) const {
    return slot < slots_.size() ? slots_[slot].entries : 0;
}

uint64_t BlockIndex::live_keys(uint16_t model) const {
    uint64_t keys = 0;
    models_[model]->buckets.for_each([&](const Bucket& bucket) {
        for (uint32_t h = bucket.head; h != 0; h = at(h).next) {
            if (live(at(h))) {
                keys++;
                return;
            }
        }
    });
    return keys;
}

uint64_t BlockIndex::model_keys(uint16_t model) const {
    return model < models_.size() ? models_[model]->buckets.size() : 0;
}

}  // namespace kvc
