"""Routers compared by the simulator: where should this request go?

- ``round-robin``, ``random``: cache-blind baselines.
- ``approx``: what routers without engine events do (llm-d's approximate prefix scorer,
  SGLang's cache-aware router): remember, per block hash, which engine each earlier
  prompt was sent to and when, and forget after a TTL. It cannot see evictions.
- ``precise``: this service. Asks the real daemon (gRPC ``GetCandidates``) which engines
  hold the longest prefix, as learnt from the engines' KV events.
- ``oracle``: reads every engine's cache directly, with no lag: the best any prefix
  router can know.

Each prefix router picks the engine with the longest match; ties go to the engine with
the fewest requests in flight, then in turn. The ``+load`` variants subtract a queue
penalty: ``score = matched blocks / prompt blocks - load_penalty * in-flight / mean
in-flight``, where in-flight counts the requests sent to the engine that have not finished
(what a router sees from its own traffic): an engine with twice the mean load must match
``load_penalty`` more of the prompt to win.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from loadtest.sim.daemon import Daemon
from loadtest.sim.engine import Request, SimEngine

__all__ = [
    "ApproximateMatches",
    "Loads",
    "MatchSource",
    "OracleMatches",
    "PreciseMatches",
    "PrefixRouter",
    "RandomChoice",
    "RoundRobin",
    "Router",
]


@dataclass(slots=True)
class Loads:
    """What a router knows of each engine's load from its own traffic."""

    inflight: list[int]
    """Requests sent that have not finished."""


class Router(Protocol):
    name: str

    async def route(self, request: Request, loads: Loads, now: float) -> int:
        """The index of the engine to send ``request`` to."""
        ...


class RoundRobin:
    def __init__(self, engines: int) -> None:
        self.name = "round-robin"
        self._engines = engines
        self._next = 0

    async def route(self, request: Request, loads: Loads, now: float) -> int:
        chosen = self._next
        self._next = (chosen + 1) % self._engines
        return chosen


class RandomChoice:
    def __init__(self, engines: int, seed: int) -> None:
        self.name = "random"
        self._engines = engines
        self._rng = random.Random(seed)

    async def route(self, request: Request, loads: Loads, now: float) -> int:
        return self._rng.randrange(self._engines)


class MatchSource(Protocol):
    async def match_blocks(self, request: Request, now: float) -> Sequence[int]:
        """Per engine, how many leading blocks of the prompt it is believed to hold."""
        ...

    def record(self, request: Request, engine: int, now: float) -> None:
        """The request was sent to ``engine``."""
        ...


class OracleMatches:
    """Reads the engines' caches directly: zero lag, no error."""

    def __init__(self, engines: Sequence[SimEngine]) -> None:
        self._engines = engines

    async def match_blocks(self, request: Request, now: float) -> Sequence[int]:
        hashes = request.prompt_hashes
        return [engine.cache.prefix_length(hashes) for engine in self._engines]

    def record(self, request: Request, engine: int, now: float) -> None:
        pass


class ApproximateMatches:
    """Router-side memory of where prompts went: block hash -> {engine: time sent}.

    An entry older than ``ttl`` seconds no longer counts and is pruned. Bounded by the
    blocks routed within one TTL.
    """

    def __init__(self, engines: int, ttl: float) -> None:
        self._engines = engines
        self._ttl = ttl
        self._sent: dict[int, dict[int, float]] = {}
        self._next_prune = ttl

    @property
    def entries(self) -> int:
        return sum(len(engines) for engines in self._sent.values())

    async def match_blocks(self, request: Request, now: float) -> Sequence[int]:
        matches = [0] * self._engines
        oldest = now - self._ttl
        alive = list(range(self._engines))
        for length, block_hash in enumerate(request.prompt_hashes, 1):
            sent = self._sent.get(block_hash)
            if sent is None:
                break
            alive = [e for e in alive if sent.get(e, -math.inf) >= oldest]
            if not alive:
                break
            for engine in alive:
                matches[engine] = length
        return matches

    def record(self, request: Request, engine: int, now: float) -> None:
        sent = self._sent
        for block_hash in request.prompt_hashes:
            entry = sent.get(block_hash)
            if entry is None:
                sent[block_hash] = {engine: now}
            else:
                entry[engine] = now
        if now >= self._next_prune:
            self._prune(now)

    def _prune(self, now: float) -> None:
        oldest = now - self._ttl
        for block_hash in list(self._sent):
            entry = self._sent[block_hash]
            for engine in [e for e, sent in entry.items() if sent < oldest]:
                del entry[engine]
            if not entry:
                del self._sent[block_hash]
        self._next_prune = now + self._ttl / 4


class PreciseMatches:
    """This service: the daemon's answer to ``GetCandidates`` for the prompt's tokens."""

    def __init__(self, daemon: Daemon, model: str, pod_ids: Sequence[str]) -> None:
        self._daemon = daemon
        self._model = model
        self._index = {pod: i for i, pod in enumerate(pod_ids)}

    async def match_blocks(self, request: Request, now: float) -> Sequence[int]:
        matches = [0] * len(self._index)
        found = await self._daemon.match_lengths(self._model, request.prompt_tokens())
        for pod, length in found.items():
            engine = self._index.get(pod)
            if engine is not None:
                matches[engine] = length
        return matches

    def record(self, request: Request, engine: int, now: float) -> None:
        pass


class PrefixRouter:
    """Longest prefix first, optionally minus a queue penalty (see the module docstring)."""

    def __init__(self, name: str, source: MatchSource, *, load_penalty: float = 0.0) -> None:
        self.name = name
        self.source = source
        self._penalty = load_penalty
        self._turn = 0

    async def route(self, request: Request, loads: Loads, now: float) -> int:
        matches = await self.source.match_blocks(request, now)
        blocks = max(1, len(request.prompt_hashes))
        engines = len(matches)
        turn = self._turn
        self._turn = (turn + 1) % engines
        inflight = loads.inflight
        mean = max(1.0, sum(inflight) / engines)
        best, best_key = 0, (-math.inf, 0, 0)
        for engine, matched in enumerate(matches):
            score = min(matched, blocks) / blocks - self._penalty * inflight[engine] / mean
            key = (score, -inflight[engine], -((engine - turn) % engines))
            if key > best_key:
                best, best_key = engine, key
        self.source.record(request, best, now)
        return best
