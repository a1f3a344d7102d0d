"""The workload: which prompt blocks each engine pod stores, in which events, and the reference
of what every indexer should answer afterwards.

Pure and deterministic (stdlib only: the publisher processes and vLLM's own venv import it).
A prompt's token ids come from a seeded stream, so any process can rebuild any prompt, and a
shorter prompt is a prefix of a longer one with the same identity.
"""

from __future__ import annotations

import hashlib
import pickle
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "BLOCKS_PER_EVENT",
    "BLOCK_SIZE",
    "CHURN_PROMPTS",
    "CONTRACT_VECTORS",
    "MODEL",
    "PODS",
    "PROMPT_BLOCKS",
    "QUERY_BLOCKS",
    "QUERY_STEP",
    "Chunk",
    "Comparison",
    "Digest",
    "Prompt",
    "Reference",
    "Stored",
    "Workload",
    "chain_hashes",
    "churn_prompts",
    "compare",
    "contract_hasher",
    "query_depth",
    "stored_events",
    "to_external",
]

MODEL = "bench-model"
BLOCK_SIZE = 16
BLOCKS_PER_EVENT = 16
PODS = 8
QUERY_BLOCKS = 512
QUERY_STEP = 64  # pod i holds the first QUERY_BLOCKS - QUERY_STEP * i blocks of the query
PROMPT_BLOCKS = 128  # the other prompts: 2048 tokens, 8 events each
CHURN_PROMPTS = 16  # prompts each pod cycles through (store, later evict) while paced
VOCAB = 151_936  # Qwen-sized vocabulary

# CONTRACT.md section 2: vLLM >= 0.29, default sha256, no PYTHONHASHSEED, block size 16.
CONTRACT_VECTORS: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] = (
    (tuple(range(1000, 1040)), (7322446309363477352, 17027874615116373601)),
)

Digest = bytes
BlockHasher = Callable[[Digest | None, Sequence[int]], Digest]
"""(parent digest or None for a first block, the block's token ids) -> the block's digest."""


@dataclass(frozen=True, order=True)
class Prompt:
    """A prompt's identity: ``kind`` is ``query`` (shared by all pods), ``probe`` (one block
    per pod, to see that an indexer is subscribed), ``fill`` or ``churn``."""

    kind: str
    pod: int
    index: int

    def tokens(self, blocks: int, seed: int) -> list[int]:
        """The first ``blocks`` blocks of token ids (a prefix of any longer request)."""
        rng = random.Random(f"{seed}/{self.kind}/{self.pod}/{self.index}")
        return [rng.randrange(VOCAB) for _ in range(blocks * BLOCK_SIZE)]


QUERY = Prompt("query", -1, 0)


def query_depth(pod: int) -> int:
    """Blocks of the query prompt that ``pod`` holds."""
    return QUERY_BLOCKS - QUERY_STEP * pod


@dataclass(frozen=True)
class Chunk:
    """One ``BlockStored`` event: blocks ``first`` .. ``first + count - 1`` of ``prompt``."""

    prompt: Prompt
    first: int
    count: int

    @property
    def end(self) -> int:
        return self.first + self.count


def contract_hasher() -> BlockHasher:
    """vLLM's default block hash as CONTRACT.md section 2 states it: sha256 over
    ``pickle.dumps((parent, tuple(tokens), None), protocol=5)``, chained from
    ``NONE_HASH = sha256(pickle.dumps("vllm-none-hash"))``. The benchmark runs vLLM's own
    code from the wheel; this twin checks the generator where that wheel is absent (tests)."""

    def sha256(value: object) -> Digest:
        return hashlib.sha256(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)).digest()

    none_hash = sha256("vllm-none-hash")

    def hasher(parent: Digest | None, tokens: Sequence[int]) -> Digest:
        return sha256((parent or none_hash, tuple(tokens), None))

    return hasher


def to_external(digest: Digest) -> int:
    """The published form: the low 64 bits (last 8 bytes, big-endian) of the digest."""
    return int.from_bytes(digest, "big") & ((1 << 64) - 1)


def chain_hashes(
    tokens: Sequence[int],
    hasher: BlockHasher,
    external: Callable[[Digest], int] = to_external,
) -> list[int]:
    """Published hashes of every full block of ``tokens``, each chained on its parent."""
    hashes: list[int] = []
    parent: Digest | None = None
    for start in range(0, len(tokens) - BLOCK_SIZE + 1, BLOCK_SIZE):
        parent = hasher(parent, tokens[start : start + BLOCK_SIZE])
        hashes.append(external(parent))
    return hashes


@dataclass(frozen=True)
class Stored:
    """What one ``BlockStored`` event carries."""

    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]


def stored_events(
    chunks: Sequence[Chunk],
    seed: int,
    hasher: BlockHasher,
    external: Callable[[Digest], int] = to_external,
) -> list[Stored]:
    """The events of ``chunks`` in order: each continues its prompt's chain (its parent is
    the previous block's hash, None for a prompt's first block), with its token ids."""
    lengths: dict[Prompt, int] = {}
    for chunk in chunks:
        lengths[chunk.prompt] = max(lengths.get(chunk.prompt, 0), chunk.end)
    tokens = {prompt: prompt.tokens(n, seed) for prompt, n in lengths.items()}
    hashes = {prompt: chain_hashes(tokens[prompt], hasher, external) for prompt in lengths}
    events = []
    for chunk in chunks:
        chain = hashes[chunk.prompt]
        events.append(
            Stored(
                block_hashes=chain[chunk.first : chunk.end],
                parent_block_hash=chain[chunk.first - 1] if chunk.first else None,
                token_ids=tokens[chunk.prompt][chunk.first * BLOCK_SIZE : chunk.end * BLOCK_SIZE],
            )
        )
    return events


