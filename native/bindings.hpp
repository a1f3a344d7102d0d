// One registration function per binding file; module.cpp calls them all.
#pragma once

#include <pybind11/pybind11.h>

namespace kvc {

void bind_tokens(pybind11::module_& m);  // bind_tokens.cpp: token readers, tokens-mode keys

}  // namespace kvc
