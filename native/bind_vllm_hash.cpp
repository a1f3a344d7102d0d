// Python binding of vLLM's block hash (vllm_hash.hpp): a VllmHasher class that mirrors
// service.index.keys.VllmKeys (same arguments, same refusals, same outcomes), hashing with
// the GIL released, and the serializers for the tests that hold them to pickle and cbor2.
#include <pybind11/pybind11.h>

#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "bindings.hpp"
#include "vllm_hash.hpp"

namespace py = pybind11;

namespace kvc {

namespace {

// service._dataplane.UnknownParent(LookupError), as keys.UnknownParent: message and
// `parent` attribute. Owned by the module, which outlives every call.
PyObject* unknown_parent_type = nullptr;

[[noreturn]] void raise_unknown_parent(const py::object& parent) {
    py::object error = py::reinterpret_borrow<py::object>(unknown_parent_type)(
        "digest of parent block hash " + std::string(py::str(parent)) + " is unknown");
    error.attr("parent") = parent;
    PyErr_SetObject(unknown_parent_type, error.ptr());
    throw py::error_already_set();
}

[[noreturn]] void raise_value_error(const std::string& what, const py::handle& value) {
    throw py::value_error(what + std::string(py::repr(value)));
}

// A flat buffer of uint32 token ids (array('I'), numpy uint32, bytes of packed ids).
struct TokenView {
    py::buffer_info info;
    const uint32_t* data() const { return static_cast<const uint32_t*>(info.ptr); }
    size_t size() const { return static_cast<size_t>(info.size * info.itemsize) / 4; }
};

TokenView token_view(const py::buffer& buffer) {
    py::buffer_info info = buffer.request();
    // Contiguous only: a strided view (memoryview(a)[::2]) would be read as if it were not.
    const bool contiguous = info.size < 2 || info.strides[0] == info.itemsize;
    if (info.ndim != 1 || (info.itemsize != 4 && info.itemsize != 1) ||
        (info.itemsize * info.size) % 4 != 0 || !contiguous) {
        throw py::value_error("token ids must be a contiguous flat buffer of uint32");
    }
    return TokenView{std::move(info)};
}

// keys.py's _require_block_size: an int (not a bool), at least 1.
size_t block_size_of(const py::handle& block_size) {
    if (!PyLong_CheckExact(block_size.ptr())) {
        raise_value_error("block_size must be an int >= 1, got ", block_size);
    }
    const long long value = PyLong_AsLongLong(block_size.ptr());
    if (value < 1) {
        PyErr_Clear();  // an int below LLONG_MIN overflows: still just too small
        raise_value_error("block_size must be an int >= 1, got ", block_size);
    }
    return static_cast<size_t>(value);
}

// The UTF-8 bytes pickle writes for a str: CPython's cached UTF-8 when the str has one;
// for a str with lone surrogates, the "surrogatepass" bytes pickle falls back to (cbor2
// refuses such a str with UnicodeEncodeError, and so does this).
struct Utf8 {
    std::string_view view;
    py::object owner;  // the bytes behind `view` when they are not the str's own
};

Utf8 utf8_of(const py::handle& text, HashAlgorithm algorithm, const char* what) {
    if (!PyUnicode_Check(text.ptr())) {
        throw py::type_error(std::string(what) + " must be a str or None, got " +
                             std::string(py::repr(text)));
    }
    Py_ssize_t size = 0;
    if (const char* data = PyUnicode_AsUTF8AndSize(text.ptr(), &size)) {
        return Utf8{std::string_view(data, static_cast<size_t>(size)), py::object()};
    }
    if (algorithm != HashAlgorithm::kSha256) {
        throw py::error_already_set();
    }
    PyErr_Clear();
    py::object encoded = py::reinterpret_steal<py::object>(
        PyUnicode_AsEncodedString(text.ptr(), "utf-8", "surrogatepass"));
    if (!encoded) {
        throw py::error_already_set();
    }
    std::string_view view(PyBytes_AS_STRING(encoded.ptr()),
                          static_cast<size_t>(PyBytes_GET_SIZE(encoded.ptr())));
    return Utf8{view, std::move(encoded)};
}

// The LoRA name and cache salt of a call. The same str object given for both is passed
// as one view, so the salt is pickled as a memo reference, as pickle does for one object.
struct ExtraArgs {
    Utf8 lora;
    Utf8 salt;
    std::optional<std::string_view> lora_name;
    std::optional<std::string_view> cache_salt;

