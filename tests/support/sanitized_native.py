"""pytest plugin for ``make sanitize``: the tests run against the AddressSanitizer/UBSan
build of ``service._dataplane`` that ``KV_CACHE_NATIVE`` names, loaded before anything
imports the regular build."""

from __future__ import annotations

import importlib.util
import os
import sys

import service

_path = os.environ["KV_CACHE_NATIVE"]
_spec = importlib.util.spec_from_file_location("service._dataplane", _path)
assert _spec is not None and _spec.loader is not None, _path
_module = importlib.util.module_from_spec(_spec)
sys.modules["service._dataplane"] = _module
_spec.loader.exec_module(_module)
service._dataplane = _module  # type: ignore[attr-defined]
