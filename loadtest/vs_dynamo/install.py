"""The comparison's own venvs, outside the repo (``~/.cache/kv-cache-bench`` by default),
made once and reused:

- ``dynamo-venv``: ``pip install ai-dynamo-runtime==1.6.1`` (its ``python -m dynamo.indexer``).
- ``vllm-venv``: ``pip install --no-deps vllm==0.33.0`` (no torch) plus what vLLM's publisher
  and hash import (``VLLM_DEPS``); checked by loading them with that venv's own interpreter.

Needs the package index, so it runs before the benchmark enters its network namespace.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DYNAMO_VERSION",
    "VLLM_DEPS",
    "VLLM_VERSION",
    "Installed",
    "ensure",
    "locate",
]

log = logging.getLogger(__name__)

DYNAMO_DIST, DYNAMO_VERSION = "ai-dynamo-runtime", "1.6.1"
VLLM_DIST, VLLM_VERSION = "vllm", "0.33.0"
# What vllm/distributed/kv_events.py and vllm/utils/hashing.py import beyond the standard
# library (via vllm.logger, vllm.envs, vllm.utils.network_utils): found by importing them.
VLLM_DEPS = ("msgspec", "pyzmq", "psutil", "urllib3", "cbor2")
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Installed:
    dynamo_python: Path
    dynamo_version: str
    vllm_site: Path
    vllm_version: str


def _site_packages(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python3*/site-packages"))
    if not found:
        raise RuntimeError(f"{venv} has no site-packages")
    return found[0]


def _version(venv: Path, dist: str) -> str | None:
    """The installed version of ``dist`` in ``venv``, from its dist-info directory."""
    if not (venv / "bin" / "python").exists():
        return None
    name = dist.replace("-", "_").lower()
    for info in _site_packages(venv).glob("*.dist-info"):
        stem, _, version = info.name.removesuffix(".dist-info").rpartition("-")
        if stem.replace("-", "_").lower() == name:
            return version
    return None


def _run(argv: list[str], what: str, logfile: Path, timeout: float = 1800.0) -> str:
    with open(logfile, "ab") as out:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    with open(logfile, "a") as out:
        out.write(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed ({logfile}):\n{(result.stdout + result.stderr)[-3000:]}")
    return result.stdout


def _venv(path: Path, logfile: Path) -> Path:
    if not (path / "bin" / "python").exists():
        _run([sys.executable, "-m", "venv", str(path)], f"creating {path}", logfile)
    return path / "bin" / "python"


def ensure(cache: Path) -> Installed:
    """Make (or reuse) both venvs and check them."""
    cache.mkdir(parents=True, exist_ok=True)
    logfile = cache / "install.log"
    dynamo = cache / "dynamo-venv"
    if _version(dynamo, DYNAMO_DIST) != DYNAMO_VERSION:
        log.info("installing %s==%s into %s", DYNAMO_DIST, DYNAMO_VERSION, dynamo)
        python = _venv(dynamo, logfile)
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        _run([*pip, f"{DYNAMO_DIST}=={DYNAMO_VERSION}"], f"pip install {DYNAMO_DIST}", logfile)
    vllm = cache / "vllm-venv"
    if _version(vllm, VLLM_DIST) != VLLM_VERSION:
        log.info("installing %s==%s (--no-deps) into %s", VLLM_DIST, VLLM_VERSION, vllm)
        python = _venv(vllm, logfile)
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        _run([*pip, "--no-deps", f"{VLLM_DIST}=={VLLM_VERSION}"], "pip install vllm", logfile)
        _run([*pip, *VLLM_DEPS], "pip install vLLM's publisher dependencies", logfile)
    installed = locate(cache)
    help_text = _run(
        [str(installed.dynamo_python), "-m", "dynamo.indexer", "--help"], "dynamo --help", logfile
    )
    if "--port" not in help_text:
        raise RuntimeError(f"unexpected dynamo.indexer --help:\n{help_text}")
    check = _run(
        [
            str(vllm / "bin" / "python"),
            "-m",
            "loadtest.vs_dynamo.vllm_loader",
            str(installed.vllm_site),
        ],
        "loading vLLM's publisher in its venv",
        logfile,
    )
    log.info("%s", check.strip())
    return installed


def locate(cache: Path) -> Installed:
    """The venvs ``ensure`` made (``RuntimeError`` if missing)."""
    dynamo, vllm = cache / "dynamo-venv", cache / "vllm-venv"
    dynamo_version, vllm_version = _version(dynamo, DYNAMO_DIST), _version(vllm, VLLM_DIST)
    if dynamo_version is None or vllm_version is None:
        raise RuntimeError(f"venvs missing in {cache}: run without --inner first")
    return Installed(dynamo / "bin" / "python", dynamo_version, _site_packages(vllm), vllm_version)
