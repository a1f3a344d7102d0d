"""The ``kv-cache`` command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kv-cache", description="KV-cache-aware routing service for vLLM."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the service")
    serve.add_argument("--config", help="YAML configuration file")
    args = parser.parse_args(argv)
    if args.command == "serve":
        parser.exit(
            2,
            "kv-cache serve: the daemon (ZeroMQ ingestion, gRPC and REST APIs) is not built"
            " yet; the index core is importable as service.index (see README.md).\n",
        )
    return 0
