"""The native index (native/index.cpp, through service/index/native.py) against the
reference, on the harness's random streams: the same answers, stats and sweeps, call for
call."""

from __future__ import annotations

from service.index.native import NativeIndex
from tests.conformance.harness import constructor, differential_test, soak_test

test_native_index = differential_test(constructor(NativeIndex))
test_native_index_soak = soak_test(constructor(NativeIndex))
