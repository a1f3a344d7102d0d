"""An LRU, bounded by bytes, of text prefixes -> token ids, so long system prompts and
growing chat histories are not tokenised again from the start.

A text is cut at checkpoints (``CutRule.checkpoints``: safe cuts about ``stride``
characters apart, at least ``_PROBE_CHARS`` apart) into segments. Each stored segment holds
its text and its token ids and is keyed by a hash chained over the segments before it,
like a block-hash chain. A lookup walks the text from the start: at each point it takes the
segments stored after the ones walked so far whose first ``_PROBE_CHARS`` characters are
next in the text (a probe index), and keeps the one whose whole text is next and ends
where the text has a checkpoint. That checks a segment without searching the text for
checkpoints or hashing it: everything before the segment's end equals the text it was cut
from, so the text has a checkpoint there exactly when the two characters at the end are a
space and a non-space. The caller tokenises the rest piece by piece at its own
checkpoints. Because checkpoints are safe cuts, the ids of the pieces, stored or new,
concatenate to exactly the ids of the whole text (see ``boundaries``).

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

from service.index.keys import TOKEN_TYPECODE
from service.prompts.boundaries import CutRule

__all__ = ["TOKEN_TYPECODE", "PrefixStore", "PrefixStoreStats", "Splice"]


# A segment's cost beyond its text and ids: the _Segment object, its OrderedDict slot and
# link, the key int, its probe entry (~270 bytes; 206 measured with tracemalloc over 20,000
# segments before the probe index).
_SEGMENT_OVERHEAD: Final = 270
_ROOT: Final = 0
_PROBE_CHARS: Final = 32
# Past this many segments under one probe, a lookup finds the next checkpoint (one regex
# search) and the segment by its key instead of checking each of them.
_SCAN_SIBLINGS: Final = 4
_NONE: Final[dict[int, _Segment]] = {}


class _Segment:
    __slots__ = ("ids", "key", "length", "parent", "probe", "size", "text")

    def __init__(self, key: int, parent: int, probe: int, text: str, ids: array[int]) -> None:
        self.key = key
        self.parent = parent
        self.probe = probe
        self.text = text
        self.length = len(text)
        self.ids = ids
        self.size = sys.getsizeof(text) + sys.getsizeof(ids) + _SEGMENT_OVERHEAD


@dataclass(slots=True)
class Splice:
    """One text's lookup: the ids known for ``text[:start]``, the chained keys of the
    segments that gave them, and the checkpoints after ``start`` (``rest_cuts``)."""

    text: str
    start: int
    ids: array[int]
    keys: list[int] = field(default_factory=list)
    rest_cuts: list[int] = field(default_factory=list)

    @property
    def known(self) -> int:
        """How many stored segments the text starts with."""
        return len(self.keys)


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
        self._probe = min(_PROBE_CHARS, stride)
        self._segments: OrderedDict[int, _Segment] = OrderedDict()
        # hash((parent key, a segment's first characters)) -> such segments
        self._by_probe: dict[int, dict[int, _Segment]] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self._lookups = 0
        self._chars_reused = 0
        self._chars_looked_up = 0
        self._evictions = 0

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    def checkpoints(self, text: str, after: int = 0) -> list[int]:
        """Where ``text`` is cut into segments (after position ``after``, itself a
        checkpoint or 0). Segments are at least ``_PROBE_CHARS`` long (or ``stride``, if
        shorter), so a segment's probe is its own first characters."""
        return self._rule.checkpoints(text, self._stride, after, min_gap=self._probe)

    def lookup(self, text: str) -> Splice:
        """The longest stored prefix of ``text`` that ends at one of its checkpoints."""
        ids = array(TOKEN_TYPECODE)
        keys: list[int] = []
        key = _ROOT
        start = 0
        last = len(text) - 1  # a checkpoint has a character after its space
        probe_chars = self._probe
        with self._lock:
            touch = self._segments.move_to_end
            by_probe = self._by_probe
            while True:
                siblings = by_probe.get(hash((key, text[start : start + probe_chars])), _NONE)
                if len(siblings) > _SCAN_SIBLINGS:
                    # Many stored continuations share these first characters (a common
                    # prefix, then different texts): find the checkpoint, then the segment.
                    segment = self._segment_at(text, start, key)
                    if segment is None:
                        break
                    end = start + segment.length
                else:
                    for segment in siblings.values():
                        end = start + segment.length
                        if (
                            end < last
                            and segment.parent == key
                            and text[end] == " "
                            and not text[end + 1].isspace()
                            and text.startswith(segment.text, start)
                        ):
                            break
                    else:
                        break
                key = segment.key
                touch(key)
                ids.extend(segment.ids)
                keys.append(key)
                start = end
            self._lookups += 1
            self._chars_reused += start
            self._chars_looked_up += len(text)
        return Splice(text, start, ids, keys, self.checkpoints(text, start))

    def _segment_at(self, text: str, start: int, parent: int) -> _Segment | None:
        """The stored segment of ``text`` from ``start`` (a checkpoint) to the next one."""
        cut = self._rule.next_checkpoint(text, self._stride, start, min_gap=self._probe)
        if cut is None:
            return None
        piece = text[start:cut]
        segment = self._segments.get(hash((parent, piece)))
        if segment is None or segment.parent != parent or segment.text != piece:
            return None
        return segment

    def store(self, splice: Splice, segment_ids: Sequence[Sequence[int]]) -> int:
        """Stores the segments after ``splice.start``: ``segment_ids[i]`` are the ids of the
        text between the ``i``-th and the next checkpoint from ``splice.start`` on (the
        caller tokenised the rest piece by piece at those checkpoints). Returns the
        segments stored."""
        if self._max_bytes == 0 or not segment_ids:
            return 0
        text = splice.text
        bounds = [splice.start, *splice.rest_cuts[: len(segment_ids)]]
        with self._lock:
            key = splice.keys[-1] if splice.keys else _ROOT
            for begin, end, ids in zip(bounds, bounds[1:], segment_ids, strict=False):
                piece = text[begin:end]
                child = hash((key, piece))
                old = self._segments.get(child)
                if old is not None:
                    self._drop(child, old)
                probe = hash((key, piece[: self._probe]))
                segment = _Segment(child, key, probe, piece, array(TOKEN_TYPECODE, ids))
                self._segments[child] = segment
                self._by_probe.setdefault(probe, {})[child] = segment
                self._bytes += segment.size
                key = child
            while self._bytes > self._max_bytes and self._segments:
                evicted_key, evicted = next(iter(self._segments.items()))
                self._drop(evicted_key, evicted)
                self._evictions += 1
        return len(bounds) - 1

    def _drop(self, key: int, segment: _Segment) -> None:
        del self._segments[key]
        self._bytes -= segment.size
        siblings = self._by_probe[segment.probe]
        del siblings[key]
        if not siblings:
            del self._by_probe[segment.probe]

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
            self._by_probe.clear()
            self._bytes = 0