    ExtraArgs(const py::object& lora_obj, const py::object& salt_obj, HashAlgorithm algorithm) {
        if (!lora_obj.is_none()) {
            lora = utf8_of(lora_obj, algorithm, "lora_name");
            lora_name = lora.view;
        }
        if (!salt_obj.is_none()) {
            if (salt_obj.is(lora_obj)) {
                cache_salt = lora_name;
            } else {
                salt = utf8_of(salt_obj, algorithm, "cache_salt");
                cache_salt = salt.view;
            }
        }
    }
};

// A parent published hash: nullopt for an int outside [0, 2**64), which VllmKeys can
// never have remembered (it reports UnknownParent, so does this).
std::optional<uint64_t> parent_of(const py::handle& parent) {
    if (!PyLong_Check(parent.ptr())) {
        throw py::type_error("parent must be an int or None, got " + std::string(py::repr(parent)));
    }
    const unsigned long long value = PyLong_AsUnsignedLongLong(parent.ptr());
    if (value == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
        PyErr_Clear();
        return std::nullopt;
    }
    return static_cast<uint64_t>(value);
}

HashAlgorithm algorithm_of(const py::handle& algorithm) {
    if (PyUnicode_Check(algorithm.ptr())) {
        if (auto parsed = parse_hash_algorithm(std::string(py::str(algorithm)))) {
            return *parsed;
        }
    }
    raise_value_error("hash_algorithm must be one of ['sha256', 'sha256_cbor'], got ", algorithm);
}

py::list key_list(const std::vector<uint64_t>& keys) {
    py::list out(keys.size());
    for (size_t i = 0; i < keys.size(); i++) {
        PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(i),
                        PyLong_FromUnsignedLongLong(keys[i]));
    }
    return out;
}

py::bytes bytes_of(const std::vector<uint8_t>& data) {
    return py::bytes(reinterpret_cast<const char*>(data.data()), data.size());
}

// VllmKeys in C++: the hasher, its digest memory, and a lock so that two Python threads
// sharing one instance take turns on the memory while neither holds the GIL.
class PyVllmHasher {
 public:
    PyVllmHasher(const py::object& algorithm, const py::object& seed, const py::object& max_parents)
        : algorithm_(algorithm_of(algorithm)),
          seed_(seed.is_none() ? py::str(kVllmDefaultSeed.data(), kVllmDefaultSeed.size())
                               : checked_seed(seed)),
          hasher_(algorithm_, utf8_of(seed_, algorithm_, "seed").view),
          memory_(capacity_of(max_parents)) {}

    std::string algorithm() const { return std::string(hash_algorithm_name(algorithm_)); }
    py::str seed() const { return seed_; }
    py::bytes root() const {
        return py::bytes(reinterpret_cast<const char*>(hasher_.root().data()), 32);
    }
    size_t remembered() {
        std::lock_guard<std::mutex> lock(mutex_);
        return memory_.size();
    }
    size_t max_parents() const { return memory_.capacity(); }

    py::list block_keys(const py::buffer& tokens, const py::object& block_size,
                        const py::object& parent, const py::object& lora_name,
                        const py::object& cache_salt, bool remember) {
        const size_t size = block_size_of(block_size);
        const TokenView view = token_view(tokens);
        const ExtraArgs extra(lora_name, cache_salt, algorithm_);
        std::optional<uint64_t> parent_hash;
        if (!parent.is_none()) {
            parent_hash = parent_of(parent);
            if (!parent_hash) {
                raise_unknown_parent(parent);
            }
        }
        std::vector<uint64_t> keys;
        bool known;
        {
            py::gil_scoped_release released;
            std::lock_guard<std::mutex> lock(mutex_);
            known = vllm_block_keys(hasher_, memory_, view.data(), view.size(), size,
                                    parent_hash ? &*parent_hash : nullptr, extra.lora_name,
                                    extra.cache_salt, remember, keys);
        }
        if (!known) {
            raise_unknown_parent(parent);
        }
        return key_list(keys);
    }

