"""Settings: defaults, file < env < flags, validation errors that name key, value and source."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from service.config import (
    ENV_KEYS,
    ConfigError,
    ModelSettings,
    Settings,
    load_settings,
    parse_byte_size,
    parse_duration,
    unknown_env_vars,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kv-cache.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def config_error(*args: object, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(*args, **kwargs)  # type: ignore[arg-type]
    return str(caught.value)


# --- defaults --------------------------------------------------------------------------


def test_defaults_match_the_contract() -> None:
    settings = load_settings(environ={})
    assert settings.zmq.endpoint == "tcp://*:5555"
    assert settings.zmq.topic_filter == "kv@"
    assert settings.zmq.data_parallel_size == 1
    assert settings.zmq.pods == ()
    assert settings.zmq.replay_timeout == 5.0
    assert settings.zmq.replay_concurrency == 4
    assert settings.zmq.stale_after == 300.0
    assert settings.zmq.buffer_bytes == 256 * 1024 * 1024
    assert settings.zmq.max_frame_bytes == 64 * 1024 * 1024
    assert settings.data_plane == "native"
    assert (settings.api.host, settings.api.port) == ("0.0.0.0", 8080)
    assert settings.api.max_tokens == 131_072
    assert settings.api.max_body_bytes == 8 * 1024 * 1024
    assert (settings.grpc.host, settings.grpc.port) == ("0.0.0.0", 9090)
    assert settings.index.ttl == 3600.0
    assert settings.index.max_size == 1_000_000
    assert settings.index.backend == "memory"
    assert settings.index.sweep_interval == 1.0
    assert settings.redis.url is None
    weights = settings.scoring.tier_weights
    assert (weights.gpu, weights.cpu, weights.disk) == (1.0, 0.8, 0.5)
    assert settings.models == ()
    assert (settings.logging.level, settings.logging.format) == ("info", "json")
    assert settings == Settings()


def test_settings_are_frozen() -> None:
    settings = load_settings(environ={})
    with pytest.raises(ValidationError):
        settings.api.port = 1
    assert hash(settings) == hash(Settings())


def test_unconfigured_model_gets_the_defaults() -> None:
    settings = load_settings(environ={"KV_CACHE_MODELS": '[{"name": "a", "key_mode": "vllm"}]'})
    assert settings.settings_for("a").key_mode == "vllm"
    assert settings.settings_for("b") == ModelSettings(name="b")


# --- the file --------------------------------------------------------------------------


def test_yaml_file_nested_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        data_plane: python
        zmq:
          endpoint: ""
          topic_filter: "kv@10."
          buffer_bytes: 64MiB
          max_frame_bytes: 1MiB
          pods:
            - pod_id: 10.0.0.7:8000
              endpoint: tcp://10.0.0.7:5557
              replay_endpoint: tcp://10.0.0.7:5558
              model: llama
              data_parallel_size: 2
        api: {port: 18080, max_body_bytes: 512KiB}
        grpc: {host: 127.0.0.1}
        index: {ttl: 30m, backend: redis, sweep_interval: 250ms}
        redis: {url: "redis://valkey:6379/0"}
        scoring: {tier_weights: {cpu: 0.6}}
        models:
          - {name: llama, key_mode: vllm, hash_algorithm: sha256_cbor, hash_seed: 42}
        logging: {level: debug, format: console}
        """,
    )
    settings = load_settings(path, environ={})
    assert settings.data_plane == "python"
    assert settings.zmq.endpoint == ""
    assert settings.zmq.topic_filter == "kv@10."
    assert (settings.zmq.buffer_bytes, settings.zmq.max_frame_bytes) == (64 << 20, 1 << 20)
    (pod,) = settings.zmq.pods
    assert (pod.pod_id, pod.endpoint, pod.replay_endpoint) == (
        "10.0.0.7:8000",
        "tcp://10.0.0.7:5557",
        "tcp://10.0.0.7:5558",
    )
    assert (pod.model, pod.data_parallel_size) == ("llama", 2)
    assert (settings.api.port, settings.api.max_body_bytes) == (18080, 512 * 1024)
    assert settings.api.host == "0.0.0.0"  # siblings keep their defaults
    assert settings.grpc.host == "127.0.0.1"
    assert (settings.index.ttl, settings.index.sweep_interval) == (1800.0, 0.25)
    assert settings.redis.url == "redis://valkey:6379/0"
    assert settings.scoring.tier_weights.cpu == 0.6
    assert settings.scoring.tier_weights.gpu == 1.0
    (model,) = settings.models
    assert (model.key_mode, model.hash_algorithm, model.hash_seed) == ("vllm", "sha256_cbor", "42")
    assert (settings.logging.level, settings.logging.format) == ("debug", "console")


