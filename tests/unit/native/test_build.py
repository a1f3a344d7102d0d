"""Which build of the native data plane the tests run: the one ``make sanitize`` asks for
when it asks, and in any case the one the service imports."""

from __future__ import annotations

import os
from pathlib import Path

from service import _dataplane
from service.dataplane import native


def test_the_tests_run_the_build_they_were_asked_to() -> None:
    wanted = os.environ.get("KV_CACHE_NATIVE")
    built = Path(_dataplane.__file__).resolve()
    if wanted is not None:
        assert built == Path(wanted).resolve()
    else:
        assert built.parent == Path(native.__file__).resolve().parents[1]
