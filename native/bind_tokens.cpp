// Python bindings of the REST body reader and the tokens-mode keys, for the API edges and
// for the tests that hold them to their Python references.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <vector>

#include "bindings.hpp"
#include "rest_body.hpp"
#include "token_keys.hpp"

namespace py = pybind11;

namespace kvc {

namespace {

// A buffer of uint32 token ids (array('I'), bytes of packed ids), as a pointer and count.
struct TokenView {
    py::buffer_info info;
    const uint32_t* data() const { return static_cast<const uint32_t*>(info.ptr); }
    size_t size() const { return static_cast<size_t>(info.size * info.itemsize) / 4; }
};

TokenView token_view(const py::buffer& buffer) {
    py::buffer_info info = buffer.request();
    if (info.ndim != 1 || (info.itemsize != 4 && info.itemsize != 1) ||
        (info.itemsize * info.size) % 4 != 0 || info.strides[0] != info.itemsize) {
        throw py::value_error("token ids must be a flat buffer of uint32");
    }
    return TokenView{std::move(info)};
}

py::list key_list(const std::vector<uint64_t>& keys) {
    py::list out(keys.size());
    for (size_t i = 0; i < keys.size(); i++) {
        out[i] = py::int_(keys[i]);
    }
    return out;
}

}  // namespace

void bind_tokens(py::module_& m) {
    m.def(
        "token_keys",
        [](const py::buffer& tokens, size_t block_size, std::optional<uint64_t> parent,
           std::optional<std::string> lora_name, std::optional<std::string> cache_salt) {
            if (block_size < 1) {
                throw py::value_error("block_size must be >= 1");
            }
            TokenView view = token_view(tokens);
            std::vector<uint64_t> keys(view.size() / block_size);
            {
                py::gil_scoped_release released;
                uint64_t seed;
                if (parent) {
                    seed = *parent;
                } else {
                    seed = lora_name ? tokens_root(*lora_name) : tokens_root();
                    if (cache_salt) {
                        seed = salted_root(seed, *cache_salt);
                    }
                }
                chain_keys(view.data(), view.size(), block_size, seed, keys.data());
            }
            return key_list(keys);
        },
        py::arg("tokens"), py::arg("block_size"), py::arg("parent") = py::none(),
        py::arg("lora_name") = py::none(), py::arg("cache_salt") = py::none(),
        "Keys of the full blocks of uint32 token ids, as TokenKeys.block_keys computes them.");

    m.def(
        "parse_plain_locality",
        [](const py::buffer& raw) -> py::object {
            py::buffer_info info = raw.request();
            if (info.ndim != 1 || info.itemsize != 1) {
                throw py::value_error("a body must be a flat buffer of bytes");
            }
            PlainLocality body;
            std::string_view text(static_cast<const char*>(info.ptr),
                                  static_cast<size_t>(info.size));
            if (!parse_plain_locality(text, body)) {
                return py::none();
            }
            auto text_or_none = [](const std::optional<std::string_view>& value) {
                return value ? py::object(py::str(value->data(), value->size())) : py::none();
            };
            py::object pods = py::none();
            if (body.pods) {
                py::list items;
                for (std::string_view pod : *body.pods) {
                    items.append(py::str(pod.data(), pod.size()));
                }
                pods = items;
            }
            return py::make_tuple(
                py::str(body.model.data(), body.model.size()),
                py::bytes(reinterpret_cast<const char*>(body.tokens.data()),
                          body.tokens.size() * 4),
                text_or_none(body.lora_name), text_or_none(body.cache_salt), pods);
        },
        py::arg("body"),
        "(model, token ids as packed uint32, lora_name, cache_salt, pods) of a plain "
        "locality body, or None for any other body.");
}

}  // namespace kvc
