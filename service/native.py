"""The optional C extension (``service/_native.c``), for code with no Python twin of a
function: each name is the native function, or None where the extension was not built.

The index loops, which have Python twins, pick theirs in ``service/index/loops.py``.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["unpack_json_tokens", "unpack_tokens"]

unpack_tokens: Callable[[bytes], bytes] | None
unpack_json_tokens: Callable[[bytes], bytes] | None

try:
    from service import _native
except ImportError:  # not built: callers take their slower, validated paths
    unpack_tokens = unpack_json_tokens = None
else:
    unpack_tokens = _native.unpack_tokens
    unpack_json_tokens = _native.unpack_json_tokens
