#include "engine_map.hpp"

#include <algorithm>

namespace kvc {

bool EngineKeyMap::Generation::get(uint64_t hash, uint64_t& key) const {
    if (const Entry* entry = table.find(hash)) {
        key = entry->stored ^ kTag;
        return true;
    }
    if (!tagged.empty()) {
        auto it = tagged.find(hash);
        if (it != tagged.end()) {
            key = it->second;
            return true;
        }
    }
    return false;
}

void EngineKeyMap::Generation::put(uint64_t hash, uint64_t key) {
    if (key == kTag) {
        if (Entry* entry = table.find(hash)) {
            table.erase(entry);
        }
        tagged[hash] = key;
        return;
    }
    if (!tagged.empty()) {
        tagged.erase(hash);
    }
    auto [entry, inserted] = table.insert(hash);
    entry->hash = hash;
    entry->stored = key ^ kTag;
}

EngineKeyMap::EngineKeyMap(uint64_t bound)
    : half_(std::max<uint64_t>(1, bound / 2)),
      young_(std::make_unique<Generation>()),
      old_(std::make_unique<Generation>()) {}

bool EngineKeyMap::get(uint64_t hash, uint64_t& key) const {
    return young_->get(hash, key) || old_->get(hash, key);
}

bool EngineKeyMap::touch(uint64_t hash, uint64_t& key) {
    if (young_->get(hash, key)) {
        return true;
    }
    if (!old_->get(hash, key)) {
        return false;
    }
    put_young(hash, key);
    return true;
}

void EngineKeyMap::put(uint64_t hash, uint64_t key) { put_young(hash, key); }

void EngineKeyMap::put_young(uint64_t hash, uint64_t key) {
    young_->put(hash, key);
    if (young_->size() >= half_) {
        old_ = std::move(young_);
        young_ = std::make_unique<Generation>();
    }
}

uint64_t EngineKeyMap::size() const { return young_->size() + old_->size(); }

uint64_t EngineKeyMap::capacity() const {
    return young_->table.capacity() + old_->table.capacity();
}

}  // namespace kvc