def test_empty_file_and_empty_sections_mean_defaults(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, ""), environ={}) == Settings()
    assert load_settings(write(tmp_path, "zmq:\nmodels:\n"), environ={}) == Settings()


def test_max_size_alias(tmp_path: Path) -> None:
    path = write(tmp_path, "index: {maxSize: 500}")
    assert load_settings(path, environ={}).index.max_size == 500
    assert load_settings(path, {"KV_CACHE_INDEX_MAX_SIZE": "700"}).index.max_size == 700
    assert load_settings(environ={}, overrides={"index.maxSize": 9}).index.max_size == 9


def test_max_size_and_its_alias_together_is_an_error(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "index: {max_size: 1, maxSize: 2}"), environ={})
    assert "index.max_size" in message
    assert "maxSize" in message
    assert str(tmp_path) in message


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("zmq: [1, 2", "invalid YAML"),
        ("- a\n- b\n", "expected a mapping"),
    ],
)
def test_unreadable_file_is_an_error_naming_it(tmp_path: Path, text: str, complaint: str) -> None:
    path = write(tmp_path, text)
    message = config_error(path, environ={})
    assert str(path) in message
    assert complaint in message


def test_missing_file_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    message = config_error(path, environ={})
    assert str(path) in message
    assert "not found" in message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("index: {ttll: 5m}", "index.ttll"),
        ("zmq_endpoint: tcp://*:1", "zmq_endpoint"),
        ("models: [{name: m, keymode: vllm}]", "models[0].keymode"),
        ("scoring: {tier_weights: {hbm: 1.0}}", "scoring.tier_weights.hbm"),
        # Removed with the native data plane (zmq.buffer_bytes bounds the buffer now).
        ("zmq: {queue_size: 10000}", "zmq.queue_size"),
    ],
)
def test_unknown_key_in_file_is_an_error_naming_it(tmp_path: Path, text: str, key: str) -> None:
    message = config_error(write(tmp_path, text), environ={})
    assert message.startswith(f"{key}: unknown key")
    assert str(tmp_path) in message


def test_unknown_key_suggests_the_known_one(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "index: {ttll: 5m}"), environ={})
    assert "did you mean 'ttl'?" in message


# --- precedence ------------------------------------------------------------------------


def test_env_overrides_file_and_flags_override_env(tmp_path: Path) -> None:
    path = write(tmp_path, "api: {port: 1000, host: 127.0.0.1}\nindex: {ttl: 10s}")
    env = {"KV_CACHE_API_PORT": "2000", "KV_CACHE_INDEX_TTL": "20s"}
    from_env = load_settings(path, env)
    assert (from_env.api.port, from_env.index.ttl) == (2000, 20.0)
    assert from_env.api.host == "127.0.0.1"  # merged key by key, not section by section
    from_flag = load_settings(path, env, {"api.port": 3000})
    assert (from_flag.api.port, from_flag.index.ttl) == (3000, 20.0)


def test_env_list_replaces_the_file_list(tmp_path: Path) -> None:
    path = write(tmp_path, "models: [{name: a}, {name: b}]")
    settings = load_settings(path, {"KV_CACHE_MODELS": '[{"name": "c"}]'})
    assert [model.name for model in settings.models] == ["c"]


def test_models_as_json_in_env() -> None:
    settings = load_settings(
        environ={
            "KV_CACHE_MODELS": '[{"name": "m", "key_mode": "vllm", "hash_seed": 42},'
            ' {"name": "n", "tokenizer": "Qwen/Qwen3-8B"}]',
            "KV_CACHE_ZMQ_PODS": '[{"pod_id": "p", "endpoint": "tcp://10.0.0.1:5557"}]',
        }
    )
    assert [(m.name, m.key_mode, m.hash_seed) for m in settings.models] == [
        ("m", "vllm", "42"),
        ("n", "tokens", None),
    ]
    assert settings.models[1].tokenizer == "Qwen/Qwen3-8B"
    assert [pod.pod_id for pod in settings.zmq.pods] == ["p"]


