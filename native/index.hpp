// The block index: which (pod, DP rank) holds which block of which model, on which tier,
// with copies, TTL and a size bound; the Python twin is service/index/reference.py, and
// tests/conformance holds the two to the same semantics.
//
// Layout (docs/design.md, "The native index"):
// - Each model has a hash table of blocks (segmented_table.hpp: no resize moves more than
//   1/256 of it).
// - A block's bucket points at a singly linked chain of holders, one per slot holding it.
//   A slot is one engine stream (pod, DP rank) of one model.
// - A holder (32 bytes, in a chunked pool) counts its copies per tier and carries the
//   tick of its last store. Each slot keeps its holders in store order (a doubly linked
//   list, oldest at the tail), so TTL expiry and capacity eviction pop from tails and never
//   scan the index.
// - Clearing a slot is O(1): its list becomes garbage and the slot's generation moves on,
//   so lookups and writes ignore the old holders at once; sweep() unlinks them from their
//   chains in bounded steps.
//
// Not thread-safe: the data plane guards it with a reader-writer lock (lookups share it,
// every other call holds it exclusively).
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "segmented_table.hpp"

namespace kvc {

constexpr int kTiers = 3;  // gpu, cpu, disk: the bit positions of service.events.model.Tier
constexpr uint32_t kTicksPerSecond = 16;
using Tick = uint32_t;  // 1/16 s; wraps after 8.5 years, compared by unsigned difference

enum class Eviction : uint8_t { kRemoved, kCleared, kTtl, kCapacity, kCount };
constexpr int kEvictionReasons = static_cast<int>(Eviction::kCount);

// How much of a key chain one slot holds (service.index.protocol.PodMatch).
struct SlotMatch {
    uint16_t slot;
    uint32_t match_length;  // leading keys held on any tier
    uint32_t block_count;   // keys held anywhere
    // Leading keys by the set of tiers they are held on (bitmask of 1 << tier).
    uint32_t prefix_tier_sets[1 << kTiers];
};

struct IndexStats {
    uint64_t entries = 0;
    uint64_t evictions[kEvictionReasons] = {};
    uint64_t garbage = 0;  // holders of cleared slots not yet unlinked
    uint64_t holders_allocated = 0;
    uint64_t bucket_capacity = 0;  // over every segment of every model
};

class BlockIndex {
   public:
    static constexpr uint16_t kMaxSlots = 0xFFFF;  // slot 0xFFFF is never handed out
    static constexpr uint16_t kMaxModels = 0xFFFF;

    BlockIndex(double ttl_seconds, uint64_t max_entries);
    ~BlockIndex();
    BlockIndex(const BlockIndex&) = delete;
    BlockIndex& operator=(const BlockIndex&) = delete;

    static Tick tick_of(double seconds);

    // Registration. Throws std::length_error when out of ids.
    uint16_t add_model(const std::string& name);
    uint16_t add_slot(uint16_t model, const std::string& pod_id, uint32_t rank);
    // Clears the slot and makes its id reusable.
    void release_slot(uint16_t slot);

    // Writes (one event's worth each); capacity is enforced by enforce_capacity().
    void store(uint16_t slot, const uint64_t* keys, size_t count, int tier, Tick now);
    void remove(uint16_t slot, const uint64_t* keys, size_t count, int tier, Tick now);
    void clear(uint16_t slot);
    void enforce_capacity();

    // Deletes at most `budget` expired holders, coldest first, and returns how many; also
    // unlinks a bounded amount of garbage (cleared slots' holders).
    size_t sweep(Tick now, size_t budget);

    // Matches of a key chain per slot of `model` holding any key (in slot order).
    // `slot_filter`, when not empty, restricts the answer to those slots.
    void lookup(uint16_t model, const uint64_t* keys, size_t count, Tick now,
                const std::vector<uint16_t>& slot_filter, std::vector<SlotMatch>& out) const;

    IndexStats stats() const;
    uint64_t slot_entries(uint16_t slot) const;
    uint64_t model_keys(uint16_t model) const;  // buckets in use, garbage-only ones included
    uint64_t live_keys(uint16_t model) const;   // exact, by a scan of the model's table (tests)
    bool slot_used(uint16_t slot) const;

   private:
    struct Holder {
        uint64_t key;
        uint32_t next;   // next holder of the same block
        uint32_t older;  // the slot's store order (or a garbage list)
        uint32_t newer;
        Tick stamp;
        uint16_t slot;
        uint16_t model;
        uint8_t gen;  // the slot's generation when created
        uint8_t copies[kTiers];
    };
    static_assert(sizeof(Holder) == 32, "a holder is 32 bytes");

    struct Bucket {
        uint64_t key;
        uint32_t head;  // first holder; 0 marks an empty bucket
        uint32_t spare;
    };
    static constexpr uint32_t kNoHolderYet = 0xFFFFFFFF;  // a new bucket, until store() links one
    struct BucketTraits {
        static uint64_t key(const Bucket& bucket) { return bucket.key; }
        static bool empty(const Bucket& bucket) { return bucket.head == 0; }
        static void set_empty(Bucket& bucket) { bucket.head = 0; }
        static void init(Bucket& bucket, uint64_t key) {
            bucket.key = key;
            bucket.head = kNoHolderYet;
        }
    };
    using Buckets = SegmentedTable<Bucket, BucketTraits>;

    struct Model;
    struct Slot;
    struct GarbageBatch {
        uint32_t newest;  // walked through `older`
        uint64_t remaining;
        uint16_t slot;
    };

    Holder& at(uint32_t index) { return chunks_[index >> kChunkBits][index & kChunkMask]; }
    const Holder& at(uint32_t index) const {
        return chunks_[index >> kChunkBits][index & kChunkMask];
    }
    uint32_t alloc_holder();
    void free_holder(uint32_t index);

    bool live(const Holder& holder) const;
    bool expired(const Holder& holder, Tick now) const {
        return static_cast<Tick>(now - holder.stamp) >= ttl_ticks_;
    }
    uint32_t find_holder(const Bucket& bucket, uint16_t slot) const;
    void link_newest(Slot& slot, uint32_t index);
    void unlink_order(Slot& slot, uint32_t index);
    void unlink_chain(uint32_t index);
    void delete_holder(uint32_t index, Eviction reason);
    size_t wipe_garbage(size_t budget);
    void wipe_slot_garbage(uint16_t slot);
    bool colder(uint16_t a, uint16_t b) const;

    static constexpr int kChunkBits = 16;
    static constexpr uint32_t kChunkMask = (1u << kChunkBits) - 1;

    Tick ttl_ticks_;
    uint64_t max_entries_;
    uint64_t entries_ = 0;
    uint64_t evictions_[kEvictionReasons] = {};
    uint64_t garbage_ = 0;

    std::vector<std::unique_ptr<Holder[]>> chunks_;
    uint32_t next_unused_ = 1;  // holder 0 is the null link
    uint32_t free_list_ = 0;
    uint64_t allocated_ = 0;

    std::vector<std::unique_ptr<Model>> models_;
    std::vector<Slot> slots_;
    std::vector<uint16_t> free_slots_;
    std::deque<GarbageBatch> garbage_batches_;
};

}  // namespace kvc
