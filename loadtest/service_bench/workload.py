"""What the benchmark publishes and queries: the prompt, the pods, the vLLM batches."""

from __future__ import annotations

import random
from collections.abc import Sequence

import msgpack

from tests.support.vllm_wire import encode_batch, stored

__all__ = [
    "BLOCKS_PER_EVENT",
    "BLOCK_SIZE",
    "CHAIN_EVENTS",
    "MARKER_HASH_BASE",
    "MODEL",
    "PREFIX_BLOCKS",
    "PROBE_POD",
    "PROMPT_BLOCKS",
    "PROMPT_HASH_BASE",
    "TOKEN_LIMIT",
    "Stored",
    "check_encoder",
    "encode_stored",
    "make_prompt",
    "marker_tokens",
    "pod_id",
    "topic_of",
]

MODEL = "bench-model"
BLOCK_SIZE = 16
PROMPT_TOKENS = 8192
PROMPT_BLOCKS = PROMPT_TOKENS // BLOCK_SIZE  # 512
PREFIX_BLOCKS = (512, 448, 384, 320, 256, 192, 128, 64)  # what pod i holds of the prompt
BLOCKS_PER_EVENT = 32
CHAIN_EVENTS = 8  # load prompts of 256 blocks, 8 events of 32
PROMPT_HASH_BASE = 0xAB << 56
MARKER_HASH_BASE = 0xFE << 56
PROBE_POD = "10.0.1.1:8000"
TOKEN_LIMIT = 150_000


def pod_id(index: int) -> str:
    return f"10.0.0.{index + 1}:8000"


def topic_of(pod: str) -> bytes:
    return f"kv@{pod}@{MODEL}".encode()


Stored = tuple[list[int], int | None, list[int]]
"""A ``BlockStored``: (block hashes, parent hash, token ids)."""


def encode_stored(ts: float, events: Sequence[Stored]) -> bytes:
    """One batch of ``BlockStored`` events, as vLLM 0.23 publishes it (array form, rank 0).

    The same bytes as ``encode_batch([stored(...), ...], version="0.23")`` (checked at
    start), at a fraction of its cost, so the publishers spend their time sending.
    """
    rest = (BLOCK_SIZE, None, None, None, None, None, None, None)
    encoded = [["BlockStored", hashes, parent, tokens, *rest] for hashes, parent, tokens in events]
    payload: bytes = msgpack.packb([ts, encoded, 0], use_bin_type=True)
    return payload


def check_encoder() -> None:
    """Fail when ``encode_stored`` no longer writes what ``encode_batch`` writes."""
    events: list[Stored] = [
        ([1, 2**64 - 1], 7, list(range(2 * BLOCK_SIZE))),
        ([5], None, list(range(BLOCK_SIZE))),
    ]
    ours = encode_stored(1.5, events)
    reference = encode_batch(
        [stored(h, t, block_size=BLOCK_SIZE, parent=p) for h, p, t in events],
        ts=1.5,
        version="0.23",
    )
    if ours != reference:
        raise RuntimeError("encode_stored no longer matches tests.support.vllm_wire")


def make_prompt() -> list[int]:
    """The 8192-token query prompt (the same on every call)."""
    rng = random.Random(12345)
    return [rng.randrange(TOKEN_LIMIT) for _ in range(PROMPT_TOKENS)]


def marker_tokens(number: int) -> list[int]:
    """A one-block prompt no other block shares (load chains start below 100,000)."""
    return [149_500, number % 100_000, number // 100_000] + [3] * (BLOCK_SIZE - 3)
