// service._dataplane: the native data plane (docs/design.md, "The native data plane").
// Each bind_*.cpp file exposes one part; this file only gathers them.
#include "bindings.hpp"

PYBIND11_MODULE(_dataplane, m) {
    m.doc() = "kv-cache's native data plane: ingest, index and lookups with the GIL released.";
    kvc::bind_tokens(m);
    kvc::bind_index(m);
    kvc::bind_plane(m);
    kvc::bind_vllm_hash(m);
    kvc::bind_decode(m);
}