def _prompt_chunks(prompt: Prompt, blocks: int) -> Iterator[Chunk]:
    for first in range(0, blocks, BLOCKS_PER_EVENT):
        yield Chunk(prompt, first, min(BLOCKS_PER_EVENT, blocks - first))


def churn_prompts(pod: int) -> list[Prompt]:
    """The prompts ``pod`` cycles through while publishing at a paced rate."""
    return [Prompt("churn", pod, n) for n in range(CHURN_PROMPTS)]


def probe_prompt(pod: int) -> Prompt:
    return Prompt("probe", pod, 0)


@dataclass
class Workload:
    """What each pod publishes in each phase.

    ``phase_blocks`` are the blocks of each phase, all pods together (e.g. 100,000 then
    300,000 to reach 400,000), cut into events of ``BLOCKS_PER_EVENT`` blocks dealt evenly
    over the pods. Phase 0 starts, on pod i, with the first ``query_depth(i)`` blocks of the
    query prompt; the rest are ``PROMPT_BLOCKS``-block prompts, new in every phase (a pod's
    last prompt of a phase may be shorter).
    """

    phase_blocks: tuple[int, ...]
    pods: int = PODS
    phases: list[list[list[Chunk]]] = field(init=False)  # phase -> pod -> events

    def __post_init__(self) -> None:
        self.phases = []
        next_prompt = [0] * self.pods
        for phase, blocks in enumerate(self.phase_blocks):
            events = blocks // BLOCKS_PER_EVENT
            per_pod = [events // self.pods + (pod < events % self.pods) for pod in range(self.pods)]
            plan: list[list[Chunk]] = []
            for pod, budget in enumerate(per_pod):
                chunks: list[Chunk] = []
                if phase == 0:
                    chunks.extend(_prompt_chunks(QUERY, query_depth(pod)))
                while len(chunks) < budget:
                    prompt = Prompt("fill", pod, next_prompt[pod])
                    next_prompt[pod] += 1
                    chunks.extend(_prompt_chunks(prompt, PROMPT_BLOCKS))
                plan.append(chunks[:budget])
            self.phases.append(plan)

    def blocks(self, phase: int) -> int:
        """Blocks published in ``phase``, all pods together."""
        return sum(c.count for chunks in self.phases[phase] for c in chunks)

    def last_prompt(self, phase: int, pod: int) -> tuple[Prompt, int]:
        """The prompt of ``pod``'s last event of ``phase`` and how many blocks of it the
        pod holds once that event is applied."""
        last = self.phases[phase][pod][-1]
        return last.prompt, last.end

    def reference(self, phases: int | None = None, *, probes: bool = True) -> Reference:
        """What every pod holds after the first ``phases`` phases (all by default)."""
        reference = Reference()
        if probes:
            for pod in range(self.pods):
                reference.add(pod, Chunk(probe_prompt(pod), 0, 1))
        for plan in self.phases[: len(self.phases) if phases is None else phases]:
            for pod, chunks in enumerate(plan):
                for chunk in chunks:
                    reference.add(pod, chunk)
        return reference


@dataclass
class Reference:
    """prompt -> pod -> blocks held (always a prefix: events arrive in chain order)."""

    held: dict[Prompt, dict[int, int]] = field(default_factory=dict)

    def add(self, pod: int, chunk: Chunk) -> None:
        pods = self.held.setdefault(chunk.prompt, {})
        pods[pod] = max(pods.get(pod, 0), chunk.end)

    def expected(self, prompt: Prompt) -> dict[int, int]:
        """pod -> match length of ``prompt`` (its longest stored form); absent pods: 0."""
        return dict(self.held.get(prompt, {}))

    def length(self, prompt: Prompt) -> int:
        """Blocks of ``prompt`` to query: the most any pod holds."""
        return max(self.held.get(prompt, {0: 0}).values())

    def blocks(self) -> int:
        """(block, pod) entries held in all."""
        return sum(sum(pods.values()) for pods in self.held.values())

    def sample(self, n: int, seed: int, *, kinds: Iterable[str] = ("fill",)) -> list[Prompt]:
        """``n`` stored prompts of ``kinds`` drawn at random (all of them if n <= 0 or fewer)."""
        wanted = set(kinds)
        prompts = sorted(p for p in self.held if p.kind in wanted)
        if n <= 0 or n >= len(prompts):
            return prompts
        return sorted(random.Random(seed).sample(prompts, n))


@dataclass
class Comparison:
    """Per-pod answers checked against the reference: an answer is one (prompt, pod) pair."""

    answers: int = 0
    mismatches: int = 0
    missing_blocks: int = 0  # blocks the pod holds that the indexer did not report
    extra_blocks: int = 0  # blocks reported that the pod does not hold

    def add(self, other: Comparison) -> None:
        self.answers += other.answers
        self.mismatches += other.mismatches
        self.missing_blocks += other.missing_blocks
        self.extra_blocks += other.extra_blocks


def compare(expected: Mapping[int, int], answered: Mapping[int, int], pods: int) -> Comparison:
    """Each pod's answered match length against the expected one (absent means 0)."""
    result = Comparison()
    for pod in range(pods):
        want, got = expected.get(pod, 0), answered.get(pod, 0)
        result.answers += 1
        if got != want:
            result.mismatches += 1
            result.missing_blocks += max(0, want - got)
            result.extra_blocks += max(0, got - want)
    return result
