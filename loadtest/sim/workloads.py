"""Workloads: sessions of requests whose prompts share prefixes the way real traffic does.

A ``Session`` is one growing context (a ``BlockChain``) and its turns: turn ``k``'s prompt
is the chain's first ``prompt_len`` tokens, its output the next ``output_len``; the next
turn arrives ``think`` seconds after this one's last token (closed loop within a session).
Sessions start as a Poisson process whose rate offers the engines ``load`` times the
prefill they could serve if nothing were cached.

- ``chat``: multi-turn conversations, each opening with one of a few system prompts.
- ``rag``: one-shot questions over two documents drawn (Zipf) from a shared pool.
- ``agentic``: long tool-use loops: every step appends a tool result to a growing context.
- ``control``: unrelated prompts, nothing to share (routing can only balance load).
- ``trace``: a JSONL file of requests (token ids or text, timestamps), replayed as given.

Everything is drawn from one seeded ``random.Random``: the same seed, the same workload.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from loadtest.sim.chain import BlockChain
from loadtest.sim.engine import ServiceTime

__all__ = [
    "GENERATORS",
    "Session",
    "Turn",
    "Workload",
    "WorkloadShape",
    "agentic",
    "chat",
    "control",
    "rag",
    "trace",
]

VOCAB = 150_000
"""Token ids are drawn below this (a Qwen-sized vocabulary)."""


@dataclass(frozen=True, slots=True)
class Turn:
    prompt_len: int
    output_len: int
    think: float
    """Seconds from this turn's last token to the next turn's arrival."""


@dataclass(slots=True)
class Session:
    start: float
    chain: BlockChain
    turns: tuple[Turn, ...]


@dataclass(frozen=True, slots=True)
class WorkloadShape:
    """What the generators need to know about the cluster to set arrival rates."""

    engines: int
    timing: ServiceTime
    load: float = 0.7
    """Offered prefill load per engine if nothing were cached (1.0 = saturated)."""
    block_size: int = 16


@dataclass(slots=True)
class Workload:
    name: str
    description: str
    sessions: list[Session]

    @property
    def requests(self) -> int:
        return sum(len(s.turns) for s in self.sessions)

    def max_request_blocks(self) -> int:
        """The most blocks one request occupies (must fit in one engine's cache)."""
        size = self.sessions[0].chain.block_size if self.sessions else 1
        return max(
            (-(-(t.prompt_len + t.output_len) // size) for s in self.sessions for t in s.turns),
            default=0,
        )

    def distinct_blocks(self) -> int:
        """Distinct full blocks over every prompt and output: the most cache it could use."""
        seen: set[int] = set()
        for session in self.sessions:
            chain = session.chain
            last = max(((t.prompt_len + t.output_len - 1) for t in session.turns), default=0)
            seen.update(chain.hashes[: last // chain.block_size])
        return len(seen)


def _tokens(rng: random.Random, count: int) -> list[int]:
    return rng.choices(range(VOCAB), k=count)


def _starts(rng: random.Random, count: int, rate: float) -> Iterator[float]:
    now = 0.0
    for _ in range(count):
        yield now
        now += rng.expovariate(rate)


def _session_rate(shape: WorkloadShape, sessions: list[list[Turn]]) -> float:
    """Sessions per second offering ``shape.load`` of the uncached prefill capacity."""
    turns = [t for s in sessions for t in s]
    mean_prefill = sum(shape.timing.prefill(t.prompt_len) for t in turns) / len(turns)
    request_rate = shape.load * shape.engines / mean_prefill
    return request_rate * len(sessions) / len(turns)


def _finish(
    name: str,
    description: str,
    rng: random.Random,
    shape: WorkloadShape,
    built: list[tuple[BlockChain, list[Turn]]],
) -> Workload:
    rate = _session_rate(shape, [turns for _, turns in built])
    starts = _starts(rng, len(built), rate)
    sessions = [
        Session(start, chain, tuple(turns))
        for start, (chain, turns) in zip(starts, built, strict=True)
    ]
    return Workload(name, description, sessions)


def chat(rng: random.Random, shape: WorkloadShape, sessions: int) -> Workload:
    """Multi-turn chat: 4 system prompts (800-2000 tokens), 2-8 turns of 20-250 user
    tokens and 50-400 output tokens, 5-60 s (mean 15 s) of thinking between turns."""
    systems = []
    for _ in range(4):
        system = BlockChain(shape.block_size)
        system.extend(_tokens(rng, rng.randint(800, 2000)))
        systems.append(system)
    built = []
    for _ in range(sessions):
        chain = rng.choice(systems).fork()
        turns = []
        for _ in range(rng.randint(2, 8)):
            chain.extend(_tokens(rng, rng.randint(20, 250)))
            prompt_len, output_len = len(chain), rng.randint(50, 400)
            chain.extend(_tokens(rng, output_len))
            think = min(60.0, 5.0 + rng.expovariate(1 / 10.0))
            turns.append(Turn(prompt_len, output_len, think))
        built.append((chain, turns))
    return _finish("chat", "multi-turn chat, 4 shared system prompts", rng, shape, built)


def rag(rng: random.Random, shape: WorkloadShape, requests: int, documents: int = 300) -> Workload:
    """RAG: one system prompt (300 tokens), then 2 of ``documents`` documents (400-2000
    tokens, Zipf popularity, s = 1) and a question (20-60 tokens); 30-150 output tokens."""
    system = BlockChain(shape.block_size)
    system.extend(_tokens(rng, 300))
    docs = [_tokens(rng, rng.randint(400, 2000)) for _ in range(documents)]
    weights = [1 / (rank + 1) for rank in range(documents)]
    first_doc: dict[int, BlockChain] = {}
    built = []
    for _ in range(requests):
        first, second = rng.choices(range(documents), weights, k=2)
        while second == first:
            second = rng.choices(range(documents), weights)[0]
        base = first_doc.get(first)
        if base is None:
            base = first_doc[first] = system.fork()
            base.extend(docs[first])
        chain = base.fork()
        chain.extend(docs[second])
        chain.extend(_tokens(rng, rng.randint(20, 60)))
        prompt_len, output_len = len(chain), rng.randint(30, 150)
        chain.extend(_tokens(rng, output_len))
        built.append((chain, [Turn(prompt_len, output_len, 0.0)]))
    return _finish("rag", f"RAG, 2 of {documents} shared documents (Zipf)", rng, shape, built)


def agentic(rng: random.Random, shape: WorkloadShape, sessions: int) -> Workload:
    """Agent loops: 2 system prompts with tool definitions (2000-3000 tokens), a task
    (100-400 tokens), then 6-14 steps: a tool call (30-120 output tokens), a tool run
    (mean 1.5 s), its result (200-1000 tokens) appended to the context."""
    systems = []
    for _ in range(2):
        system = BlockChain(shape.block_size)
        system.extend(_tokens(rng, rng.randint(2000, 3000)))
        systems.append(system)
    built = []
    for _ in range(sessions):
        chain = rng.choice(systems).fork()
        chain.extend(_tokens(rng, rng.randint(100, 400)))
        turns = []
        for _ in range(rng.randint(6, 14)):
            prompt_len, output_len = len(chain), rng.randint(30, 120)
            chain.extend(_tokens(rng, output_len))
            turns.append(Turn(prompt_len, output_len, rng.expovariate(1 / 1.5)))
            chain.extend(_tokens(rng, rng.randint(200, 1000)))
        built.append((chain, turns))
    return _finish("agentic", "agent loops, long growing contexts", rng, shape, built)


def control(rng: random.Random, shape: WorkloadShape, requests: int) -> Workload:
    """No sharing: unrelated prompts of 500-2500 tokens, 30-200 output tokens."""
    built = []
    for _ in range(requests):
        chain = BlockChain(shape.block_size)
        prompt_len, output_len = rng.randint(500, 2500), rng.randint(30, 200)
        chain.extend(_tokens(rng, prompt_len + output_len))
        built.append((chain, [Turn(prompt_len, output_len, 0.0)]))
    return _finish("control", "no shared prefixes (control)", rng, shape, built)


def trace(
    path: Path, rng: random.Random, shape: WorkloadShape, *, limit: int | None = None
) -> Workload:
    """Replay a JSONL trace, one request per line, arriving at its timestamp.

    Fields: ``timestamp`` (seconds; the first line's is time 0), ``token_ids`` (list of
    ints) or ``text`` (split on whitespace, one token per word, ids from CRC-32: no model
    tokenizer needed, and identical text gives identical blocks), optional
    ``output_tokens`` (default 128; their ids are random).
    """
    rows: list[tuple[float, list[int], int]] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if limit is not None and len(rows) >= limit:
                break
            try:
                record = json.loads(line)
                stamp = float(record["timestamp"])
                if "token_ids" in record:
                    tokens = [int(t) for t in record["token_ids"]]
                else:
                    tokens = [zlib.crc32(w.encode()) % VOCAB for w in str(record["text"]).split()]
                output = int(record.get("output_tokens", 128))
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(f"{path}:{number}: not a trace record: {error}") from error
            if not tokens or output < 1:
                raise ValueError(f"{path}:{number}: empty prompt or output_tokens < 1")
            if not all(0 <= t < 1 << 32 for t in tokens):
                raise ValueError(f"{path}:{number}: token ids must be in [0, 2**32)")
            rows.append((stamp, tokens, output))
    if not rows:
        raise ValueError(f"{path}: no records")
    origin = min(stamp for stamp, _, _ in rows)
    sessions = []
    for stamp, tokens, output in sorted(rows, key=lambda row: row[0]):
        chain = BlockChain(shape.block_size)
        chain.extend(tokens)
        chain.extend(_tokens(rng, output))
        sessions.append(Session(stamp - origin, chain, (Turn(len(tokens), output, 0.0),)))
    return Workload("trace", f"replay of {path.name}", sessions)


GENERATORS: dict[str, Callable[[random.Random, WorkloadShape, int], Workload]] = {
    "chat": chat,
    "rag": rag,
    "agentic": agentic,
    "control": control,
}
"""Synthetic workloads by name; the int is sessions (chat, agentic) or requests."""