    std::string check_published(const py::buffer& tokens, const py::object& block_size,
                                const py::sequence& published_hashes, const py::object& parent,
                                const py::object& lora_name, const py::object& cache_salt) {
        const size_t size = block_size_of(block_size);
        const TokenView view = token_view(tokens);
        const size_t count = published_hashes.size();
        if (view.size() % size != 0 || view.size() / size != count) {
            throw py::value_error(std::to_string(view.size()) + " token ids do not make " +
                                  std::to_string(count) + " blocks of " +
                                  std::to_string(size) + " tokens");
        }
        // A published value that is not a uint64 cannot equal one of ours: VllmKeys
        // compares lists and reports MISMATCH (once the parent is known).
        std::vector<uint64_t> hashes(count);
        bool representable = true;
        for (size_t i = 0; i < count && representable; i++) {
            std::optional<uint64_t> hash;
            py::object item = published_hashes[i];
            if (PyLong_Check(item.ptr())) {
                hash = parent_of(item);
            }
            representable = hash.has_value();
            hashes[i] = hash.value_or(0);
        }
        const ExtraArgs extra(lora_name, cache_salt, algorithm_);
        std::optional<uint64_t> parent_hash;
        if (!parent.is_none()) {
            parent_hash = parent_of(parent);
            if (!parent_hash) {
                return "unknown_parent";
            }
        }
        HashCheck outcome;
        {
            py::gil_scoped_release released;
            std::lock_guard<std::mutex> lock(mutex_);
            const uint64_t* parent_ptr = parent_hash ? &*parent_hash : nullptr;
            if (representable) {
                outcome = kvc::check_published(hasher_, memory_, view.data(), view.size(), size,
                                               hashes.data(), count, parent_ptr,
                                               extra.lora_name, extra.cache_salt);
            } else {
                // The parent lookup still happens (and refreshes the parent), as in VllmKeys.
                const bool known = parent_ptr == nullptr || memory_.get(*parent_ptr) != nullptr;
                outcome = known ? HashCheck::kMismatch : HashCheck::kUnknownParent;
            }
        }
        switch (outcome) {
            case HashCheck::kMatch:
                return "match";
            case HashCheck::kMismatch:
                return "mismatch";
            case HashCheck::kUnknownParent:
                break;
        }
        return "unknown_parent";
    }

    std::string repr() const {
        return "VllmHasher(algorithm=" + std::string(py::repr(py::str(algorithm()))) +
               ", seed=" + std::string(py::repr(seed_)) + ")";
    }

 private:
    static py::str checked_seed(const py::object& seed) {
        if (!PyUnicode_Check(seed.ptr())) {
            raise_value_error("seed must be a string (as PYTHONHASHSEED is), got ", seed);
        }
        return py::reinterpret_borrow<py::str>(seed);
    }

    static size_t capacity_of(const py::object& max_parents) {
        if (!PyLong_CheckExact(max_parents.ptr())) {
            raise_value_error("max_parents must be an int >= 2, got ", max_parents);
        }
        const long long value = PyLong_AsLongLong(max_parents.ptr());
        if (value < 2) {
            PyErr_Clear();
            raise_value_error("max_parents must be an int >= 2, got ", max_parents);
        }
        return static_cast<size_t>(value);
    }

    HashAlgorithm algorithm_;
    py::str seed_;
    VllmHasher hasher_;
    DigestMemory memory_;
    std::mutex mutex_;
};

}  // namespace

