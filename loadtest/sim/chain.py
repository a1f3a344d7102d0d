"""A growing context as a vLLM engine sees it: token ids and the hash of every full block.

The hash is vLLM's default block hash (``sha256`` over pickle protocol 5, chained from
``H(seed)``, published as the digest's low 64 bits), the same values
``service.index.keys.VllmKeys`` computes. A chain is hashed once, as it grows, and forked
to share a prefix (a system prompt, a document) between many contexts without hashing it
again.
"""

from __future__ import annotations

import hashlib
import pickle
from array import array
from collections.abc import Iterable

from service.index.keys import VLLM_DEFAULT_SEED

__all__ = ["BlockChain"]


def _sha256_pickle(obj: object) -> bytes:
    return hashlib.sha256(pickle.dumps(obj, protocol=5)).digest()


class BlockChain:
    """Token ids of one context and the vLLM block hash of each of its full blocks.

    ``hashes[i]`` is the published hash of block ``i``, i.e. of tokens
    ``[i * block_size, (i + 1) * block_size)``, chained through every block before it.
    A trailing partial block has no hash until it fills.
    """

    __slots__ = ("_digest", "block_size", "hashes", "tokens")

    def __init__(self, block_size: int = 16, seed: str = VLLM_DEFAULT_SEED) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.tokens: array[int] = array("L" if array("I").itemsize < 4 else "I")
        self.hashes: list[int] = []
        self._digest = _sha256_pickle(seed)

    def __len__(self) -> int:
        return len(self.tokens)

    def fork(self) -> BlockChain:
        """An independent copy that continues from the same point."""
        other = BlockChain(self.block_size)
        other.tokens = array(self.tokens.typecode, self.tokens)
        other.hashes = list(self.hashes)
        other._digest = self._digest
        return other

    def extend(self, tokens: Iterable[int]) -> None:
        """Append tokens and hash every block they complete."""
        try:
            new = array(self.tokens.typecode, tokens)
        except OverflowError as error:
            raise ValueError(f"token ids must be in [0, 2**32): {error}") from None
        size = self.block_size
        start = len(self.hashes) * size
        self.tokens.extend(new)
        end = len(self.tokens) - len(self.tokens) % size
        digest = self._digest
        hashes = self.hashes
        tokens = self.tokens
        for offset in range(start, end, size):
            # vLLM: hash((parent_digest, tuple(block_token_ids), extra_keys)); no LoRA,
            # no multimodal input, no cache salt, so extra_keys is None.
            digest = _sha256_pickle((digest, tuple(tokens[offset : offset + size]), None))
            hashes.append(int.from_bytes(digest[24:], "big"))
        self._digest = digest

    def block_tokens(self, first: int, count: int) -> list[int]:
        """The token ids of blocks ``first .. first + count - 1``."""
        size = self.block_size
        return self.tokens[first * size : (first + count) * size].tolist()
