// Engine block hash -> our block key, for one model in tokens mode (the Python twin is
// service/index/translate.py, EngineKeys). Bounded: two generations, each at most half the
// bound; when the young one fills it becomes the old one and the previous old one is
// dropped whole. A hash looked up as a parent (touch) moves to the young generation, so a
// shared prefix's mapping outlives one-off chains. Every operation is O(1); no resize moves
// more than a small part of a generation (segmented_table.hpp).
#pragma once

#include <cstdint>
#include <memory>
#include <unordered_map>

#include "segmented_table.hpp"

namespace kvc {

class EngineKeyMap {
   public:
    explicit EngineKeyMap(uint64_t bound);

    // The key of `hash`, without moving it (BlockRemoved, offload tiers, queries).
    bool get(uint64_t hash, uint64_t& key) const;
    // The key of `hash`, now counted as recently used (a parent in a BlockStored).
    bool touch(uint64_t hash, uint64_t& key);
    void put(uint64_t hash, uint64_t key);

    uint64_t size() const;
    uint64_t capacity() const;

   private:
    // `stored` is the key XOR kTag, so that a zeroed entry (stored == 0) is empty; the one
    // key equal to kTag lives in `tagged` instead.
    struct Entry {
        uint64_t hash;
        uint64_t stored;
    };
    struct Traits {
        static uint64_t key(const Entry& entry) { return entry.hash; }
        static bool empty(const Entry& entry) { return entry.stored == 0; }
        static void set_empty(Entry& entry) { entry.stored = 0; }
        static void init(Entry& entry, uint64_t hash) {
            entry.hash = hash;
            entry.stored = 1;  // not empty; put() writes the key right after
        }
    };
    static constexpr uint64_t kTag = 0x9E3779B97F4A7C15ULL;

    struct Generation {
        SegmentedTable<Entry, Traits> table;
        std::unordered_map<uint64_t, uint64_t> tagged;
        uint64_t size() const { return table.size() + tagged.size(); }
        bool get(uint64_t hash, uint64_t& key) const;
        void put(uint64_t hash, uint64_t key);
    };

    void put_young(uint64_t hash, uint64_t key);

    uint64_t half_;
    std::unique_ptr<Generation> young_;
    std::unique_ptr<Generation> old_;
};

}  // namespace kvc