void bind_vllm_hash(py::module_& m) {
    unknown_parent_type =
        PyErr_NewExceptionWithDoc("service._dataplane.UnknownParent",
                                  "The digest of a parent block hash is not remembered "
                                  "(service.index.keys.UnknownParent).",
                                  PyExc_LookupError, nullptr);
    if (unknown_parent_type == nullptr) {
        throw py::error_already_set();
    }
    m.add_object("UnknownParent", py::handle(unknown_parent_type));

    py::class_<PyVllmHasher>(m, "VllmHasher",
                             "vLLM's block hash (key mode vllm), as service.index.keys.VllmKeys.")
        .def(py::init<const py::object&, const py::object&, const py::object&>(),
             py::arg("algorithm") = "sha256", py::arg("seed") = py::none(),
             py::arg("max_parents") = 1'000'000)
        .def_property_readonly("algorithm", &PyVllmHasher::algorithm)
        .def_property_readonly("seed", &PyVllmHasher::seed)
        .def_property_readonly("root", &PyVllmHasher::root, "H(seed), the chain's first parent.")
        .def_property_readonly("remembered", &PyVllmHasher::remembered,
                               "How many digests are remembered for continuing chains.")
        .def_property_readonly("max_parents", &PyVllmHasher::max_parents)
        .def("block_keys", &PyVllmHasher::block_keys, py::arg("tokens"), py::arg("block_size"),
             py::arg("parent") = py::none(), py::arg("lora_name") = py::none(),
             py::arg("cache_salt") = py::none(), py::arg("remember") = false,
             "VllmKeys.block_keys: the published hash of every full block; raises "
             "UnknownParent when the parent's digest is not remembered.")
        .def("check_published", &PyVllmHasher::check_published, py::arg("tokens"),
             py::arg("block_size"), py::arg("published"), py::arg("parent") = py::none(),
             py::arg("lora_name") = py::none(), py::arg("cache_salt") = py::none(),
             "VllmKeys.check_published: 'match', 'mismatch' or 'unknown_parent'.")
        .def("__repr__", &PyVllmHasher::repr);

    m.def(
        "vllm_encode_root",
        [](const py::object& algorithm, const py::str& seed) {
            const HashAlgorithm parsed = algorithm_of(algorithm);
            const Utf8 text = utf8_of(seed, parsed, "seed");
            std::vector<uint8_t> out;
            serialize_root(parsed, text.view, out);
            return bytes_of(out);
        },
        py::arg("algorithm"), py::arg("seed"),
        "The bytes hashed for the chain root: pickle.dumps(seed, protocol=5) or "
        "cbor2.dumps(seed, canonical=True). For tests.");

    m.def(
        "vllm_encode_block",
        [](const py::object& algorithm, const py::bytes& parent, const py::buffer& tokens,
           const py::object& extra) {
            const HashAlgorithm parsed = algorithm_of(algorithm);
            const std::string_view parent_bytes = parent;
            if (parent_bytes.size() != 32) {
                throw py::value_error("parent must be 32 bytes");
            }
            Digest digest;
            std::copy(parent_bytes.begin(), parent_bytes.end(), digest.begin());
            const TokenView view = token_view(tokens);
            std::vector<py::object> items;
            std::vector<Utf8> texts;
            std::vector<std::string_view> views;
            if (!extra.is_none()) {
                for (const py::handle item : py::reinterpret_borrow<py::sequence>(extra)) {
                    items.push_back(py::reinterpret_borrow<py::object>(item));
                }
                texts.reserve(items.size());
                for (size_t i = 0; i < items.size(); i++) {
                    size_t same = 0;  // one view per object, as ExtraArgs does
                    while (same < i && !items[same].is(items[i])) {
                        same++;
                    }
                    texts.push_back(same < i ? texts[same]
                                             : utf8_of(items[i], parsed, "extra key"));
                    views.push_back(texts.back().view);
                }
            }
            std::vector<uint8_t> out;
            serialize_block(parsed, digest, view.data(), view.size(),
                            extra.is_none() ? nullptr : views.data(), views.size(), out);
            return bytes_of(out);
        },
        py::arg("algorithm"), py::arg("parent"), py::arg("tokens"), py::arg("extra"),
        "The bytes hashed for one block: pickle.dumps((parent, tuple(tokens), extra), "
        "protocol=5) or its canonical CBOR; extra is None or a sequence of strs (an empty one "
        "stands for None, as in VllmHasher::block). For tests.");
}

}  // namespace kvc
