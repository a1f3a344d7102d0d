"""An engine's prefix cache with vLLM's block-pool semantics, in block hashes.

Modelled on vLLM v1's ``BlockPool`` and ``KVCacheManager`` (vllm/v1/core/):
- the pool has ``capacity`` blocks; only FULL blocks get a hash and can be shared;
- a request looks up the longest run of its prompt's block hashes that is cached, and
  references those blocks (``ref`` + 1) for as long as it runs;
- every other block it needs comes from the head of the free queue; a free block that
  still holds a hash is evicted then (``BlockRemoved``), so eviction is LRU over
  unreferenced blocks;
- a request's newly computed full blocks get their hashes at once (``BlockStored``);
- when it finishes, its blocks go to the tail of the free queue in reverse order, so its
  last blocks are evicted before its first (shared prefixes live longest), as vLLM does.

One simplification: vLLM may keep two blocks with the same hash (a block recomputed while
an identical one sits elsewhere in the pool). Here a hash is held by one block at most; a
recomputed duplicate stays unhashed and publishes nothing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Allocation", "BlocksRemoved", "BlocksStored", "CacheEvent", "PrefixCache"]


@dataclass(frozen=True, slots=True)
class BlocksStored:
    """Blocks newly cached, in chain order; ``position`` is the first one's block index in
    its request's context, ``parent`` the hash of the block before it (None: first block)."""

    hashes: tuple[int, ...]
    parent: int | None
    position: int


@dataclass(frozen=True, slots=True)
class BlocksRemoved:
    """Blocks evicted (vLLM publishes one event per evicted block)."""

    hashes: tuple[int, ...]


CacheEvent = BlocksStored | BlocksRemoved


@dataclass(slots=True)
class Allocation:
    """The blocks one running request holds: ``blocks[i]`` backs block ``i`` of its context."""

    blocks: list[int]
    hit_blocks: int
    """Blocks found cached when it was admitted (their tokens need no prefill)."""


class PrefixCache:
    """A pool of ``capacity`` KV blocks with prefix caching; see the module docstring.

    ``events`` collects what the engine publishes, in order; the engine drains it after
    every step.
    """

    __slots__ = ("_block_of", "_free", "_hash_of", "_ref", "capacity", "events", "evictions")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 block, got {capacity}")
        self.capacity = capacity
        # Head = next block handed out (and evicted if it holds a hash); tail = freed last.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(capacity))
        self._ref = [0] * capacity
        self._hash_of: list[int | None] = [None] * capacity
        self._block_of: dict[int, int] = {}
        self.events: list[CacheEvent] = []
        self.evictions = 0

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._block_of

    @property
    def cached_blocks(self) -> int:
        """Blocks holding a hash, referenced or not."""
        return len(self._block_of)

    @property
    def free_blocks(self) -> int:
        """Blocks no running request references (some still hold a hash)."""
        return len(self._free)

    def cached_hashes(self) -> set[int]:
        """Every hash the pool holds."""
        return set(self._block_of)

    def ref_count(self, block_hash: int) -> int:
        """How many running requests reference the block holding ``block_hash`` (0 if none)."""
        block = self._block_of.get(block_hash)
        return 0 if block is None else self._ref[block]

    def prefix_length(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of ``hashes`` are cached."""
        block_of = self._block_of
        length = 0
        for block_hash in hashes:
            if block_hash not in block_of:
                break
            length += 1
        return length

    def allocate(
        self, hashes: Sequence[int], total_blocks: int, *, max_hit: int | None = None
    ) -> Allocation | None:
        """Admit a request: reference its cached prefix, take the rest from the free queue.

        ``hashes`` are the prompt's full-block hashes; ``total_blocks`` the blocks the
        request will occupy (prompt, partial last block and output); at most ``max_hit``
        leading blocks count as cached (vLLM recomputes a prompt's last token, so a prompt
        of exactly n full blocks hits at most n - 1). The uncached full prompt blocks are
        hashed at once. None, with nothing changed, when the free queue cannot supply the
        blocks (the request waits for a running one to finish).
        """
        if total_blocks < len(hashes):
            raise ValueError(f"{len(hashes)} prompt blocks do not fit in {total_blocks}")
        limit = len(hashes) if max_hit is None else max(0, min(max_hit, len(hashes)))
        hit = self.prefix_length(hashes[:limit])
        hit_blocks = [self._block_of[h] for h in hashes[:hit]]
        reclaimed = sum(1 for block in hit_blocks if self._ref[block] == 0)
        needed = total_blocks - hit
        if len(self._free) - reclaimed < needed:
            return None
        for block in hit_blocks:
            self._reference(block)
        allocation = Allocation(hit_blocks + [self._take_free() for _ in range(needed)], hit)
        self.store(allocation, hashes, hit)
        return allocation

    def store(self, allocation: Allocation, hashes: Sequence[int], start: int) -> None:
        """Hash blocks ``start .. len(hashes) - 1`` of a running request (now full)."""
        if len(hashes) > len(allocation.blocks):
            raise ValueError(f"{len(hashes)} blocks exceed the {len(allocation.blocks)} held")
        run: list[int] = []
        run_start = start
        for position in range(start, len(hashes)):
            block_hash = hashes[position]
            if block_hash in self._block_of:
                # A duplicate of a block cached elsewhere: computed, not cached again.
                self._emit_stored(run, run_start, hashes)
                run, run_start = [], position + 1
                continue
            block = allocation.blocks[position]
            self._hash_of[block] = block_hash
            self._block_of[block_hash] = block
            run.append(block_hash)
        self._emit_stored(run, run_start, hashes)

    def free(self, allocation: Allocation) -> None:
        """Release a finished request's blocks: last block first to the free queue's tail."""
        free = self._free
        ref = self._ref
        for block in reversed(allocation.blocks):
            ref[block] -= 1
            if ref[block] == 0:
                free[block] = None
        allocation.blocks = []

    def take_events(self) -> list[CacheEvent]:
        """The events since the last call, in order."""
        events, self.events = self.events, []
        return events

    def _emit_stored(self, run: list[int], start: int, hashes: Sequence[int]) -> None:
        if run:
            parent = hashes[start - 1] if start > 0 else None
            self.events.append(BlocksStored(tuple(run), parent, start))

    def _reference(self, block: int) -> None:
        if self._ref[block] == 0:
            del self._free[block]
        self._ref[block] += 1

    def _take_free(self) -> int:
        block, _ = self._free.popitem(last=False)
        block_hash = self._hash_of[block]
        if block_hash is not None:
            self._hash_of[block] = None
            del self._block_of[block_hash]
            self.evictions += 1
            self.events.append(BlocksRemoved((block_hash,)))
        self._ref[block] = 1
        return block
