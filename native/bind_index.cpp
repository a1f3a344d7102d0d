// The native index alone, for the conformance suite (tests/conformance) that holds it to the
// Python reference (service/index/reference.py): models and pods by name, time passed in.
// A reader-writer lock and the GIL released on every call let tests race reads and writes
// from several threads, as the data plane does.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <optional>
#include <shared_mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "bindings.hpp"
#include "index.hpp"

namespace py = pybind11;

namespace kvc {

namespace {

using PodKey = std::pair<std::string, uint32_t>;

class IndexHandle {
   public:
    IndexHandle(double ttl, uint64_t max_entries) : index_(ttl, max_entries) {}

    void store(const std::string& model, const std::string& pod, uint32_t rank,
               const std::vector<uint64_t>& keys, int tier, double now) {
        check_tier(tier);
        py::gil_scoped_release released;
        std::unique_lock<std::shared_mutex> lock(mutex_);
        index_.store(slot(model, pod, rank), keys.data(), keys.size(), tier,
                     BlockIndex::tick_of(now));
    }

    void remove(const std::string& model, const std::string& pod, uint32_t rank,
                const std::vector<uint64_t>& keys, int tier, double now) {
        check_tier(tier);
        py::gil_scoped_release released;
        std::unique_lock<std::shared_mutex> lock(mutex_);
        auto found = find_slot(model, pod, rank);
        if (found) {
            index_.remove(*found, keys.data(), keys.size(), tier, BlockIndex::tick_of(now));
        }
    }

    void clear(const std::string& model, const std::string& pod, uint32_t rank) {
        py::gil_scoped_release released;
        std::unique_lock<std::shared_mutex> lock(mutex_);
        auto found = find_slot(model, pod, rank);
        if (found) {
            index_.clear(*found);
        }
    }

    void drop_pod(const std::string& pod) {
        py::gil_scoped_release released;
        std::unique_lock<std::shared_mutex> lock(mutex_);
        for (auto& [model, slots] : slots_) {
            for (auto it = slots.begin(); it != slots.end();) {
                if (it->first.first == pod) {
                    pods_.erase(it->second);
                    index_.release_slot(it->second);
                    it = slots.erase(it);
                } else {
                    ++it;
                }
            }
        }
    }

    void enforce_capacity() {
        py::gil_scoped_release released;
        std::unique_lock<std::shared_mutex> lock(mutex_);
        index_.enforce_capacity();
    }

    size_t sweep(double now, std::optional<size_t> budget) {
        py::gil_scoped_release released;
        std::unique_lock<std::shared_mutex> lock(mutex_);
        return index_.sweep(BlockIndex::tick_of(now), budget ? *budget : SIZE_MAX);
    }

    // [(pod_id, rank, match_length, block_count, {tier set: blocks})], by pod then rank.
    py::list lookup(const std::string& model, const std::vector<uint64_t>& keys, double now,
                    std::optional<std::vector<PodKey>> pods) {
        std::vector<SlotMatch> matches;
        std::vector<std::tuple<PodKey, SlotMatch>> found;
        {
            py::gil_scoped_release released;
            std::shared_lock<std::shared_mutex> lock(mutex_);
            auto model_id = models_.find(model);
            std::vector<uint16_t> filter;
            if (pods) {
                for (const PodKey& pod : *pods) {
                    if (auto slot = find_slot(model, pod.first, pod.second)) {
                        filter.push_back(*slot);
                    }
                }
            }
            bool none_wanted = pods && filter.empty();
            if (model_id != models_.end() && !none_wanted) {
                index_.lookup(model_id->second, keys.data(), keys.size(),
                              BlockIndex::tick_of(now), filter, matches);
            }
            for (const SlotMatch& match : matches) {
                found.emplace_back(pods_.at(match.slot), match);
            }
        }
        std::sort(found.begin(), found.end(),
                  [](const auto& a, const auto& b) { return std::get<0>(a) < std::get<0>(b); });
        py::list out;
        for (const auto& [pod, match] : found) {
            py::dict tier_sets;
            for (unsigned set = 0; set < (1u << kTiers); set++) {
                if (match.prefix_tier_sets[set] != 0) {
                    tier_sets[py::int_(set)] = match.prefix_tier_sets[set];
                }
            }
            out.append(py::make_tuple(pod.first, pod.second, match.match_length,
                                      match.block_count, tier_sets));
        }
        return out;
    }

