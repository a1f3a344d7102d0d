"""``kv-cache serve`` flags (parsed only, nothing is run) and the logging it sets up."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from service.cli import SERVE_FLAGS, build_settings, main
from service.config import ENV_KEYS, ConfigError, Settings
from service.logging import configure_logging


def test_no_flags_means_defaults() -> None:
    assert build_settings(["serve"], {}) == Settings()


@pytest.mark.parametrize(
    ("flag", "value", "path", "expected"),
    [
        ("--api-host", "127.0.0.1", ("api", "host"), "127.0.0.1"),
        ("--api-port", "18080", ("api", "port"), 18080),
        ("--grpc-host", "::", ("grpc", "host"), "::"),
        ("--grpc-port", "0", ("grpc", "port"), 0),
        ("--zmq-endpoint", "", ("zmq", "endpoint"), ""),
        ("--index-ttl", "1h30m", ("index", "ttl"), 5400.0),
        ("--index-max-size", "5000", ("index", "max_size"), 5000),
        ("--redis-url", "redis://valkey:6379/1", ("redis", "url"), "redis://valkey:6379/1"),
        ("--log-level", "debug", ("logging", "level"), "debug"),
        ("--log-format", "console", ("logging", "format"), "console"),
    ],
)
def test_each_flag_sets_its_key(
    flag: str, value: str, path: tuple[str, str], expected: object
) -> None:
    settings = build_settings(["serve", flag, value], {})
    section, key = path
    assert getattr(getattr(settings, section), key) == expected
    assert SERVE_FLAGS[flag][0] == f"{section}.{key}"


def test_every_flag_names_a_key_with_an_env_name() -> None:
    assert {key for key, _ in SERVE_FLAGS.values()} <= set(ENV_KEYS.values())


def test_flags_override_env_and_file(tmp_path: Path) -> None:
    path = tmp_path / "kv-cache.yaml"
    path.write_text("api: {port: 1000}\ngrpc: {port: 1001}\nindex: {backend: redis}\n")
    env = {"KV_CACHE_API_PORT": "2000", "KV_CACHE_REDIS_URL": "redis://r:6379/0"}
    settings = build_settings(
        ["serve", "--config", str(path), "--api-port", "3000", "--index-backend", "redis"], env
    )
    assert (settings.api.port, settings.grpc.port) == (3000, 1001)
    assert settings.index.backend == "redis"
    assert settings.redis.url == "redis://r:6379/0"


def test_bad_flag_is_a_config_error_naming_key_and_flag() -> None:
    with pytest.raises(ConfigError, match=r"^index\.ttl: invalid duration 'soon'.*\(from flag\)$"):
        build_settings(["serve", "--index-ttl", "soon"], {})


def test_unknown_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        build_settings(["serve", "--api-prot", "1"], {})
    assert caught.value.code == 2
    assert "--api-prot" in capsys.readouterr().err


def test_serve_with_a_bad_configuration_exits_2_naming_the_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["serve", "--api-port", "http"], environ={"KV_CACHE_INDEX_TTL": "1x"})
    assert caught.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert sorted(lines) == [
        "kv-cache serve: api.port: input should be a valid integer, unable to parse string as"
        " an integer, got 'http' (from flag)",
        "kv-cache serve: index.ttl: invalid duration '1x'; use seconds or a string like 250ms,"
        " 90s, 5m, 1h30m (from KV_CACHE_INDEX_TTL)",
    ]

    with pytest.raises(SystemExit) as caught:
        main(["serve", "--config", str(tmp_path / "absent.yaml")], environ={})
    assert caught.value.code == 2
    assert str(tmp_path / "absent.yaml") in capsys.readouterr().err


# --- logging, as `serve` sets it up ----------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)
    structlog.reset_defaults()


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.usefixtures("restore_logging")
def test_json_logs_from_structlog_and_stdlib(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")
    structlog.stdlib.get_logger("kv_cache.test").bind(pod="p1").info("stored", blocks=3)
    structlog.stdlib.get_logger("kv_cache.test").debug("too detailed")
    logging.getLogger("uvicorn.error").warning("Started server on %s", "0.0.0.0:8080")

    first, second = json_lines(capsys.readouterr().err)
    assert {k: first[k] for k in ("event", "level", "logger", "pod", "blocks")} == {
        "event": "stored",
        "level": "info",
        "logger": "kv_cache.test",
        "pod": "p1",
        "blocks": 3,
    }
    assert str(first["timestamp"]).endswith("Z")
    assert {k: second[k] for k in ("event", "level", "logger")} == {
        "event": "Started server on 0.0.0.0:8080",
        "level": "warning",
        "logger": "uvicorn.error",
    }


@pytest.mark.usefixtures("restore_logging")
def test_configuring_again_replaces_the_setup(capsys: pytest.CaptureFixture[str]) -> None:
    log = structlog.stdlib.get_logger("kv_cache.test")
    configure_logging("info", "json")
    configure_logging("debug", "json")
    log.debug("shown once")
    (line,) = json_lines(capsys.readouterr().err)
    assert line["event"] == "shown once"

    configure_logging("warning", "console")
    log.info("hidden")
    log.warning("careful", pod="p1")
    (text,) = capsys.readouterr().err.splitlines()
    assert "careful" in text
    assert "pod=p1" in text
    assert not text.startswith("{")


def test_bad_logging_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="log level"):
        configure_logging("verbose", "json")
    with pytest.raises(ValueError, match="log format"):
        configure_logging("info", "xml")
