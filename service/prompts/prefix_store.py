"""An LRU, bounded by bytes, of text prefixes -> token ids, so long system prompts and
growing chat histories are not tokenised again from the start.

A text is cut at checkpoints (``CutRule.checkpoints``: safe cuts about ``stride``
characters apart) into segments. Each stored segment holds its text and its token ids and
is keyed by a hash chained over the segments before it, like a block-hash chain. A lookup
walks the text's segments from the first while they are stored (comparing texts, so a
hash collision can only cost a miss), and the caller tokenises the rest from the last
segment's end, piece by piece at the checkpoints after it. Because checkpoints are safe
cuts, the ids of the pieces, stored or new, concatenate to exactly the ids of the whole
text (see ``boundaries``).

Thread-safe: lookups and inserts take a lock; tokenising happens outside it.
"""

from __future__ import annotations

import sys
import threading
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from service.prompts.boundaries import CutRule

__all__ = ["TOKEN_TYPECODE", "PrefixStore", "PrefixStoreStats", "Splice"]

TOKEN_TYPECODE: Final = next(code for code in "IL" if array(code).itemsize == 4)
"""A uint32 array typecode: token ids are kept 4 bytes each."""

# A segment's cost beyond its text and ids: the _Segment object, its OrderedDict slot and
# link, the key int (206 bytes measured with tracemalloc over 20,000 segments).
_SEGMENT_OVERHEAD: Final = 210
_ROOT: Final = 0


class _Segment:
    __slots__ = ("ids", "parent", "size", "text")

    def __init__(self, parent: int, text: str, ids: array[int]) -> None:
        self.parent = parent
        self.text = text
        self.ids = ids
        self.size = sys.getsizeof(text) + sys.getsizeof(ids) + _SEGMENT_OVERHEAD


@dataclass(slots=True)
class Splice:
    """One text's lookup: the ids known for ``text[:start]`` and the checkpoints after it.

    ``keys`` are the chained keys of the known segments; ``cuts`` every checkpoint.
    """

    text: str
    cuts: list[int]
    known: int
    ids: array[int]
    keys: list[int] = field(default_factory=list)

    @property
    def start(self) -> int:
        """Where the text still to tokenise begins."""
        return self.cuts[self.known - 1] if self.known else 0


@dataclass(frozen=True, slots=True)
class PrefixStoreStats:
    """Counters since the store was made; ``bytes`` and ``segments`` are current."""

    lookups: int
    chars_reused: int
    chars_looked_up: int
    segments: int
    bytes: int
    evictions: int


class PrefixStore:
    """Text segments -> token ids, least recently used dropped first past ``max_bytes``."""

    def __init__(self, max_bytes: int, rule: CutRule, *, stride: int = 512) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self._max_bytes = max_bytes
        self._rule = rule
        self._stride = stride
        self._segments: OrderedDict[int, _Segment] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._lookups = 0
        self._chars_reused = 0
        self._chars_looked_up = 0
        self._evictions = 0

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    def checkpoints(self, text: str) -> list[int]:
        """Where ``text`` is cut into segments."""
        return self._rule.checkpoints(text, self._stride)

    def lookup(self, text: str) -> Splice:
        """The longest stored prefix of ``text`` that ends at one of its checkpoints."""
        cuts = self.checkpoints(text)
        ids = array(TOKEN_TYPECODE)
        keys: list[int] = []
        key = _ROOT
        start = 0
        with self._lock:
            segments = self._segments
            for cut in cuts:
                piece = text[start:cut]
                next_key = hash((key, piece))
                segment = segments.get(next_key)
                if segment is None or segment.parent != key or segment.text != piece:
                    break
                segments.move_to_end(next_key)
                ids.extend(segment.ids)
                keys.append(next_key)
                key = next_key
                start = cut
            self._lookups += 1
            self._chars_reused += start
            self._chars_looked_up += len(text)
        return Splice(text, cuts, len(keys), ids, keys)

    def store(self, splice: Splice, segment_ids: Sequence[Sequence[int]]) -> int:
        """Stores the segments after ``splice.start``: ``segment_ids[i]`` are the ids of the
        text between the ``i``-th and the next checkpoint after ``splice.start`` (the
        caller tokenised the rest piece by piece at those checkpoints). Returns the
        segments stored."""
        if self._max_bytes == 0 or not segment_ids:
            return 0
        text = splice.text
        bounds = [splice.start, *splice.cuts[splice.known : splice.known + len(segment_ids)]]
        with self._lock:
            key = splice.keys[-1] if splice.keys else _ROOT
            for begin, end, ids in zip(bounds, bounds[1:], segment_ids, strict=False):
                piece = text[begin:end]
                child = hash((key, piece))
                old = self._segments.pop(child, None)
                if old is not None:
                    self._bytes -= old.size
                segment = _Segment(key, piece, array(TOKEN_TYPECODE, ids))
                self._segments[child] = segment
                self._bytes += segment.size
                key = child
            while self._bytes > self._max_bytes and self._segments:
                _, evicted = self._segments.popitem(last=False)
                self._bytes -= evicted.size
                self._evictions += 1
        return len(bounds) - 1

    def stats(self) -> PrefixStoreStats:
        """A snapshot of the counters."""
        with self._lock:
            return PrefixStoreStats(
                self._lookups,
                self._chars_reused,
                self._chars_looked_up,
                len(self._segments),
                self._bytes,
                self._evictions,
            )

    def clear(self) -> None:
        """Drops every segment."""
        with self._lock:
            self._segments.clear()
            self._bytes = 0
