"""Block keys: one unsigned 64-bit key per full block of a prompt, in two schemes.

- ``TokenKeys`` (key mode ``tokens``, the default): the service's own chained key,
  xxh3-64 over each block's token ids packed as little-endian uint32, seeded with the
  previous block's key. The chain root depends on the LoRA name; ``cache_salt`` enters the
  first block of a prompt. Immune to vLLM's seed, algorithm and version.
- ``VllmKeys`` (key mode ``vllm``): vLLM's own published block hash, so engine hashes can
  be used as keys directly and checked against ours.

Both key only FULL blocks: a trailing partial block is ignored. Both chain: the keys of
``token_ids[k * block_size:]`` with ``parent`` = the key of block ``k - 1`` equal the
keys of the whole prompt from block ``k`` on.
"""

from __future__ import annotations

import enum
import hashlib
import pickle
import struct
import sys
from array import array
from collections.abc import Callable, Sequence
from typing import Final, Literal, Protocol, get_args

import cbor2
import xxhash

__all__ = [
    "DEFAULT_MAX_PARENTS",
    "TOKEN_TYPECODE",
    "VLLM_DEFAULT_SEED",
    "BlockKeyer",
    "HashAlgorithm",
    "HashCheck",
    "KeyMode",
    "TokenKeys",
    "UnknownParent",
    "VllmKeys",
    "make_keyer",
]

KeyMode = Literal["tokens", "vllm"]
HashAlgorithm = Literal["sha256", "sha256_cbor"]

VLLM_DEFAULT_SEED: Final = "vllm-none-hash"
"""vLLM's chain seed when ``PYTHONHASHSEED`` is unset (vLLM >= 0.29)."""

DEFAULT_MAX_PARENTS: Final = 1_000_000
"""Default bound on the digests a ``VllmKeys`` remembers (~143 bytes each when full)."""

_U64: Final = 1 << 64
_U32: Final = 1 << 32


class UnknownParent(LookupError):
    """``VllmKeys`` cannot continue a chain: it never computed (or forgot) the parent's digest.

    vLLM chains on the full 32-byte digest but publishes only its low 64 bits, so a chain
    can be continued only from a digest this object computed and still remembers.
    """

    def __init__(self, parent: int) -> None:
        super().__init__(f"digest of parent block hash {parent} is unknown")
        self.parent = parent


class HashCheck(enum.Enum):
    """Outcome of ``VllmKeys.check_published``."""

    MATCH = "match"
    MISMATCH = "mismatch"
    UNKNOWN_PARENT = "unknown_parent"
    """Cannot check: the parent's digest is unknown. Not evidence of a mismatch."""


class BlockKeyer(Protocol):
    """Computes the chained key of every full block of a prompt."""

    @property
    def key_mode(self) -> KeyMode:
        """The configuration name of this scheme."""
        ...

    def block_keys(
        self,
        token_ids: Sequence[int],
        block_size: int,
        *,
        parent: int | None = None,
        lora_name: str | None = None,
        cache_salt: str | None = None,
    ) -> list[int]:
        """One unsigned 64-bit key per full block of ``token_ids``.

        ``parent`` is the key of the block just before ``token_ids[0]`` (None: the tokens
        start a prompt). ``cache_salt`` applies to a prompt's first block only, so it is
        ignored when ``parent`` is given. Raises ``ValueError`` for a token id outside
        ``[0, 2**32)`` or a block size below 1.
        """
        ...


# A uint32 typecode: "I" on every mainstream platform, "L" where int is 16-bit.
TOKEN_TYPECODE: Final = next(code for code in "IL" if array(code).itemsize == 4)


def _require_block_size(block_size: int) -> None:
    if type(block_size) is not int or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")


def _pack_tokens(token_ids: Sequence[int], block_size: int) -> array[int]:
    """Token ids as a uint32 array, validated in C; ValueError names the first bad one."""
    _require_block_size(block_size)
    if isinstance(token_ids, array) and token_ids.typecode == TOKEN_TYPECODE:
        return token_ids  # already uint32 (e.g. gRPC token_ids_packed): no copy, no check
    try:
        return array(TOKEN_TYPECODE, token_ids)
    except (TypeError, OverflowError) as exc:
        for position, token in enumerate(token_ids):
            if not isinstance(token, int) or not 0 <= token < _U32:
                raise ValueError(
                    f"token id {token!r} at position {position} is not an int in [0, 2**32)"
                ) from None
        raise ValueError(f"token ids are not a sequence of ints: {exc}") from exc


