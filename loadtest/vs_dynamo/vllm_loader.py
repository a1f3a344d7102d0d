"""vLLM 0.33's own event publisher and block hashing, loaded from the released wheel without
torch.

The wheel is installed with ``--no-deps`` into its own venv (``install.vllm_env``). Importing
``vllm.distributed.kv_events`` the normal way would run ``vllm/__init__.py``,
``vllm/distributed/__init__.py`` and ``vllm/config/__init__.py``, which import torch; the
publisher itself needs none of it. So this module registers empty package objects for those
packages (their submodules still load from the wheel's files) and two stand-ins:

- ``vllm.config.utils``: only its ``config`` decorator is used by ``vllm/config/kv_events.py``;
  the real one wraps pydantic dataclasses and imports torch. A plain dataclass stands in.
- ``vllm.v1.core.kv_cache_utils``: it imports the whole engine (torch). From its source file
  we execute only the statements the publisher and the block hash need (``ExternalBlockHash``,
  ``NONE_HASH`` and its seed, ``init_none_hash``, ``hash_block_tokens``,
  ``maybe_convert_block_hash``), so the hash is vLLM's code, not a copy.

Everything else is vLLM's: ``kv_events`` (``ZmqEventPublisher``, ``BlockStored``, ...),
``vllm.logger``, ``vllm.envs``, ``vllm.utils.network_utils`` and ``vllm.utils.hashing``. Their
third-party imports are msgspec, pyzmq, psutil, urllib3 and cbor2: the vLLM venv holds those.

Run ``python -m loadtest.vs_dynamo.vllm_loader SITE_PACKAGES`` to check the load (standard
library only, so the vLLM venv's own interpreter can run it): it prints the version and
checks the hashes against CONTRACT.md's vectors.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import os
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NewType, TypeAlias

from loadtest.vs_dynamo.workload import CONTRACT_VECTORS, BlockHasher, Digest, chain_hashes

__all__ = ["Vllm", "load"]

# Packages whose __init__ imports torch; their submodules load from the files as usual.
_HOLLOW_PACKAGES = (
    "vllm",
    "vllm.config",
    "vllm.distributed",
    "vllm.utils",
    "vllm.v1",
    "vllm.v1.core",
)
# What kv_events and the hash need from vllm/v1/core/kv_cache_utils.py.
_KV_CACHE_UTILS_NAMES = frozenset(
    {
        "BlockHash",
        "ExternalBlockHash",
        "maybe_convert_block_hash",
        "logger",
        "NONE_HASH",
        "DEFAULT_NONE_HASH_SEED",
        "_NON_CRYPTO_HASH_FUNCTIONS",
        "_NONE_HASH_SEED",
        "resolve_none_hash_seed",
        "get_none_hash_seed",
        "init_none_hash",
        "hash_block_tokens",
    }
)


@dataclass(frozen=True)
class Vllm:
    """The loaded pieces: ``kv_events`` is vLLM's module; ``hasher`` and ``external`` are its
    ``hash_block_tokens(sha256, ...)`` and ``maybe_convert_block_hash``."""

    version: str
    kv_events: Any
    hasher: BlockHasher
    external: Callable[[Digest], int]


def _defined_names(node: ast.stmt) -> set[str]:
    if isinstance(node, ast.FunctionDef | ast.ClassDef):
        return {node.name}
    if isinstance(node, ast.Assign):
        return {t.id for t in node.targets if isinstance(t, ast.Name)}
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return {node.target.id}
    return set()


def _kv_cache_utils(path: Path) -> types.ModuleType:
    """The parts of ``kv_cache_utils`` listed above, executed from the wheel's source."""
    tree = ast.parse(path.read_text(), str(path))
    body = [node for node in tree.body if _defined_names(node) & _KV_CACHE_UTILS_NAMES]
    found = set().union(*(_defined_names(node) for node in body))
    if missing := _KV_CACHE_UTILS_NAMES - found:
        raise RuntimeError(f"{path} no longer defines {sorted(missing)}")
    envs = importlib.import_module("vllm.envs")
    hashing = importlib.import_module("vllm.utils.hashing")
    logger = importlib.import_module("vllm.logger")
    module = types.ModuleType("vllm.v1.core.kv_cache_utils")
    module.__file__ = str(path)
    # The names those statements use, as the real module imports them.
    module.__dict__.update(
        Any=Any,
        Callable=Callable,
        NewType=NewType,
        Sequence=Sequence,
        TypeAlias=TypeAlias,
        envs=envs,
        init_logger=logger.init_logger,
        os=os,
        xxhash=hashing.xxhash,
        xxhash_cbor=hashing.xxhash_cbor,
    )
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), module.__dict__)
    return module


def load(site: Path) -> Vllm:
    """Import vLLM's publisher and hash from the wheel installed in ``site`` (a
    site-packages directory), without torch. Idempotent within a process."""
    root = site / "vllm"
    if not (root / "distributed" / "kv_events.py").is_file():
        raise RuntimeError(f"no vLLM wheel in {site}")
    if str(site) not in sys.path:
        # Last, so this process's own msgspec and pyzmq win; psutil comes from there.
        sys.path.append(str(site))
    for name in _HOLLOW_PACKAGES:
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
            sys.modules[name] = package
    if "vllm.config.utils" not in sys.modules:
        config_utils = types.ModuleType("vllm.config.utils")
        config_utils.__dict__["config"] = dataclasses.dataclass
        sys.modules["vllm.config.utils"] = config_utils
    if "vllm.v1.core.kv_cache_utils" not in sys.modules:
        utils = _kv_cache_utils(root / "v1" / "core" / "kv_cache_utils.py")
        sys.modules["vllm.v1.core.kv_cache_utils"] = utils
    utils = sys.modules["vllm.v1.core.kv_cache_utils"]
    kv_events = importlib.import_module("vllm.distributed.kv_events")
    sha256 = importlib.import_module("vllm.utils.hashing").sha256
    version = importlib.import_module("vllm._version").__version__
    # vLLM's engine does this at start-up with its configured hash (sha256 by default).
    utils.init_none_hash(sha256)

    def hasher(parent: Digest | None, tokens: Sequence[int]) -> Digest:
        digest: Digest = utils.hash_block_tokens(sha256, parent, tokens, None)
        return digest

    def external(digest: Digest) -> int:
        value = utils.maybe_convert_block_hash(digest)
        if not isinstance(value, int):
            raise RuntimeError("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0: hashes are bytes")
        return value

    return Vllm(str(version), kv_events, hasher, external)


def check(site: Path) -> str:
    """Load, and compare vLLM's hashes with CONTRACT.md's vectors; a one-line summary."""
    vllm = load(site)
    for tokens, expected in CONTRACT_VECTORS:
        got = tuple(chain_hashes(tokens, vllm.hasher, vllm.external))
        if got != expected:
            raise RuntimeError(f"vLLM's hash of {tokens[:3]}... is {got}, expected {expected}")
    heavy = sorted(m for m in ("torch", "transformers", "numpy") if m in sys.modules)
    if heavy:
        raise RuntimeError(f"loading vLLM's publisher imported {heavy}")
    return f"vllm {vllm.version}: kv_events and hash_block_tokens loaded, CONTRACT vectors ok"


if __name__ == "__main__":
    # The installer reads this one line (this runs under the vLLM venv's interpreter).
    print(check(Path(sys.argv[1])))
