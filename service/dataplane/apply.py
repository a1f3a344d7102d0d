"""Applying one stream's batches: decode, translate to index operations, write the index,
and count what happened (the Python data plane's; native/plane.cpp ``apply`` and
native/keying.cpp are the twin)."""

from __future__ import annotations

import time
from collections import Counter

import structlog

from service.dataplane.sequencing import Decoded, Stream
from service.events.model import EventBatch
from service.events.vllm import DecodeError, decode_batch
from service.index.protocol import BlockIndex, ClearPod
from service.models import ModelRegistry
from service.telemetry import EVENT_TYPES, LATENCY_BUCKETS

__all__ = ["BatchApplier"]

log = structlog.get_logger("kv_cache.ingest")


class BatchApplier:
    """Decodes payloads and applies decoded batches to ``index``; keeps the counts."""

    def __init__(self, index: BlockIndex, models: ModelRegistry) -> None:
        self._index = index
        self._models = models
        self.events: Counter[str] = Counter(dict.fromkeys(EVENT_TYPES, 0))
        self.drops: Counter[str] = Counter()
        self.lag_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.lag_sum = 0.0
        self._mismatch_logged: set[str] = set()

    def count_drop(self, reason: str) -> None:
        self.drops[reason] += 1

    def decode(self, payload: bytes) -> Decoded:
        """The batch, or None for a payload that is not one (counted by reason)."""
        try:
            batch = decode_batch(payload)
        except DecodeError as error:
            self.count_drop(error.reason)
            return None
        self.drops.update(batch.skipped)
        return batch

    async def clear(self, stream: Stream) -> None:
        await self._index.apply(stream.model, stream.pod, [ClearPod()])

    async def apply(self, stream: Stream, batch: EventBatch, live: bool) -> None:
        """The batch's events, translated and written in one ``apply`` (one round trip
        for a networked index); a live batch's lag is observed."""
        model = self._models.get_or_add(stream.model)
        translation = model.translator.translate(batch.events)
        for event in batch.events:
            self.events[type(event).__name__] += 1
        self.drops.update(translation.skipped)
        if translation.hash_checks:
            mismatches = model.record(translation.hash_checks)
            if mismatches and stream.model not in self._mismatch_logged:
                self._mismatch_logged.add(stream.model)
                log.error(
                    "engine block hashes differ from ours",
                    model=stream.model,
                    pod=str(stream.pod),
                    key_mode="vllm",
                    likely_cause="hash_algorithm or hash_seed (PYTHONHASHSEED) differ from"
                    " the engine's; or the engine's vLLM version hashes differently",
                )
        if translation.ops:
            await self._index.apply(stream.model, stream.pod, translation.ops)
        if live:  # a replayed batch is late by design: its lag says nothing of the stream
            stream.lag = lag = max(0.0, time.time() - batch.ts)
            bucket = next(
                (i for i, bound in enumerate(LATENCY_BUCKETS) if lag <= bound),
                len(LATENCY_BUCKETS),
            )
            self.lag_counts[bucket] += 1
            self.lag_sum += lag
