// One registration function per binding file; module.cpp calls them all.
#pragma once

#include <pybind11/pybind11.h>

namespace kvc {

void bind_tokens(pybind11::module_& m);  // bind_tokens.cpp: token readers, tokens-mode keys
void bind_index(pybind11::module_& m);   // bind_index.cpp: the index alone, for tests
void bind_plane(pybind11::module_& m);   // bind_plane.cpp: the data plane
void bind_vllm_hash(pybind11::module_& m);  // bind_vllm_hash.cpp: vLLM's block hash
void bind_decode(pybind11::module_& m);  // bind_decode.cpp: the vLLM event decoder

}  // namespace kvc