class TokenKeys:
    """Key mode ``tokens``: xxh3-64 of each block's tokens, seeded with the previous key.

    Stateless and thread-safe. Keys are identical across processes and machines (no
    Python hash randomisation; tokens are hashed little-endian whatever the host).
    ``lora_name`` selects the chain root, so it only matters when ``parent`` is None: a
    parent key already carries its chain's LoRA. Keys are 64-bit and xxh3 is not
    collision-resistant against a deliberate attacker; a collision can only misroute a
    request, as vLLM verifies its own cache with sha256.
    """

    __slots__ = ()

    key_mode: Final[KeyMode] = "tokens"

    def block_keys(
        self,
        token_ids: Sequence[int],
        block_size: int,
        *,
        parent: int | None = None,
        lora_name: str | None = None,
        cache_salt: str | None = None,
    ) -> list[int]:
        """One key per full block; see ``BlockKeyer.block_keys``."""
        packed = _pack_tokens(token_ids, block_size)
        if sys.byteorder != "little":
            packed = array(TOKEN_TYPECODE, packed)  # never swap the caller's array
            packed.byteswap()
        data = packed.tobytes()
        if parent is None:
            key = _tokens_root(lora_name)
            if cache_salt:
                # The salt becomes the first block's seed, hence part of every later key.
                key = xxhash.xxh3_64_intdigest(
                    b"salt\x00" + cache_salt.encode("utf-8", "surrogatepass"), key
                )
        elif type(parent) is int and 0 <= parent < _U64:
            key = parent
        else:
            raise ValueError(f"parent must be an unsigned 64-bit int, got {parent!r}")
        return _chain_keys(data, block_size * 4, key)


def _chain_keys(data: bytes, step: int, seed: int) -> list[int]:
    """Chained xxh3-64 over consecutive ``step``-byte pieces of ``data``, each seeded with
    the digest before it (the first with ``seed``); a trailing partial piece is ignored."""
    # Bytes slices beat memoryview slices and struct packing on CPython 3.11
    # (docs/performance.md, "Block keys").
    end = len(data) - len(data) % step
    digest = xxhash.xxh3_64_intdigest
    keys: list[int] = []
    key = seed
    for offset in range(0, end, step):
        key = digest(data[offset : offset + step], key)
        keys.append(key)
    return keys


_TOKENS_DOMAIN: Final = b"kv-cache/tokens/v1\x00"
_NO_LORA_ROOT: Final = xxhash.xxh3_64_intdigest(_TOKENS_DOMAIN + b"base")


def _tokens_root(lora_name: str | None) -> int:
    """The chain seed of a prompt: distinct for no LoRA and for every LoRA name."""
    if lora_name is None:
        return _NO_LORA_ROOT
    return xxhash.xxh3_64_intdigest(
        _TOKENS_DOMAIN + b"lora\x00" + lora_name.encode("utf-8", "surrogatepass")
    )


def _sha256_pickle(obj: object) -> bytes:
    # vLLM's "sha256": pickle.HIGHEST_PROTOCOL, which is 5 on every Python vLLM supports.
    return hashlib.sha256(pickle.dumps(obj, protocol=5)).digest()


def _sha256_cbor(obj: object) -> bytes:
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


# The published hash: the digest's last 8 bytes, big-endian.
_LOW_64_BITS: Final = struct.Struct(">24xQ")

_HASH_FUNCTIONS: Final[dict[str, Callable[[object], bytes]]] = {
    "sha256": _sha256_pickle,
    "sha256_cbor": _sha256_cbor,
}