def test_invalid_json_in_env_names_the_variable() -> None:
    message = config_error(environ={"KV_CACHE_MODELS": "[{name: m}]"})
    assert message.startswith("models: invalid JSON")
    assert message.endswith("(from KV_CACHE_MODELS)")


def test_every_scalar_key_has_an_env_name() -> None:
    for name in (
        "KV_CACHE_ZMQ_ENDPOINT",
        "KV_CACHE_ZMQ_PODS",
        "KV_CACHE_API_PORT",
        "KV_CACHE_INDEX_MAX_SIZE",
        "KV_CACHE_INDEX_TTL",
        "KV_CACHE_REDIS_URL",
        "KV_CACHE_SCORING_TIER_WEIGHTS_GPU",
        "KV_CACHE_MODELS",
        "KV_CACHE_LOGGING_LEVEL",
    ):
        assert name in ENV_KEYS
    assert ENV_KEYS["KV_CACHE_INDEX_MAX_SIZE"] == "index.max_size"
    env = {name: "0.3" for name in ENV_KEYS if name.endswith("_GPU")}
    assert load_settings(environ=env).scoring.tier_weights.gpu == 0.3


def test_env_values_are_parsed_like_file_values() -> None:
    settings = load_settings(
        environ={
            "KV_CACHE_ZMQ_ENDPOINT": "",
            "KV_CACHE_INDEX_TTL": "90",
            "KV_CACHE_API_MAX_BODY_BYTES": "1MiB",
            "KV_CACHE_SCORING_TIER_WEIGHTS_DISK": "0.25",
            "KV_CACHE_LOGGING_LEVEL": "WARNING",
            "KV_CACHE_REDIS_URL": "",
            "KV_CACHE_DATA_PLANE": "python",
            "KV_CACHE_ZMQ_BUFFER_BYTES": "32MiB",
            "KV_CACHE_ZMQ_MAX_FRAME_BYTES": "4096",
        }
    )
    assert settings.zmq.endpoint == ""  # empty is meaningful here: bind mode off
    assert settings.data_plane == "python"
    assert (settings.zmq.buffer_bytes, settings.zmq.max_frame_bytes) == (32 * 1024 * 1024, 4096)
    assert settings.index.ttl == 90.0
    assert settings.api.max_body_bytes == 1024 * 1024
    assert settings.scoring.tier_weights.disk == 0.25
    assert settings.logging.level == "warning"
    assert settings.redis.url is None  # empty optional means unset


def test_unknown_env_vars_are_ignored_and_reported() -> None:
    env = {
        "KV_CACHE_API_PROT": "1",
        "KV_CACHE_FROBNICATE": "1",
        "KV_CACHE_API_PORT": "8081",
        # Kubernetes service links for Services named kv-cache and kv-cache-zmq:
        "KV_CACHE_SERVICE_HOST": "10.96.0.10",
        "KV_CACHE_SERVICE_PORT_HTTP": "8080",
        "KV_CACHE_PORT": "tcp://10.96.0.10:8080",
        "KV_CACHE_PORT_8080_TCP_ADDR": "10.96.0.10",
        "KV_CACHE_ZMQ_PORT": "tcp://10.96.0.11:5555",
        "OTHER": "x",
    }
    assert load_settings(environ=env).api.port == 8081
    assert unknown_env_vars(env) == {
        "KV_CACHE_API_PROT": "KV_CACHE_API_PORT",
        "KV_CACHE_FROBNICATE": None,
    }


def test_a_service_link_clashing_with_a_key_says_so() -> None:
    message = config_error(environ={"KV_CACHE_API_PORT": "tcp://10.96.0.12:8080"})
    assert message.startswith("api.port: ")
    assert "enableServiceLinks: false" in message
    assert message.endswith("(from KV_CACHE_API_PORT)")


