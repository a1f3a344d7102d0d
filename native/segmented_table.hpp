// A hash table of 64-bit keys cut into 256 open-addressing segments (linear probing,
// backward-shift deletion, no tombstones). Each segment doubles on its own at 3/4 full, so a
// resize moves 1/256 of the table: at 16M keys ~64k entries, well under a millisecond, where
// one big table would stall its writer (and every reader waiting on it) for tens of ms.
//
// `Traits` says how an entry stores its key and marks itself empty:
//   static uint64_t key(const Entry&);
//   static bool empty(const Entry&);
//   static void set_empty(Entry&);
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
        const Segment& segment = segments_[mixed >> (64 - kSegmentBits)];
        if (segment.mask == 0) {
            return nullptr;
        }
        for (uint32_t i = static_cast<uint32_t>(mixed) & segment.mask;;
             i = (i + 1) & segment.mask) {
            Entry* entry = &segment.entries[i];
            if (Traits::empty(*entry)) {
                return nullptr;
            }
            if (Traits::key(*entry) == key) {
                return entry;
            }
        }
    }

    // The entry of `key`, and whether it was just inserted. A new entry is left empty for
    // the caller to fill (key included) before the table is used again. Pointers into the
    // table stay valid until the next insert.
    std::pair<Entry*, bool> insert(uint64_t key) {
        uint64_t mixed = mix64(key);
        Segment& segment = segments_[mixed >> (64 - kSegmentBits)];
        if (segment.mask == 0 || (segment.used + 1) * 4 > (segment.mask + 1) * 3) {
            grow(segment);
        }
        for (uint32_t i = static_cast<uint32_t>(mixed) & segment.mask;;
             i = (i + 1) & segment.mask) {
            Entry* entry = &segment.entries[i];
            if (Traits::empty(*entry)) {
                segment.used++;
                size_++;
                return {entry, true};
            }
            if (Traits::key(*entry) == key) {
                return {entry, false};
            }
        }
    }

    void erase(Entry* entry) {
        Segment& segment = segments_[mix64(Traits::key(*entry)) >> (64 - kSegmentBits)];
        uint32_t mask = segment.mask;
        uint32_t hole = static_cast<uint32_t>(entry - segment.entries);
        for (uint32_t j = (hole + 1) & mask;; j = (j + 1) & mask) {
            Entry& next = segment.entries[j];
            if (Traits::empty(next)) {
                break;
            }
            uint32_t home = static_cast<uint32_t>(mix64(Traits::key(next))) & mask;
            // `next` may move into the hole unless its home lies cyclically in (hole, j].
            bool stays = hole <= j ? (hole < home && home <= j) : (hole < home || home <= j);
            if (!stays) {
                segment.entries[hole] = next;
                hole = j;
            }
        }
        Traits::set_empty(segment.entries[hole]);
        segment.used--;
        size_--;
    }

    uint64_t size() const { return size_; }

    uint64_t capacity() const {
        uint64_t total = 0;
        for (const Segment& segment : segments_) {
            total += segment.mask == 0 ? 0 : segment.mask + 1;
        }
        return total;
    }

    template <class Visit>
    void for_each(Visit visit) const {
        for (const Segment& segment : segments_) {
            for (uint32_t i = 0; segment.mask != 0 && i <= segment.mask; i++) {
                if (!Traits::empty(segment.entries[i])) {
                    visit(segment.entries[i]);
                }
            }
        }
    }

   private:
    struct Segment {
        Entry* entries = nullptr;
        uint32_t mask = 0;  // capacity - 1; 0 before the first insert
        uint32_t used = 0;
    };

    static constexpr uint32_t kFirstCapacity = 16;

    void grow(Segment& segment) {
        uint32_t capacity = segment.mask == 0 ? kFirstCapacity : (segment.mask + 1) * 2;
        auto* entries = static_cast<Entry*>(std::calloc(capacity, sizeof(Entry)));
        if (entries == nullptr) {
            throw std::bad_alloc();
        }
        uint32_t mask = capacity - 1;
        for (uint32_t i = 0; segment.mask != 0 && i <= segment.mask; i++) {
            const Entry& old = segment.entries[i];
            if (Traits::empty(old)) {
                continue;
            }
            uint32_t j = static_cast<uint32_t>(mix64(Traits::key(old))) & mask;
            while (!Traits::empty(entries[j])) {
                j = (j + 1) & mask;
            }
            entries[j] = old;
        }
        std::free(segment.entries);
        segment.entries = entries;
        segment.mask = mask;
    }

    Segment segments_[kSegments];
    uint64_t size_ = 0;
};

}  // namespace kvc