class _DigestMemory:
    """Published hash -> 32-byte digest, at most ``capacity`` entries, O(1) per operation.

    Two generations of plain dicts: when the young one holds half the capacity it becomes
    the old one and the previous old one is dropped. A hit in the old generation is copied
    to the young one, so digests in use (shared system prompts) survive. ~143 bytes per
    entry on CPython 3.11, a third less than an OrderedDict LRU.
    """

    __slots__ = ("_generation", "_old", "_young")

    def __init__(self, capacity: int) -> None:
        if type(capacity) is not int or capacity < 2:
            raise ValueError(f"max_parents must be an int >= 2, got {capacity!r}")
        self._generation = capacity // 2
        self._young: dict[int, bytes] = {}
        self._old: dict[int, bytes] = {}

    def __len__(self) -> int:
        return len(self._young) + len(self._old)

    def get(self, published: int) -> bytes | None:
        digest = self._young.get(published)
        if digest is None:
            digest = self._old.get(published)
            if digest is not None:
                self.put(published, digest)
        return digest

    def put(self, published: int, digest: bytes) -> None:
        young = self._young
        young[published] = digest
        if len(young) >= self._generation:
            self._old = young
            self._young = {}


class VllmKeys:
    """Key mode ``vllm``: reproduces the block hash a vLLM engine publishes.

    ``digest = H((parent_digest, tuple(block_tokens), extra_keys))`` chained from
    ``H(seed)``; the published key is the digest's low 64 bits, big-endian. ``H`` is
    sha256 over pickle protocol 5 (``"sha256"``, vLLM's default) or over canonical CBOR
    (``"sha256_cbor"``). ``seed`` is the engine's ``PYTHONHASHSEED`` (None: vLLM >= 0.29's
    default; engines 0.10.2-0.28 without the variable use a random seed and cannot be
    reproduced). LoRA: vLLM < 0.31 hashes the adapter name, which is what this reproduces.

    To continue a chain from a published ``parent`` this object needs the parent's full
    digest: it remembers the digests of chains ``check_published`` confirmed and of
    ``block_keys(..., remember=True)`` calls, at most ``max_parents`` of them, and raises
    ``UnknownParent`` otherwise. Not thread-safe: use one instance from one thread (the
    event loop) or guard it with a lock.
    """

    __slots__ = ("_hash", "_memory", "_root", "algorithm", "seed")

    key_mode: Final[KeyMode] = "vllm"

    def __init__(
        self,
        algorithm: HashAlgorithm = "sha256",
        seed: str | None = None,
        *,
        max_parents: int = DEFAULT_MAX_PARENTS,
    ) -> None:
        if algorithm not in _HASH_FUNCTIONS:
            raise ValueError(
                f"hash_algorithm must be one of {sorted(_HASH_FUNCTIONS)}, got {algorithm!r}"
            )
        if seed is not None and not isinstance(seed, str):
            raise ValueError(f"seed must be a string (as PYTHONHASHSEED is), got {seed!r}")
        self.algorithm: Final[HashAlgorithm] = algorithm
        self.seed: Final[str] = VLLM_DEFAULT_SEED if seed is None else seed
        self._hash = _HASH_FUNCTIONS[algorithm]
        self._root = self._hash(self.seed)
        self._memory = _DigestMemory(max_parents)

    def __repr__(self) -> str:
        return f"VllmKeys(algorithm={self.algorithm!r}, seed={self.seed!r})"

    @property
    def remembered(self) -> int:
        """How many digests are remembered for continuing chains."""
        return len(self._memory)

    def block_keys(
        self,
        token_ids: Sequence[int],
        block_size: int,
        *,
        parent: int | None = None,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        remember: bool = False,
    ) -> list[int]:
        """vLLM's published hash of every full block; see ``BlockKeyer.block_keys``.

        ``remember=True`` keeps the digests so a later call can continue from these keys.
        Off by default so queries, each a new prompt, do not flush the digests that event
        chains need. Raises ``UnknownParent`` if ``parent``'s digest is not remembered.
        """
        keys, digests = self._chain(token_ids, block_size, parent, lora_name, cache_salt)
        if remember:
            put = self._memory.put
            for key, digest in zip(keys, digests, strict=True):
                put(key, digest)
        return keys

    def check_published(
        self,
        token_ids: Sequence[int],
        block_size: int,
        published: Sequence[int],
        *,
        parent: int | None = None,
        lora_name: str | None = None,
        cache_salt: str | None = None,
    ) -> HashCheck:
        """Whether our hashes of ``token_ids`` equal the ``published`` ones of an engine.

        Meant for every ``BlockStored`` that carries tokens. Returns ``UNKNOWN_PARENT``
        without hashing when the parent's digest is not remembered. On ``MATCH`` the
        digests are remembered, so the engine's next event in this chain can be checked.
        Raises ``ValueError`` if the tokens do not make exactly ``len(published)`` full
        blocks, or for bad token ids (a malformed event, not a hash mismatch).
        """
        _require_block_size(block_size)
        if len(token_ids) != len(published) * block_size:
            raise ValueError(
                f"{len(token_ids)} token ids do not make {len(published)} blocks "
                f"of {block_size} tokens"
            )
        try:
            keys, digests = self._chain(token_ids, block_size, parent, lora_name, cache_salt)
        except UnknownParent:
            return HashCheck.UNKNOWN_PARENT
        if keys != list(published):
            return HashCheck.MISMATCH
        put = self._memory.put
        for key, digest in zip(keys, digests, strict=True):
            put(key, digest)
        return HashCheck.MATCH

    def _chain(
        self,
        token_ids: Sequence[int],
        block_size: int,
        parent: int | None,
        lora_name: str | None,
        cache_salt: str | None,
    ) -> tuple[list[int], list[bytes]]:
        packed = _pack_tokens(token_ids, block_size)
        if parent is None:
            digest = self._root
        else:
            remembered = self._memory.get(parent)
            if remembered is None:
                raise UnknownParent(parent)
            digest = remembered
        # Hash Python ints, as the engine does: plain lists/tuples as given (validated
        # above), anything else (array, numpy) through the array.
        values = token_ids if isinstance(token_ids, list | tuple) else packed.tolist()

        # extra_keys as vLLM builds them (vllm-project/vllm, vllm/v1/core/kv_cache_utils.py,
        # generate_block_hash_extra_keys): lora_extra_keys + mm_extra_keys + cache_salt_keys
        # + prompt_embeds_keys, as a tuple, or None when empty. The LoRA name goes into
        # every block; the salt only when start_token_idx == 0 and the salt is truthy.
        # Multimodal and prompt-embeds keys are out of scope.
        lora_keys: tuple[str, ...] = () if lora_name is None else (lora_name,)
        extra: tuple[str, ...] | None = lora_keys or None
        first_extra = extra
        if parent is None and cache_salt:
            first_extra = (*lora_keys, cache_salt)

        hash_fn = self._hash
        digests: list[bytes] = []
        append = digests.append
        end = len(values) - len(values) % block_size
        for start in range(0, end, block_size):
            block_extra = first_extra if start == 0 else extra
            digest = hash_fn((digest, tuple(values[start : start + block_size]), block_extra))
            append(digest)
        # One unpack over all digests: measured 2.5x faster than int.from_bytes per block.
        keys = [key for (key,) in _LOW_64_BITS.iter_unpack(b"".join(digests))]
        return keys, digests