# --- values ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (30, 30.0),
        (1.5, 1.5),
        ("30", 30.0),
        ("90s", 90.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("250ms", 0.25),
        ("1h30m", 5400.0),
        ("1.5h", 5400.0),
        ("1d", 86400.0),
        (" 2m ", 120.0),
    ],
)
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds
    assert load_settings(environ={}, overrides={"index.ttl": value}).index.ttl == seconds


@pytest.mark.parametrize("value", ["1x", "", "h", "1h30", "-5s", "5 m", "inf", "nan", True, None])
def test_invalid_durations(value: object) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(value)


@pytest.mark.parametrize("value", [0, -1, "0s", "0", float("inf"), 10**400])
def test_durations_must_be_positive_and_finite(value: object) -> None:
    with pytest.raises(ValueError, match="duration must be > 0"):
        parse_duration(value)


@given(st.integers(0, 99), st.integers(0, 59), st.integers(0, 59), st.integers(0, 999))
def test_duration_parts_add_up(hours: int, minutes: int, seconds: int, millis: int) -> None:
    total = hours * 3600 + minutes * 60 + seconds + millis / 1000
    if total > 0:
        text = f"{hours}h{minutes}m{seconds}s{millis}ms"
        assert parse_duration(text) == pytest.approx(total)


def test_bad_duration_names_key_value_and_source(tmp_path: Path) -> None:
    assert config_error(environ={"KV_CACHE_INDEX_TTL": "1x"}).startswith(
        "index.ttl: invalid duration '1x'"
    )
    assert config_error(environ={"KV_CACHE_INDEX_TTL": "1x"}).endswith("(from KV_CACHE_INDEX_TTL)")
    path = write(tmp_path, "zmq: {stale_after: 0}")
    message = config_error(path, environ={})
    assert message.startswith("zmq.stale_after: duration must be > 0, got 0")
    assert message.endswith(f"(from config file {str(path)!r})")


@pytest.mark.parametrize(
    ("value", "size"),
    [(4096, 4096), ("4096", 4096), ("8MiB", 8 << 20), ("512KiB", 512 << 10), ("1MB", 10**6)],
)
def test_byte_sizes(value: object, size: int) -> None:
    assert parse_byte_size(value) == size


@pytest.mark.parametrize("value", ["8XB", "8i", "1.5B", "lots", 1.5, True])
def test_invalid_byte_sizes(value: object) -> None:
    with pytest.raises(ValueError, match="invalid byte size"):
        parse_byte_size(value)


@pytest.mark.parametrize("seed", ["42", "'42'"])
def test_hash_seed_is_a_string(tmp_path: Path, seed: str) -> None:
    path = write(tmp_path, f"models: [{{name: m, key_mode: vllm, hash_seed: {seed}}}]")
    assert load_settings(path, environ={}).models[0].hash_seed == "42"


def test_hash_seed_rejects_a_bool(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "models: [{name: m, hash_seed: true}]"), environ={})
    assert message.startswith("models[0].hash_seed: ")
    assert "got True" in message


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"KV_CACHE_API_PORT": "http"}, "api.port: input should be a valid integer"),
        ({"KV_CACHE_API_PORT": "70000"}, "api.port: input should be less than or equal to 65535"),
        ({"KV_CACHE_INDEX_BACKEND": "mem"}, "index.backend: input should be 'memory' or 'redis'"),
        ({"KV_CACHE_SCORING_TIER_WEIGHTS_CPU": "1.5"}, "scoring.tier_weights.cpu: input should"),
        ({"KV_CACHE_ZMQ_DATA_PARALLEL_SIZE": "0"}, "zmq.data_parallel_size: input should be"),
        ({"KV_CACHE_ZMQ_ENDPOINT": "localhost:5555"}, "zmq.endpoint: invalid ZeroMQ endpoint"),
        ({"KV_CACHE_REDIS_URL": "http://x"}, "redis.url: invalid Redis URL 'http://x'"),
        ({"KV_CACHE_LOGGING_FORMAT": "xml"}, "logging.format: input should be 'json' or"),
        ({"KV_CACHE_DATA_PLANE": "rust"}, "data_plane: input should be 'native' or 'python'"),
        ({"KV_CACHE_ZMQ_BUFFER_BYTES": "lots"}, "zmq.buffer_bytes: invalid byte size"),
        ({"KV_CACHE_ZMQ_MAX_FRAME_BYTES": "0"}, "zmq.max_frame_bytes: byte size must be > 0"),
    ],
)
def test_bad_env_value_names_key_value_and_variable(env: dict[str, str], expected: str) -> None:
    ((name, value),) = env.items()
    message = config_error(environ=env)
    assert message.startswith(expected)
    assert repr(value) in message
    assert message.endswith(f"(from {name})")


