#!/usr/bin/env bash
# Times the native vLLM event decoder (native/decode.cpp) alone, without Python, on payloads
# shaped as vLLM publishes them (native/bench/decode_bench.cpp): scripts/bench_decode.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"${CXX:-g++}" -std=c++17 -O2 -Wall -Wextra -Inative -o "$work/decode_bench" \
    native/bench/decode_bench.cpp native/decode.cpp

"$PYTHON" - "$work" <<'PY'
import random
import sys
from collections.abc import Callable
from pathlib import Path

from tests.support.vllm_wire import Version, WireEvent, encode_batch, removed, stored

out = Path(sys.argv[1])
rnd = random.Random(0)


def hashes(n: int) -> list[int]:
    return [rnd.getrandbits(64) for _ in range(n)]


def event(blocks: int = 16) -> WireEvent:
    # Token ids of a 151k vocabulary (Qwen): mostly 2- and 4-byte ints on the wire.
    tokens = [rnd.randrange(151_000) for _ in range(blocks * 16)]
    return stored(hashes(blocks), tokens, block_size=16, parent=rnd.getrandbits(64),
                  medium="GPU", group_idx=0, kv_cache_spec_kind="full_attention")


def write(name: str, make: Callable[[], list[WireEvent]], version: Version = "0.23",
          bytes_hashes: bool = False) -> None:
    with (out / name).open("wb") as file:
        for _ in range(100):
            style = "bytes" if bytes_hashes else "uint"
            payload = encode_batch(make(), version=version, hash_style=style)
            file.write(len(payload).to_bytes(4, "little") + payload)


write("stored16", lambda: [event()])
write("stored16-map-0.24", lambda: [event()], version="0.24")
write("stored16-bytes-hashes", lambda: [event()], bytes_hashes=True)
write("stored16-x8", lambda: [event() for _ in range(8)])
write("stored1-x32", lambda: [event(1) for _ in range(32)])
write("removed4-x32", lambda: [removed(hashes(4), medium="CPU") for _ in range(32)])
PY
cd "$work" && ./decode_bench stored16 stored16-map-0.24 stored16-bytes-hashes stored16-x8 \
    stored1-x32 removed4-x32
