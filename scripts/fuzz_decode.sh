#!/usr/bin/env bash
# Fuzzes the native vLLM event decoder (native/fuzz/decode_fuzz.cpp) with libFuzzer under
# AddressSanitizer and UBSan, then holds every input the fuzzer kept to the Python reference
# (tests/unit/native/test_decode.py, test_fuzz_corpus):
#
#     scripts/fuzz_decode.sh [seconds]      # default 60
#
# Needs clang++ with libFuzzer (Debian: clang, libclang-rt-dev). The corpus is seeded with
# payloads of every vLLM release (tests/support/vllm_wire.py) in a temporary directory, kept
# only when FUZZ_CORPUS names one to use instead. A crash leaves its input in the current
# directory (crash-*), as libFuzzer does.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
seconds=${1:-60}
PYTHON=${PYTHON:-$root/.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
corpus=${FUZZ_CORPUS:-$work/corpus}
mkdir -p "$corpus"

"${CLANGXX:-clang++}" -std=c++17 -g -O1 -fno-omit-frame-pointer \
    -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    -Wall -Wextra -I"$root/native" -o "$work/decode_fuzz" \
    "$root/native/fuzz/decode_fuzz.cpp" "$root/native/decode.cpp"

cd "$root" && "$PYTHON" - "$corpus" <<'PY'
import hashlib
import sys
from pathlib import Path

from tests.support.vllm_wire import VERSIONS, cleared, encode_batch, pack, raw, removed, stored

corpus = Path(sys.argv[1])
H1, H2 = 0x0123_4567_89AB_CDEF, 0xFEDC_BA98_7654_3210
events = [
    stored([H1, H2], range(32), parent=H1, medium="CPU", lora_name="sql", lora_id=3,
           extra_keys=[("sql", "salt"), None], group_idx=0, kv_cache_spec_kind="full"),
    stored([H2], (), block_size=0, medium="DISK"),
    removed([H1], medium="STORAGE"),
    cleared(),
    raw(["BlockUpdated", [H1]]),
    raw({"type": "BlockStored", "block_hashes": [H1], 5: None}),
]
payloads = [
    encode_batch(events, version=version, hash_style=style, envelope=envelope)
    for version in VERSIONS
    for style in ("uint", "int", "bytes")
    for envelope in ("array", "map")
]
payloads += [pack([1.0, [], -1]), pack({"ts": 1.0}), b"\x92\xa1x\x91\xa1\xff"]
# Nesting at the decoder's limit (1000 containers: batch, events, event, then a field's) and
# past it, which random mutations seldom build.
for levels in (997, 998):
    field = b"\x91" * levels + b"\xc0"
    payloads.append(b"\x93\x00\x91\x82\xa4type\xb0AllBlocksCleared\xa1x" + field + b"\x00")
    payloads.append(b"\x92\xa1x" + b"\x91" * (levels + 2) + b"\xc0")
for payload in payloads:
    (corpus / hashlib.sha1(payload).hexdigest()).write_bytes(payload)
PY

"$work/decode_fuzz" -max_total_time="$seconds" -dict="$root/native/fuzz/decode.dict" \
    -print_final_stats=1 "$corpus"
KV_CACHE_DECODE_CORPUS=$corpus "$PYTHON" -m pytest -q -p no:cacheprovider \
    "$root/tests/unit/native/test_decode.py::test_fuzz_corpus"
