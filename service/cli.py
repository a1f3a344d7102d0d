"""The ``kv-cache`` command line: ``kv-cache serve [--config FILE] [flags]``.

Each flag overrides one configuration key (flags > ``KV_CACHE_*`` env > file > defaults);
everything else is set in the file or the environment (docs/configuration.md).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from typing import Final

import structlog

from service.config import ENV_KEYS, ConfigError, Settings, load_settings, unknown_env_vars
from service.logging import configure_logging

__all__ = ["SERVE_FLAGS", "build_settings", "main"]

SERVE_FLAGS: Final[Mapping[str, tuple[str, str]]] = {
    # flag: (dotted key, metavar)
    "--api-host": ("api.host", "HOST"),
    "--api-port": ("api.port", "PORT"),
    "--grpc-host": ("grpc.host", "HOST"),
    "--grpc-port": ("grpc.port", "PORT"),
    "--zmq-endpoint": ("zmq.endpoint", "ENDPOINT"),
    "--index-backend": ("index.backend", "memory|redis"),
    "--index-ttl": ("index.ttl", "DURATION"),
    "--index-max-size": ("index.max_size", "N"),
    "--redis-url": ("redis.url", "URL"),
    "--log-level": ("logging.level", "debug|info|warning|error"),
    "--log-format": ("logging.format", "json|console"),
}
"""The ``serve`` flags and the configuration key each overrides."""

_ENV_NAMES: Final = {key: name for name, key in ENV_KEYS.items()}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kv-cache", description="KV-cache-aware routing service for vLLM."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the service",
        description="Run the service. Precedence: flags > KV_CACHE_* environment > file"
        " > defaults; every key is listed in docs/configuration.md.",
    )
    serve.add_argument("--config", metavar="FILE", help="YAML configuration file")
    for flag, (key, metavar) in SERVE_FLAGS.items():
        # Values stay strings: the settings validate them, so errors read the same
        # whichever source a value came from. SUPPRESS keeps unset flags out of the args.
        serve.add_argument(
            flag,
            dest=key,
            metavar=metavar,
            default=argparse.SUPPRESS,
            help=f"sets {key} (env {_ENV_NAMES[key]})",
        )
    return parser


def _settings(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    given = vars(args)
    overrides = {key: given[key] for key, _ in SERVE_FLAGS.values() if key in given}
    return load_settings(args.config, environ, overrides)


def build_settings(argv: Sequence[str], environ: Mapping[str, str]) -> Settings:
    """The settings ``kv-cache <argv>`` would serve with, without running anything.

    Raises ``ConfigError`` for a bad configuration and ``SystemExit`` for bad usage.
    """
    return _settings(_parser().parse_args(argv), environ)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Entry point of ``kv-cache``; returns the exit code (2 for a bad configuration)."""
    parser = _parser()
    args = parser.parse_args(argv)
    env = os.environ if environ is None else environ
    try:
        settings = _settings(args, env)
    except ConfigError as error:
        # Before logging is set up (its settings may be the bad ones): plain lines on
        # stderr, like argparse's own usage errors.
        parser.exit(
            2, "".join(f"kv-cache {args.command}: {line}\n" for line in str(error).split("\n"))
        )
    configure_logging(settings.logging.level, settings.logging.format)
    log = structlog.stdlib.get_logger("kv_cache.cli")
    for name, close in unknown_env_vars(env).items():
        log.warning("unknown environment variable ignored", variable=name, did_you_mean=close)
    log.info("settings loaded", config_file=args.config, settings=settings.redacted())

    from service.app import run  # the daemon's imports are only paid for by `serve`

    return run(settings)
