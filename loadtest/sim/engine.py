"""A simulated vLLM engine: a prefix cache, a FIFO queue and a service-time model.

Time is simulated: the engine is told the time and says when its work ends; the simulator
(``loadtest.sim.simulator``) advances the clock. Prefill is served one request at a time in
arrival order and costs ``prefill_overhead + prefill_per_token * uncached prompt tokens``;
decode runs alongside (continuous batching) and costs ``decode_per_token`` per output token.
A request is admitted when a prefill slot is free, fewer than ``max_running`` requests run,
and the cache can supply its blocks; it holds them (referenced) until its last token.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from loadtest.sim.cache import Allocation, BlocksRemoved, BlocksStored, PrefixCache
from loadtest.sim.chain import BlockChain
from tests.support.vllm_wire import WireEvent, removed, stored

__all__ = ["Request", "ServiceTime", "SimEngine"]

MEDIUM_GPU = "GPU"


@dataclass(frozen=True, slots=True)
class ServiceTime:
    """How long an engine takes, in seconds."""

    prefill_overhead: float = 0.010
    prefill_per_token: float = 0.000_2
    decode_per_token: float = 0.010

    def prefill(self, uncached_tokens: int) -> float:
        return self.prefill_overhead + self.prefill_per_token * uncached_tokens

    def decode(self, output_tokens: int) -> float:
        return self.decode_per_token * output_tokens


@dataclass(slots=True, eq=False)
class Request:
    """One request: tokens ``[0, prompt_len)`` of ``chain`` are its prompt, the next
    ``output_len`` its output. Filled in as it runs: engine, cached tokens, times."""

    chain: BlockChain
    prompt_len: int
    output_len: int
    arrival: float
    session: int = 0
    turn: int = 0
    engine: int = -1
    cached_tokens: int = 0
    started: float = 0.0
    first_token: float = 0.0
    finished: float = 0.0
    allocation: Allocation | None = field(default=None, repr=False)

    @property
    def block_size(self) -> int:
        return self.chain.block_size

    @property
    def prompt_hashes(self) -> list[int]:
        """The hashes of the prompt's full blocks."""
        return self.chain.hashes[: self.prompt_len // self.chain.block_size]

    @property
    def total_blocks(self) -> int:
        """Blocks the request occupies at its end (the last one possibly partial)."""
        return -(-(self.prompt_len + self.output_len) // self.chain.block_size)

    @property
    def final_full_blocks(self) -> int:
        """Full blocks whose KV exists at the end: the last sampled token has none."""
        return (self.prompt_len + self.output_len - 1) // self.chain.block_size

    @property
    def max_hit_blocks(self) -> int:
        """vLLM computes at least a prompt's last token, so it cannot all be a hit."""
        return (self.prompt_len - 1) // self.chain.block_size

    def prompt_tokens(self) -> list[int]:
        return self.chain.tokens[: self.prompt_len].tolist()

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival


class SimEngine:
    """One engine: its cache, queue and clock-driven state. ``publish`` turns on the
    conversion of cache events to vLLM wire events (``take_events``)."""

    def __init__(
        self,
        index: int,
        pod_id: str,
        *,
        capacity_blocks: int,
        timing: ServiceTime,
        max_running: int = 64,
        publish: bool = False,
    ) -> None:
        self.index = index
        self.pod_id = pod_id
        self.cache = PrefixCache(capacity_blocks)
        self.timing = timing
        self.max_running = max_running
        self.publish = publish
        self.queue: deque[Request] = deque()
        self.prefilling: Request | None = None
        self.running = 0
        self.served = 0
        self._wire: list[WireEvent] = []

    def enqueue(self, request: Request) -> None:
        self.queue.append(request)

    def start_next(self, now: float) -> Request | None:
        """Admit the head of the queue if it can start now; it prefills until
        ``request.started + timing.prefill(...)``, returned as ``request.first_token``."""
        if self.prefilling is not None or not self.queue or self.running >= self.max_running:
            return None
        request = self.queue[0]
        allocation = self.cache.allocate(
            request.prompt_hashes, request.total_blocks, max_hit=request.max_hit_blocks
        )
        if allocation is None:
            return None
        self.queue.popleft()
        self._convert(request.chain)
        request.allocation = allocation
        request.cached_tokens = allocation.hit_blocks * request.block_size
        request.started = now
        request.first_token = now + self.timing.prefill(request.prompt_len - request.cached_tokens)
        self.prefilling = request
        self.running += 1
        return request

    def prefill_done(self, request: Request) -> float:
        """The request's first token is out; returns when its last one will be."""
        assert self.prefilling is request
        self.prefilling = None
        return request.first_token + self.timing.decode(request.output_len)

    def finish(self, request: Request, now: float) -> None:
        """The request's last token is out: cache its output's full blocks, release all."""
        allocation = request.allocation
        assert allocation is not None
        hashes = request.chain.hashes[: request.final_full_blocks]
        self.cache.store(allocation, hashes, request.prompt_len // request.block_size)
        self.cache.free(allocation)
        self._convert(request.chain)
        request.allocation = None
        request.finished = now
        self.running -= 1
        self.served += 1

    def take_events(self) -> list[WireEvent]:
        """vLLM events since the last call (one engine step's batch), if publishing."""
        events, self._wire = self._wire, []
        return events

    def _convert(self, chain: BlockChain) -> None:
        events = self.cache.take_events()
        if not self.publish:
            return
        wire = self._wire
        size = chain.block_size
        for event in events:
            if isinstance(event, BlocksStored):
                tokens = chain.block_tokens(event.position, len(event.hashes))
                wire.append(
                    stored(
                        event.hashes,
                        tokens,
                        block_size=size,
                        parent=event.parent,
                        medium=MEDIUM_GPU,
                    )
                )
            elif isinstance(event, BlocksRemoved):
                wire.append(removed(event.hashes, medium=MEDIUM_GPU))
