"""From one pod's decoded vLLM events to index operations, keyed per the model's key mode.

``tokens`` mode keys every stored block from its token ids (``TokenKeys``) and remembers
engine hash -> key, so events that carry only engine hashes (``BlockRemoved``, offload
tiers) resolve. ``vllm`` mode uses the engine hashes as keys and checks them against its
own hash of the tokens (``VllmKeys.check_published``).

Chains whose parent is unknown (tokens mode): a ``BlockStored`` whose parent engine hash
was never seen with tokens (a lost message, or a mapping aged out) cannot be keyed, since
its key depends on the parent's. It is skipped and counted (``unknown_parent``); its
blocks stay unknown, so events chaining from them are skipped the same way, and nothing
wrong enters the index. The next prompt from the chain root, or a replay, repairs it.

Blocks whose ``extra_keys`` hold more than the LoRA name and a first-block ``cache_salt``
(multimodal inputs) are keyed by their engine hash: they never match a token query, and
their children still chain consistently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from service.events.model import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EngineHash,
    Event,
)
from service.index.keys import BlockKeyer, HashCheck, VllmKeys
from service.index.protocol import ClearPod, IndexOp, RemoveBlocks, StoreBlocks

__all__ = ["SKIP_REASONS", "EventTranslator", "Translation"]

SKIP_REASONS = ("unknown_parent", "unmapped", "bad_tokens")
"""Reasons an event (or part of one) is skipped after decoding."""


@dataclass(slots=True)
class Translation:
    """Index operations for one batch, plus what was skipped and what was checked."""

    ops: list[IndexOp] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    hash_checks: dict[HashCheck, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


class EventTranslator:
    """Turns one model's events into index operations; learns the model's block size.

    ``max_engine_hashes`` bounds the engine hash -> key map (tokens mode). The map is
    shared by the model's pods (the same engine hash means the same tokens, whichever pod
    sent it) and forgets the hashes stored longest ago, a generation at a time, except that
    a hash used as a parent counts as new again, so a shared prefix's mapping outlives
    one-off chains.
    """

    def __init__(self, keyer: BlockKeyer, *, max_engine_hashes: int = 1_000_000) -> None:
        if max_engine_hashes <= 0:
            raise ValueError(f"max_engine_hashes must be positive, got {max_engine_hashes}")
        self.keyer = keyer
        self.block_size: int | None = None
        self._uses_engine_hashes = isinstance(keyer, VllmKeys)
        self._keys = _EngineKeys(max_engine_hashes)

    @property
    def key_mode(self) -> str:
        return self.keyer.key_mode

    def translate(self, events: Sequence[Event]) -> Translation:
        result = Translation()
        for event in events:
            if isinstance(event, BlockStored):
                self._stored(event, result)
            elif isinstance(event, BlockRemoved):
                keys = self._resolve(event.block_hashes, result)
                if keys:
                    result.ops.append(RemoveBlocks(keys, event.tier))
            elif isinstance(event, AllBlocksCleared):
                result.ops.append(ClearPod())
        return result

    def query_keys(
        self,
        token_ids: Sequence[int],
        *,
        lora_name: str | None = None,
        cache_salt: str | None = None,
    ) -> list[int]:
        """Keys of a prompt's full blocks; empty while the block size is unknown.

        Raises ``ValueError`` for token ids outside ``[0, 2**32)``.
        """
        if self.block_size is None:
            return []
        return self.keyer.block_keys(
            token_ids, self.block_size, lora_name=lora_name, cache_salt=cache_salt
        )

    def keys_of_engine_hashes(self, hashes: Sequence[EngineHash]) -> list[int]:
        """Keys of a chain given as engine hashes, cut at the first hash never seen."""
        if self._uses_engine_hashes:
            return list(hashes)
        keys = []
        for engine_hash in hashes:
            key = self._keys.get(engine_hash)
            if key is None:
                break
            keys.append(key)
        return keys

    @property
    def engine_hashes_known(self) -> int:
        return len(self._keys)

    def _stored(self, event: BlockStored, result: Translation) -> None:
        if not event.token_ids or event.block_size <= 0:
            keys = self._resolve(event.block_hashes, result)
            if keys:
                result.ops.append(StoreBlocks(keys, event.tier))
            return
        self.block_size = event.block_size
        if self._uses_engine_hashes:
            self._check(event, result)
            result.ops.append(StoreBlocks(event.block_hashes, event.tier))
            return
        parent: int | None = None
        if event.parent_block_hash is not None:
            # A parent in use (a shared system prompt, say) counts as recently stored.
            parent = self._keys.touch(event.parent_block_hash)
            if parent is None:
                result.skip("unknown_parent")
                return
        try:
            keys = self._token_keys(event, parent)
        except ValueError:
            result.skip("bad_tokens")
            return
        self._keys.update(event.block_hashes, keys)
        result.ops.append(StoreBlocks(keys, event.tier))

    def _token_keys(self, event: BlockStored, parent: int | None) -> list[int]:
        salt, plain = _salt_and_plainness(event, parent is None)
        if plain:
            return self.keyer.block_keys(
                event.token_ids,
                event.block_size,
                parent=parent,
                lora_name=event.lora_name,
                cache_salt=salt,
            )
        # Some block carries multimodal keys: key block by block, those by engine hash.
        size = event.block_size
        extra_keys = event.extra_keys or ()
        keys: list[int] = []
        for i, engine_hash in enumerate(event.block_hashes):
            extra = extra_keys[i] if i < len(extra_keys) else None
            if _is_plain(extra, event.lora_name, first=parent is None and i == 0):
                (key,) = self.keyer.block_keys(
                    event.token_ids[i * size : (i + 1) * size],
                    size,
                    parent=parent,
                    lora_name=event.lora_name,
                    cache_salt=salt if i == 0 else None,
                )
            else:
                key = engine_hash
            keys.append(key)
            parent = key
        return keys

    def _check(self, event: BlockStored, result: Translation) -> None:
        assert isinstance(self.keyer, VllmKeys)
        salt, plain = _salt_and_plainness(event, event.parent_block_hash is None)
        if not plain:
            return
        try:
            outcome = self.keyer.check_published(
                event.token_ids,
                event.block_size,
                event.block_hashes,
                parent=event.parent_block_hash,
                lora_name=event.lora_name,
                cache_salt=salt,
            )
        except ValueError:
            result.skip("bad_tokens")
            return
        result.hash_checks[outcome] = result.hash_checks.get(outcome, 0) + 1

    def _resolve(self, hashes: Sequence[EngineHash], result: Translation) -> list[int]:
        if self._uses_engine_hashes:
            return list(hashes)
        get = self._keys.get
        keys = [key for key in map(get, hashes) if key is not None]
        if len(keys) < len(hashes):
            result.skip("unmapped")
        return keys


class _EngineKeys:
    """Engine hash -> key, in two generations (native/engine_map.hpp is the twin): at most
    half the bound each; when the young one fills it becomes the old one and the previous
    old one is dropped whole. A hash touched as a parent moves to the young generation, so a
    shared prefix's mapping outlives one-off chains."""

    __slots__ = ("_half", "_old", "_young")

    def __init__(self, bound: int) -> None:
        self._half = max(1, bound // 2)
        self._young: dict[EngineHash, int] = {}
        self._old: dict[EngineHash, int] = {}

    def __len__(self) -> int:
        return len(self._young) + len(self._old)

    def get(self, engine_hash: EngineHash) -> int | None:
        key = self._young.get(engine_hash)
        return self._old.get(engine_hash) if key is None else key

    def touch(self, engine_hash: EngineHash) -> int | None:
        """The key, now counted as recently used."""
        key = self._young.get(engine_hash)
        if key is None:
            key = self._old.get(engine_hash)
            if key is not None:
                self._put(engine_hash, key)
        return key

    def update(self, hashes: Sequence[EngineHash], keys: Sequence[int]) -> None:
        for engine_hash, key in zip(hashes, keys, strict=True):
            self._put(engine_hash, key)

    def _put(self, engine_hash: EngineHash, key: int) -> None:
        young = self._young
        young[engine_hash] = key
        if len(young) >= self._half:
            self._old, self._young = young, {}


def _salt_and_plainness(event: BlockStored, starts_prompt: bool) -> tuple[str | None, bool]:
    """The cache_salt of a prompt-starting event, and whether no block has other extra keys."""
    extra_keys = event.extra_keys
    if not extra_keys:
        return None, True
    salt = None
    first = extra_keys[0]
    if starts_prompt and isinstance(first, tuple):
        rest = _without_lora(first, event.lora_name)
        if len(rest) == 1 and isinstance(rest[0], str):
            salt = rest[0]
    plain = all(
        _is_plain(extra, event.lora_name, first=starts_prompt and i == 0)
        for i, extra in enumerate(extra_keys)
    )
    return salt, plain


def _is_plain(extra: object, lora_name: str | None, *, first: bool) -> bool:
    if extra is None:
        return True
    if not isinstance(extra, tuple):
        return False
    rest = _without_lora(extra, lora_name)
    return not rest or (first and len(rest) == 1 and isinstance(rest[0], str))


def _without_lora(extra: tuple[object, ...], lora_name: str | None) -> tuple[object, ...]:
    if lora_name is not None and extra and extra[0] == lora_name:
        return extra[1:]
    return extra
