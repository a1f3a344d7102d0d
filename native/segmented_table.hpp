// A hash table of 64-bit keys cut into 256 open-addressing segments. Each segment grows on
// its own, by half, so a resize moves 1/256 of the table and at most a third of it again:
// at 16M keys ~65k entries, under a millisecond, where one big table would stall its writer
// (and every reader waiting on it) for tens of ms.
//
// Robin Hood linear probing: an entry far from its home slot may take the place of one
// nearer its own, so probe runs stay short and a search for an absent key stops as soon as
// it meets an entry closer to home than itself. That keeps both hits and misses to a cache
// line or two at 90% load, where plain linear probing needs a low load (half the memory
// wasted) for its misses. Deletion shifts the run back: no tombstones.
//
// `Traits` says how an entry stores its key and marks itself empty:
//   static uint64_t key(const Entry&);
//   static bool empty(const Entry&);
//   static void set_empty(Entry&);
//   static void init(Entry&, uint64_t key);   // a new entry: the key, and not empty
// Memory of a new segment is zeroed, so a zeroed Entry must read as empty.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <new>
#include <utility>

namespace kvc {

// Keys may be sequential (engine hashes in tests, say): mix them before choosing a place.
inline uint64_t mix64(uint64_t key) {
    key ^= key >> 33;
    key *= 0xff51afd7ed558ccdULL;
    key ^= key >> 33;
    key *= 0xc4ceb9fe1a85ec53ULL;
    key ^= key >> 33;
    return key;
}

template <class Entry, class Traits>
class SegmentedTable {
   public:
    static constexpr int kSegmentBits = 8;
    static constexpr int kSegments = 1 << kSegmentBits;

    SegmentedTable() = default;
    ~SegmentedTable() {
        for (Segment& segment : segments_) {
            std::free(segment.entries);
        }
    }
    SegmentedTable(const SegmentedTable&) = delete;
    SegmentedTable& operator=(const SegmentedTable&) = delete;

    Entry* find(uint64_t key) const {
        uint64_t mixed = mix64(key);
        const Segment& segment = segment_of(mixed);
        if (segment.capacity == 0) {
            return nullptr;
        }
        uint32_t i = home(mixed, segment.capacity);
        for (uint32_t distance = 0;; distance++) {
            Entry* entry = &segment.entries[i];
            if (Traits::empty(*entry)) {
                return nullptr;
            }
            uint64_t other = Traits::key(*entry);
            if (other == key) {
                return entry;
            }
            if (distance_of(other, i, segment.capacity) < distance) {
                return nullptr;  // it would have been placed before this one
            }
            i = next(i, segment.capacity);
        }
    }

    // The entry of `key`, and whether it was just inserted (its key set, not empty, the
    // rest for the caller to fill before the table is used again). Pointers into the table
    // stay valid until the next insert or erase.
    std::pair<Entry*, bool> insert(uint64_t key) {
        if (Entry* found = find(key)) {
            return {found, false};
        }
        uint64_t mixed = mix64(key);
        Segment& segment = segment_of(mixed);
        if (static_cast<uint64_t>(segment.used + 1) * 10 >
            static_cast<uint64_t>(segment.capacity) * 9) {
            grow(segment);
        }
        Entry fresh{};
        Traits::init(fresh, key);
        Entry* placed = place(segment, fresh, key);
        segment.used++;
        size_++;
        return {placed, true};
    }

    void erase(Entry* entry) {
        Segment& segment = segment_of(mix64(Traits::key(*entry)));
        uint32_t capacity = segment.capacity;
        uint32_t hole = static_cast<uint32_t>(entry - segment.entries);
        // Backward shift: each following entry not at its home moves one slot back.
        for (uint32_t j = next(hole, capacity);; j = next(j, capacity)) {
            Entry& following = segment.entries[j];
            if (Traits::empty(following) ||
                distance_of(Traits::key(following), j, capacity) == 0) {
                break;
            }
            segment.entries[hole] = following;
            hole = j;
        }
        Traits::set_empty(segment.entries[hole]);
        segment.used--;
        size_--;
    }

    uint64_t size() const { return size_; }

    uint64_t capacity() const {
        uint64_t total = 0;
        for (const Segment& segment : segments_) {
            total += segment.capacity;
        }
        return total;
    }

    template <class Visit>
    void for_each(Visit visit) const {
        for (const Segment& segment : segments_) {
            for (uint32_t i = 0; i < segment.capacity; i++) {
                if (!Traits::empty(segment.entries[i])) {
                    visit(segment.entries[i]);
                }
            }
        }
    }

   private:
    struct Segment {
        Entry* entries = nullptr;
        uint32_t capacity = 0;
        uint32_t used = 0;
    };

    static constexpr uint32_t kFirstCapacity = 16;

    Segment& segment_of(uint64_t mixed) { return segments_[mixed >> (64 - kSegmentBits)]; }
    const Segment& segment_of(uint64_t mixed) const {
        return segments_[mixed >> (64 - kSegmentBits)];
    }

    // The home slot: the low 32 bits of the mixed key scaled to the capacity (which need not
    // be a power of two, so segments can grow by half).
    static uint32_t home(uint64_t mixed, uint32_t capacity) {
        return static_cast<uint32_t>((static_cast<uint64_t>(static_cast<uint32_t>(mixed)) *
                                      capacity) >> 32);
    }
    static uint32_t next(uint32_t i, uint32_t capacity) { return i + 1 == capacity ? 0 : i + 1; }
    static uint32_t distance_of(uint64_t key, uint32_t at, uint32_t capacity) {
        uint32_t start = home(mix64(key), capacity);
        return at >= start ? at - start : at + capacity - start;
    }

    // Robin Hood insertion of an entry known to be absent; returns where `key` ended up.
    static Entry* place(Segment& segment, Entry carried, uint64_t key) {
        Entry* placed = nullptr;
        uint32_t capacity = segment.capacity;
        uint32_t i = home(mix64(Traits::key(carried)), capacity);
        for (uint32_t distance = 0;; distance++) {
            Entry& slot = segment.entries[i];
            if (Traits::empty(slot)) {
                slot = carried;
                return placed != nullptr ? placed : &slot;
            }
            uint32_t theirs = distance_of(Traits::key(slot), i, capacity);
            if (theirs < distance) {
                std::swap(slot, carried);  // the richer entry moves on
                if (placed == nullptr && Traits::key(slot) == key) {
                    placed = &slot;
                }
                distance = theirs;
            }
            i = next(i, capacity);
        }
    }

    void grow(Segment& segment) {
        uint32_t capacity =
            segment.capacity == 0 ? kFirstCapacity : segment.capacity + segment.capacity / 2;
        auto* entries = static_cast<Entry*>(std::calloc(capacity, sizeof(Entry)));
        if (entries == nullptr) {
            throw std::bad_alloc();
        }
        Segment grown{entries, capacity, segment.used};
        for (uint32_t i = 0; i < segment.capacity; i++) {
            if (!Traits::empty(segment.entries[i])) {
                place(grown, segment.entries[i], Traits::key(segment.entries[i]));
            }
        }
        std::free(segment.entries);
        segment = grown;
    }

    Segment segments_[kSegments];
    uint64_t size_ = 0;
};

}  // namespace kvc
