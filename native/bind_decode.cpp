// Python binding of the vLLM event decoder, for the tests that hold it to its reference
// (service/events/vllm.py, decode_batch). It builds plain Python values, which the ingest
// path will not do; speed here is no concern.
#include <pybind11/pybind11.h>

#include <string>
#include <string_view>

#include "bindings.hpp"
#include "decode.hpp"

namespace py = pybind11;

namespace kvc {

namespace {

py::object optional_str(bool has, std::string_view text) {
    return has ? py::object(py::str(text.data(), text.size())) : py::object(py::none());
}

py::tuple hash_tuple(const Batch& batch, const Event& e) {
    py::tuple hashes(e.hashes_count);
    for (uint32_t i = 0; i < e.hashes_count; i++) {
        hashes[i] = py::int_(batch.hashes[e.hashes_begin + i]);
    }
    return hashes;
}

py::object extra_keys(const Batch& batch, const Event& e) {
    if (!e.has_extra_keys) {
        return py::none();
    }
    py::tuple entries(e.hashes_count);
    for (uint32_t i = 0; i < e.hashes_count; i++) {
        const BlockExtra& extra = batch.extras[e.extras_begin + i];
        if (extra.kind == BlockExtra::kNil) {
            entries[i] = py::none();
        } else {
            entries[i] = py::make_tuple(extra.length, optional_str(extra.first_is_str, extra.first),
                                        optional_str(extra.second_is_str, extra.second),
                                        py::bytes(extra.bytes.data(), extra.bytes.size()));
        }
    }
    return std::move(entries);
}

py::tuple event_tuple(const Batch& batch, const Event& e) {
    const int tier = static_cast<int>(e.tier);
    switch (e.kind) {
        case EventKind::kStored: {
            py::tuple tokens(e.tokens_count);
            for (uint32_t i = 0; i < e.tokens_count; i++) {
                tokens[i] = py::int_(batch.tokens[e.tokens_begin + i]);
            }
            py::object lora_id = py::none();
            if (e.has_lora_id) {
                lora_id = e.lora_id_unsigned ? py::int_(static_cast<uint64_t>(e.lora_id))
                                             : py::int_(e.lora_id);
            }
            return py::make_tuple(
                "BlockStored", hash_tuple(batch, e),
                e.has_parent ? py::object(py::int_(e.parent)) : py::object(py::none()), tokens,
                py::int_(e.block_size), tier, optional_str(e.has_lora_name, e.lora_name), lora_id,
                extra_keys(batch, e));
        }
        case EventKind::kRemoved:
            return py::make_tuple("BlockRemoved", hash_tuple(batch, e), tier);
        case EventKind::kCleared:
            break;
    }
    return py::make_tuple("AllBlocksCleared");
}

}  // namespace

void bind_decode(py::module_& m) {
    m.def(
        "decode_batch",
        [](const py::bytes& payload) {
            const std::string_view bytes = payload;
            Batch batch;
            bool decoded;
            {
                py::gil_scoped_release released;  // `payload` is immutable and held by the caller
                decoded = decode_batch(bytes, batch);
            }
            if (!decoded) {
                throw py::value_error(std::string(name(batch.error)));
            }
            py::list events;
            for (const Event& e : batch.events) {
                events.append(event_tuple(batch, e));
            }
            py::dict skipped;
            for (int i = 0; i < kEventSkipCount; i++) {
                if (batch.skipped[i] > 0) {
                    const std::string_view reason = name(static_cast<EventSkip>(i));
                    skipped[py::str(reason.data(), reason.size())] = batch.skipped[i];
                }
            }
            return py::make_tuple(
                batch.ts, batch.has_rank ? py::object(py::int_(batch.rank)) : py::object(py::none()),
                events, skipped);
        },
        py::arg("payload"),
        "Decodes a vLLM event batch into (ts, data_parallel_rank, events, skipped); ValueError("
        "reason) for a payload that is not a batch. Events are tuples: (\"BlockStored\", "
        "hashes, parent, token_ids, block_size, tier, lora_name, lora_id, extra_keys), "
        "(\"BlockRemoved\", hashes, tier), (\"AllBlocksCleared\",); an extra_keys entry is None "
        "or (length, first str or None, second str or None, msgpack bytes).");
}

}  // namespace kvc
