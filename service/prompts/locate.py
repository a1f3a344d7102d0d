"""Finding a model's tokenizer files, offline: a local file or directory, else the Hugging
Face cache (``$HF_HUB_CACHE``, or ``$HF_HOME/hub``, default ``~/.cache/huggingface/hub``).

Nothing is downloaded: a hub id only resolves if a snapshot of it is in the cache (put
there by ``huggingface-cli download``, a volume, or a vLLM pod sharing the cache).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["TokenizerFiles", "TokenizerNotFound", "hub_cache_dir", "locate_tokenizer"]

TOKENIZER_FILE: Final = "tokenizer.json"
CONFIG_FILE: Final = "tokenizer_config.json"
TEMPLATE_FILE: Final = "chat_template.jinja"

# "org/name" or "name": what the hub accepts, and never a path that climbs out of the cache.
_HUB_ID: Final = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


class TokenizerNotFound(Exception):
    """No tokenizer files where the spec points; ``tried`` lists the places looked at."""

    def __init__(self, spec: str, tried: list[str]) -> None:
        super().__init__(f"no tokenizer.json for {spec!r}; tried {', '.join(tried)}")
        self.spec = spec
        self.tried = tried


@dataclass(frozen=True, slots=True)
class TokenizerFiles:
    """Where one tokenizer's files are: ``tokenizer.json``, and the directory that may hold
    ``tokenizer_config.json`` and ``chat_template.jinja``."""

    tokenizer_json: Path
    directory: Path

    @property
    def config_json(self) -> Path:
        return self.directory / CONFIG_FILE

    @property
    def chat_template(self) -> Path:
        return self.directory / TEMPLATE_FILE


def hub_cache_dir(environ: Mapping[str, str]) -> Path:
    """The Hugging Face hub cache directory, as ``huggingface_hub`` resolves it."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if environ.get(name):
            return Path(environ[name]).expanduser()
    if environ.get("HF_HOME"):
        return Path(environ["HF_HOME"]).expanduser() / "hub"
    xdg = environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path(environ.get("HOME", "~")).expanduser() / ".cache"
    return base / "huggingface" / "hub"


def locate_tokenizer(
    spec: str, *, local: bool = True, environ: Mapping[str, str] | None = None
) -> TokenizerFiles:
    """The files ``spec`` names: a ``tokenizer.json``, a directory holding one, or a hub id
    found in the local Hugging Face cache. ``local=False`` skips paths (for names that come
    from requests, not from the operator). Raises ``TokenizerNotFound``.
    """
    env = os.environ if environ is None else environ
    tried: list[str] = []
    if local:
        path = Path(spec).expanduser()
        if path.is_file():
            return TokenizerFiles(path, path.parent)
        if path.is_dir():
            if (path / TOKENIZER_FILE).is_file():
                return TokenizerFiles(path / TOKENIZER_FILE, path)
            tried.append(str(path / TOKENIZER_FILE))
        else:
            tried.append(str(path))
    if _HUB_ID.fullmatch(spec) and ".." not in spec:
        repo = hub_cache_dir(env) / f"models--{spec.replace('/', '--')}"
        snapshot = _snapshot(repo)
        if snapshot is not None:
            return TokenizerFiles(snapshot / TOKENIZER_FILE, snapshot)
        tried.append(str(repo / "snapshots" / "*" / TOKENIZER_FILE))
    raise TokenizerNotFound(spec, tried)


def _snapshot(repo: Path) -> Path | None:
    """The snapshot ``refs/main`` points at if it has a tokenizer, else the newest that has."""
    snapshots = repo / "snapshots"
    try:
        main = (repo / "refs" / "main").read_text(encoding="utf-8").strip()
    except OSError:
        main = ""
    if main and (snapshots / main / TOKENIZER_FILE).is_file():
        return snapshots / main
    try:
        candidates = [p for p in snapshots.iterdir() if (p / TOKENIZER_FILE).is_file()]
    except OSError:
        return None
    return max(candidates, key=lambda p: p.stat().st_mtime, default=None)