    // {"entries", "evictions": {reason: n}, "entries_by_pod": {(model, pod, rank): n},
    //  "keys_by_model": {model: n}, "garbage"}
    py::dict stats() {
        std::shared_lock<std::shared_mutex> lock(mutex_);
        IndexStats stats = index_.stats();
        static const char* const kReasons[kEvictionReasons] = {"removed", "cleared", "ttl",
                                                               "capacity"};
        py::dict evictions;
        for (int reason = 0; reason < kEvictionReasons; reason++) {
            evictions[kReasons[reason]] = stats.evictions[reason];
        }
        py::dict by_pod, keys_by_model;
        for (const auto& [model, slots] : slots_) {
            for (const auto& [pod, slot] : slots) {
                if (uint64_t entries = index_.slot_entries(slot)) {
                    by_pod[py::make_tuple(model, pod.first, pod.second)] = entries;
                }
            }
        }
        for (const auto& [model, id] : models_) {
            if (uint64_t keys = index_.live_keys(id)) {
                keys_by_model[py::str(model)] = keys;
            }
        }
        py::dict out;
        out["entries"] = stats.entries;
        out["evictions"] = evictions;
        out["entries_by_pod"] = by_pod;
        out["keys_by_model"] = keys_by_model;
        out["garbage"] = stats.garbage;
        return out;
    }

   private:
    static void check_tier(int tier) {
        if (tier < 0 || tier >= kTiers) {
            throw py::value_error("tier must be 0 (gpu), 1 (cpu) or 2 (disk)");
        }
    }

    std::optional<uint16_t> find_slot(const std::string& model, const std::string& pod,
                                      uint32_t rank) const {
        auto slots = slots_.find(model);
        if (slots == slots_.end()) {
            return std::nullopt;
        }
        auto found = slots->second.find(PodKey(pod, rank));
        if (found == slots->second.end()) {
            return std::nullopt;
        }
        return found->second;
    }

    uint16_t slot(const std::string& model, const std::string& pod, uint32_t rank) {
        if (auto found = find_slot(model, pod, rank)) {
            return *found;
        }
        auto model_id = models_.find(model);
        if (model_id == models_.end()) {
            model_id = models_.emplace(model, index_.add_model(model)).first;
        }
        uint16_t id = index_.add_slot(model_id->second, pod, rank);
        slots_[model][PodKey(pod, rank)] = id;
        pods_[id] = PodKey(pod, rank);
        return id;
    }

    BlockIndex index_;
    std::shared_mutex mutex_;
    std::map<std::string, uint16_t> models_;
    std::map<std::string, std::map<PodKey, uint16_t>> slots_;
    std::map<uint16_t, PodKey> pods_;
};

}  // namespace

void bind_index(py::module_& m) {
    py::class_<IndexHandle>(m, "BlockIndex",
                            "The native index alone, models and pods by name (for tests).")
        .def(py::init<double, uint64_t>(), py::arg("ttl"), py::arg("max_entries"))
        .def("store", &IndexHandle::store)
        .def("remove", &IndexHandle::remove)
        .def("clear", &IndexHandle::clear)
        .def("drop_pod", &IndexHandle::drop_pod)
        .def("enforce_capacity", &IndexHandle::enforce_capacity)
        .def("sweep", &IndexHandle::sweep, py::arg("now"), py::arg("budget") = py::none())
        .def("lookup", &IndexHandle::lookup, py::arg("model"), py::arg("keys"), py::arg("now"),
             py::arg("pods") = py::none())
        .def("stats", &IndexHandle::stats);
}

}  // namespace kvc