def make_keyer(
    key_mode: str,
    hash_algorithm: str = "sha256",
    hash_seed: str | int | None = None,
    *,
    max_parents: int = DEFAULT_MAX_PARENTS,
) -> BlockKeyer:
    """The keyer for a model's settings (``models[].key_mode``, ``hash_algorithm``, ...).

    ``hash_seed`` is a string as ``PYTHONHASHSEED`` is: ``42`` and ``"42"`` both mean
    ``"42"``. The algorithm is validated in both modes so a typo in the configuration is
    reported even while it is unused. Raises ``ValueError`` naming the bad value.
    """
    if hash_algorithm not in get_args(HashAlgorithm):
        raise ValueError(
            f"hash_algorithm must be one of {list(get_args(HashAlgorithm))}, got {hash_algorithm!r}"
        )
    if hash_seed is not None and (
        isinstance(hash_seed, bool) or not isinstance(hash_seed, str | int)
    ):
        raise ValueError(f"hash_seed must be a string or an int, got {hash_seed!r}")
    if key_mode == "tokens":
        return TokenKeys()
    if key_mode == "vllm":
        seed = None if hash_seed is None else str(hash_seed)
        algorithm: HashAlgorithm = "sha256" if hash_algorithm == "sha256" else "sha256_cbor"
        return VllmKeys(algorithm, seed, max_parents=max_parents)
    raise ValueError(f"key_mode must be one of {list(get_args(KeyMode))}, got {key_mode!r}")
