"""EventTranslator: vLLM wire bytes -> decoded events -> index operations -> answers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path

from service.events.vllm import decode_batch
from service.index.keys import HashCheck, TokenKeys, VllmKeys
from service.index.protocol import PodMatch, PodRank
from service.index.reference import ReferenceIndex
from service.index.translate import EventTranslator, Translation
from tests.support.vllm_wire import WireEvent, encode_batch, removed, stored

POD = PodRank("10.0.0.7:8000")
VECTORS = Path(__file__).parents[2] / "fixtures"
TOKENS = list(range(1000, 1064))  # four blocks of 16


class Pipeline:
    """Decode -> translate -> apply, as the daemon will, for one pod and model."""

    def __init__(self, translator: EventTranslator) -> None:
        self.translator = translator
        self.index = ReferenceIndex()

    def send(self, *events: WireEvent, version: str = "0.33") -> Translation:
        batch = decode_batch(encode_batch(list(events), version=version))  # type: ignore[arg-type]
        translation = self.translator.translate(batch.events)
        asyncio.run(self.index.apply("m", POD, translation.ops))
        return translation

    def match(self, keys: Sequence[int]) -> PodMatch | None:
        found = asyncio.run(self.index.lookup("m", keys))
        return found[0] if found else None

    def match_tokens(self, tokens: Sequence[int], **kwargs: str | None) -> int:
        found = self.match(self.translator.query_keys(tokens, **kwargs))
        return found.match_length if found else 0


def engine_hashes(n: int, start: int = 1) -> list[int]:
    return [0xABCDEF0000000000 + i for i in range(start, start + n)]


def tokens_pipeline(**kwargs: int) -> Pipeline:
    return Pipeline(EventTranslator(TokenKeys(), **kwargs))


def test_block_size_is_learnt_from_events() -> None:
    pipeline = tokens_pipeline()
    assert pipeline.translator.query_keys(TOKENS) == []
    pipeline.send(stored(engine_hashes(4), TOKENS, block_size=16))
    assert pipeline.translator.block_size == 16
    assert pipeline.match_tokens(TOKENS) == 4
    assert pipeline.match_tokens(TOKENS[:40]) == 2


def test_chain_continues_across_events_through_the_parent_hash() -> None:
    pipeline = tokens_pipeline()
    h = engine_hashes(4)
    pipeline.send(stored(h[:2], TOKENS[:32]))
    pipeline.send(stored(h[2:], TOKENS[32:], parent=h[1]))
    assert pipeline.match_tokens(TOKENS) == 4
    assert pipeline.match_tokens([*TOKENS[:16], 7, *TOKENS[17:]]) == 1


def test_unknown_parent_is_skipped_and_does_not_poison_later_chains() -> None:
    pipeline = tokens_pipeline()
    h = engine_hashes(4)
    # The event storing blocks 0-1 was lost: 2-3 cannot be keyed, nor anything after them.
    assert pipeline.send(stored(h[2:3], TOKENS[32:48], parent=h[1])).skipped == {
        "unknown_parent": 1
    }
    assert pipeline.send(stored(h[3:], TOKENS[48:], parent=h[2])).skipped == {"unknown_parent": 1}
    assert pipeline.match_tokens(TOKENS) == 0
    # The prompt stored again from its root repairs the chain.
    pipeline.send(stored(h, TOKENS))
    assert pipeline.match_tokens(TOKENS) == 4


def test_removed_and_offloaded_blocks_resolve_through_engine_hashes() -> None:
    pipeline = tokens_pipeline()
    h = engine_hashes(4)
    pipeline.send(stored(h, TOKENS))
    pipeline.send(stored(h[:2], (), block_size=0, medium="CPU"))
    pipeline.send(removed(h[1:], medium="GPU"))
    found = pipeline.match(pipeline.translator.query_keys(TOKENS))
    assert found is not None
    assert found.match_length == 2
    assert found.prefix_tiers == {0b011: 1, 0b010: 1}


def test_offload_of_unseen_hashes_is_counted_unmapped() -> None:
    pipeline = tokens_pipeline()
    pipeline.send(stored(engine_hashes(1), TOKENS[:16]))
    translation = pipeline.send(stored(engine_hashes(2), (), block_size=0, medium="CPU"))
    assert translation.skipped == {"unmapped": 1}
    assert pipeline.translator.block_size == 16  # offload events never set the block size


def test_lora_and_cache_salt_separate_keys() -> None:
    pipeline = tokens_pipeline()
    pipeline.send(stored(engine_hashes(4), TOKENS, lora_name="sql", extra_keys=[("sql",)] * 4))
    pipeline.send(
        stored(
            engine_hashes(4, start=10),
            TOKENS,
            extra_keys=[("tenant-a",), None, None, None],
        )
    )
    assert pipeline.match_tokens(TOKENS, lora_name="sql") == 4
    assert pipeline.match_tokens(TOKENS, cache_salt="tenant-a") == 4
    assert pipeline.match_tokens(TOKENS) == 0
    assert pipeline.match_tokens(TOKENS, cache_salt="tenant-b") == 0


def test_multimodal_blocks_are_keyed_by_engine_hash() -> None:
    pipeline = tokens_pipeline()
    h = engine_hashes(4)
    pipeline.send(stored(h, TOKENS, extra_keys=[None, ("img-hash", 0), None, None]))
    # Blocks up to the image match a text query; the image block cannot.
    assert pipeline.match_tokens(TOKENS) == 1
    assert pipeline.translator.keys_of_engine_hashes(h)[1] == h[1]


def test_engine_hash_chain_resolves_in_tokens_mode_up_to_first_unknown() -> None:
    pipeline = tokens_pipeline()
    h = engine_hashes(4)
    pipeline.send(stored(h, TOKENS))
    keys = pipeline.translator.keys_of_engine_hashes([*h[:3], 12345, h[3]])
    assert keys == pipeline.translator.query_keys(TOKENS[:48])


def test_engine_hash_map_is_bounded() -> None:
    pipeline = tokens_pipeline(max_engine_hashes=100)
    for i in range(50):
        pipeline.send(stored(engine_hashes(4, start=4 * i + 1), [i] * 64))
        assert pipeline.translator.engine_hashes_known <= 100
    # The most recent chain still resolves; the first ones are long forgotten.
    last = engine_hashes(4, start=4 * 49 + 1)
    assert len(pipeline.translator.keys_of_engine_hashes(last)) == 4
    assert pipeline.translator.keys_of_engine_hashes(engine_hashes(1)) == []


def known(pipeline: Pipeline, hashes: Sequence[int]) -> list[bool]:
    """Per engine hash: whether it still resolves to a key."""
    return [bool(pipeline.translator.keys_of_engine_hashes([h])) for h in hashes]


def test_the_oldest_generation_of_engine_hashes_is_forgotten_whole() -> None:
    # A bound of 8: two generations of 4. Filling the young one makes it the old one and
    # drops the previous old one, all of it at once.
    pipeline = tokens_pipeline(max_engine_hashes=8)
    first, second, third = engine_hashes(4), engine_hashes(2, 10), engine_hashes(2, 20)
    pipeline.send(stored(first, TOKENS))
    pipeline.send(stored(second, TOKENS[:32], lora_name="a"))
    assert known(pipeline, first + second) == [True] * 6
    pipeline.send(stored(third, TOKENS[:32], lora_name="b"))
    assert known(pipeline, first) == [False] * 4
    assert known(pipeline, second + third) == [True] * 4
    assert pipeline.translator.engine_hashes_known <= 8
    # What was forgotten can no longer be removed through its engine hash.
    assert pipeline.send(removed(first)).skipped == {"unmapped": 1}
    assert pipeline.match_tokens(TOKENS) == 4


def test_a_parent_in_use_survives_a_generation_flip() -> None:
    pipeline = tokens_pipeline(max_engine_hashes=8)
    prefix = engine_hashes(4)  # a shared system prompt: fills the young generation
    pipeline.send(stored(prefix, TOKENS))
    # A request continuing from the prefix touches its last block (it moves to the young
    # generation); then another prompt fills the young generation, and the old one, with
    # the rest of the prefix, is dropped.
    pipeline.send(stored(engine_hashes(1, 10), list(range(16)), parent=prefix[-1]))
    pipeline.send(stored(engine_hashes(4, 20), list(range(100, 164))))
    assert known(pipeline, prefix) == [False, False, False, True]
    # So the prefix still keys its continuations (no unknown_parent).
    continuation = stored(engine_hashes(1, 30), list(range(200, 216)), parent=prefix[-1])
    continued = pipeline.send(continuation)
    assert continued.skipped == {}
    assert pipeline.match_tokens([*TOKENS, *range(200, 216)]) == 5


def test_vllm_mode_uses_engine_hashes_and_confirms_them() -> None:
    keyer = VllmKeys("sha256", "0")
    pipeline = Pipeline(EventTranslator(keyer))
    hashes = keyer.block_keys(list(range(1000, 1040)), 16)
    assert hashes == [16823396573910764246, 9852303496387231819]
    translation = pipeline.send(stored(hashes, list(range(1000, 1032))), version="0.23")
    assert translation.hash_checks == {HashCheck.MATCH: 1}
    found = pipeline.match(hashes)
    assert found is not None and found.match_length == 2
    assert pipeline.match_tokens(list(range(1000, 1040))) == 2


def test_vllm_mode_reports_a_seed_mismatch() -> None:
    keyer = VllmKeys("sha256", None)  # engine ran with PYTHONHASHSEED=0, we assume none
    pipeline = Pipeline(EventTranslator(keyer))
    engine = [16823396573910764246, 9852303496387231819]
    translation = pipeline.send(stored(engine, list(range(1000, 1032))))
    assert translation.hash_checks == {HashCheck.MISMATCH: 1}
    # The blocks are still indexed by the engine's hashes.
    found = pipeline.match(engine)
    assert found is not None and found.match_length == 2


def test_vllm_mode_confirms_the_real_capture_across_events() -> None:
    capture = json.loads((VECTORS / "vllm_capture_sha256_cbor_seed42.json").read_text())
    tokens, hashes = capture["token_ids"], capture["block_hashes"]
    pipeline = Pipeline(EventTranslator(VllmKeys("sha256_cbor", "42")))
    first = pipeline.send(stored(hashes[:10], tokens[:160]), version="0.23")
    rest = pipeline.send(stored(hashes[10:], tokens[160:400], parent=hashes[9]))
    assert first.hash_checks == rest.hash_checks == {HashCheck.MATCH: 1}
    assert pipeline.match_tokens(tokens) == 25