def test_bad_flag_value_names_key_value_and_flag() -> None:
    message = config_error(environ={"KV_CACHE_API_PORT": "1"}, overrides={"api.port": "x"})
    assert message == (
        "api.port: input should be a valid integer, unable to parse string as an integer,"
        " got 'x' (from flag)"
    )


def test_unknown_flag_key_is_an_error() -> None:
    assert config_error(environ={}, overrides={"api.prot": 1}).startswith(
        "api.prot: unknown key, did you mean 'port'?"
    )


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, "api: {port: -1}\ngrpc: {port: x}")
    lines = config_error(path, {"KV_CACHE_INDEX_TTL": "soon"}).splitlines()
    assert sorted(line.split(":")[0] for line in lines) == ["api.port", "grpc.port", "index.ttl"]


def test_redis_backend_needs_a_url(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "index: {backend: redis}"), environ={})
    assert "redis.url" in message
    assert "index.backend" in message
    assert str(tmp_path) in message
    settings = load_settings(
        environ={"KV_CACHE_INDEX_BACKEND": "redis", "KV_CACHE_REDIS_URL": "redis://r:6379/0"}
    )
    assert settings.index.backend == "redis"


def test_model_names_are_unique(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "models: [{name: m}, {name: m}]"), environ={})
    assert message.startswith("models: duplicate model name 'm'")


def test_pods_are_validated(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        zmq:
          pods:
            - {pod_id: "", endpoint: "tcp://a:5557"}
            - {pod_id: b, endpoint: "b:5557"}
            - {pod_id: c}
        """,
    )
    lines = config_error(path, environ={}).splitlines()
    assert lines[0].startswith("zmq.pods[0].pod_id: string should have at least 1 character")
    assert lines[1].startswith("zmq.pods[1].endpoint: invalid ZeroMQ endpoint 'b:5557'")
    assert lines[2].startswith("zmq.pods[2].endpoint: required")
    duplicate = (
        "zmq: {pods: [{pod_id: a, endpoint: 'tcp://a:1'}, {pod_id: a, endpoint: 'tcp://b:1'}]}"
    )
    assert "duplicate pod_id 'a'" in config_error(write(tmp_path, duplicate), environ={})


def test_redacted_masks_the_redis_password() -> None:
    settings = load_settings(environ={"KV_CACHE_REDIS_URL": "redis://user:s3cret@valkey:6379/0"})
    assert settings.redis.url == "redis://user:s3cret@valkey:6379/0"
    dumped = settings.redacted()
    assert dumped["redis"]["url"] == "redis://user:***@valkey:6379/0"
    assert "s3cret" not in repr(dumped)


def test_docs_list_every_key_and_env_name() -> None:
    docs = DOCS.read_text(encoding="utf-8")
    for name, key in ENV_KEYS.items():
        assert re.search(rf"`{re.escape(key)}`", docs), key
        assert name in docs


def yaml_blocks() -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.DOTALL)


def test_docs_example_file_is_valid_and_at_the_defaults(tmp_path: Path) -> None:
    (example,) = [block for block in yaml_blocks() if block.startswith("zmq:")]
    settings = load_settings(write(tmp_path, example), environ={})
    assert [pod.data_parallel_size for pod in settings.zmq.pods] == [2]
    assert [model.hash_seed for model in settings.models] == ["42", None]
    rest = settings.model_copy(update={"zmq": Settings().zmq, "models": ()})
    assert rest == Settings()
    assert settings.zmq.model_copy(update={"pods": ()}) == Settings().zmq


def test_docs_example_env_is_valid() -> None:
    (example,) = [block for block in yaml_blocks() if block.startswith("env:")]
    environ = {item["name"]: item["value"] for item in yaml.safe_load(example)["env"]}
    settings = load_settings(environ=environ)
    assert settings.index.backend == "redis"
    assert settings.index.ttl == 1800.0
    assert settings.models[0].hash_seed == "42"
