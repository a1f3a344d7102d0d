"""Typed settings, read once and frozen: defaults < YAML file < ``KV_CACHE_*`` env < flags.

The schema below is the single source of truth: environment variable names are generated
from its leaf paths (``index.max_size`` -> ``KV_CACHE_INDEX_MAX_SIZE``), and every problem
is reported as one ``ConfigError`` naming the dotted key, the bad value and where it came
from, e.g. ``index.ttl: invalid duration '1x' (from KV_CACHE_INDEX_TTL)``.
docs/configuration.md lists every key.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import os
import re
import string
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Final, Literal, get_args, get_origin
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from service.index.keys import HashAlgorithm, KeyMode

__all__ = [
    "ENV_KEYS",
    "ENV_PREFIX",
    "ApiSettings",
    "ConfigError",
    "DiscoverySettings",
    "Duration",
    "GrpcSettings",
    "IndexSettings",
    "LoggingSettings",
    "ModelSettings",
    "RedisSettings",
    "ScoringSettings",
    "Settings",
    "TierWeightSettings",
    "ZmqPod",
    "ZmqSettings",
    "load_settings",
    "parse_byte_size",
    "parse_duration",
    "unknown_env_vars",
]

ENV_PREFIX: Final = "KV_CACHE_"


class ConfigError(Exception):
    """The configuration cannot be used; ``str(error)`` has one line per problem."""


# --- value types -----------------------------------------------------------------------

_DURATION_PART = r"(\d+(?:\.\d+)?)(ms|s|m|h|d)"
_DURATION_UNITS: Final = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_BYTE_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)", re.IGNORECASE)
_BYTE_UNITS: Final = {
    "": 1,
    "b": 1,
    **{f"{p}b": 1000 ** (i + 1) for i, p in enumerate("kmgt")},
    **{f"{p}ib": 1024 ** (i + 1) for i, p in enumerate("kmgt")},
    **{f"{p}i": 1024 ** (i + 1) for i, p in enumerate("kmgt")},
}


def parse_duration(value: object) -> float:
    """Seconds from a number of seconds or a string like ``250ms``, ``90s``, ``1h30m``.

    Raises ``ValueError`` naming the value unless it is a finite duration > 0.
    """
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value) if abs(value) < 1e300 else math.inf
    elif isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            seconds = float(text)
        elif re.fullmatch(f"(?:{_DURATION_PART})+", text):
            seconds = sum(
                float(n) * _DURATION_UNITS[unit] for n, unit in re.findall(_DURATION_PART, text)
            )
    if seconds is None:
        raise ValueError(
            f"invalid duration {value!r}; use seconds or a string like 250ms, 90s, 5m, 1h30m"
        )
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"duration must be > 0, got {value!r}")
    return seconds


def parse_byte_size(value: object) -> int:
    """Bytes from an int or a string like ``8MiB``, ``512KiB``, ``1MB`` (1000-based), ``4096``.

    Raises ``ValueError`` naming the value unless it is a whole number of bytes > 0.
    """
    size: float | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (match := _BYTE_SIZE.fullmatch(value.strip())):
        unit = _BYTE_UNITS.get(match[2].lower())
        size = None if unit is None else float(match[1]) * unit
    if size is None or not math.isfinite(size) or size != int(size):
        raise ValueError(f"invalid byte size {value!r}; use bytes or a string like 512KiB, 8MiB")
    if size <= 0:
        raise ValueError(f"byte size must be > 0, got {value!r}")
    return int(size)


def _endpoint(value: str) -> str:
    # Catches "localhost:5555" (no transport) early, without limiting the transports.
    if not re.fullmatch(r"[a-z]+://.+", value):
        raise ValueError(f"invalid ZeroMQ endpoint {value!r}; expected e.g. tcp://10.0.0.7:5557")
    return value


def _bind_endpoint(value: str) -> str:
    return value if value == "" else _endpoint(value)


def _seed(value: object) -> object:
    # PYTHONHASHSEED is a string: YAML's 42 means "42" (bools are not seeds).
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


_POD_ID_FIELDS: Final = frozenset({"ip", "name", "namespace", "port"})


def _pod_id_template(value: str) -> str:
    try:
        fields = {field for _, field, _, _ in string.Formatter().parse(value) if field is not None}
    except ValueError as error:
        raise ValueError(f"invalid pod id template {value!r}: {error}") from None
    if unknown := fields - _POD_ID_FIELDS:
        raise ValueError(
            f"invalid pod id template {value!r}: unknown field {sorted(unknown)[0]!r};"
            " use {ip}, {name}, {namespace} and {port}"
        )
    if not fields & {"ip", "name"}:
        raise ValueError(f"pod id template {value!r} names no pod; use {{ip}} or {{name}}")
    return value


def _none_if_empty(value: object) -> object:
    # An env var cannot hold null: an empty value (or "none") turns an optional port off.
    return None if isinstance(value, str) and value.strip().lower() in ("", "none") else value


def _api_url(value: str | None) -> str | None:
    parts = None if value is None else urlsplit(value)
    if parts is not None and (parts.scheme not in ("http", "https") or not parts.netloc):
        raise ValueError(f"invalid API server URL {value!r}; expected e.g. http://127.0.0.1:8001")
    return value


def _redis_url(value: str | None) -> str | None:
    if value is not None and urlsplit(value).scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"invalid Redis URL {value!r}; expected redis://, rediss:// or unix://")
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""Float seconds, from a number or a string like ``250ms``, ``90s``, ``5m``, ``1h30m``."""

ByteSize = Annotated[int, BeforeValidator(parse_byte_size)]
Port = Annotated[int, Field(ge=0, le=65535)]
RemotePort = Annotated[int, Field(ge=1, le=65535)]
Count = Annotated[int, Field(ge=1)]
Weight = Annotated[float, Field(ge=0.0, le=1.0)]
Name = Annotated[str, Field(min_length=1)]
Endpoint = Annotated[str, AfterValidator(_endpoint)]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class _CrossKeyError(ValueError):
    """A rule over several keys; ``keys`` name them so the error can say where each came from."""

    def __init__(self, message: str, *keys: str) -> None:
        super().__init__(message)
        self.keys = keys


# --- the schema ------------------------------------------------------------------------


class ZmqPod(_Section):
    """A pod whose PUB (and ROUTER replay) socket the service connects to."""

    pod_id: Name
    """Identity of the pod in answers, e.g. ``10.0.0.7:8000``."""
    endpoint: Endpoint
    """The pod's PUB socket; DP rank r publishes on this port + r."""
    replay_endpoint: Endpoint | None = None
    """The pod's ROUTER replay socket; DP rank r on this port + r."""
    model: str | None = None
    """Model served, used when the topic names none."""
    data_parallel_size: Count = 1
    """Data-parallel ranks of the pod."""


class ZmqSettings(_Section):
    """ZeroMQ ingestion: bind mode (pods connect to us) and connect mode (``pods``)."""

    endpoint: Annotated[str, AfterValidator(_bind_endpoint)] = "tcp://*:5555"
    """SUB socket the service binds; empty disables bind mode."""
    topic_filter: str = "kv@"
    """Topic prefix subscribed to, in both modes."""
    data_parallel_size: Count = 1
    """Bind mode: also bind the next N-1 ports (DP rank r connects to port + r)."""
    pods: tuple[ZmqPod, ...] = ()
    """Connect mode: pods whose sockets the service connects to."""
    replay_timeout: Duration = 5.0
    """How long a replay request may take before it is abandoned."""
    replay_concurrency: Count = 4
    """Replays running at once."""
    stale_after: Duration = 300.0
    """A pod silent this long is shown as stale."""
    buffer_bytes: ByteSize = 256 * 1024 * 1024
    """Bound of the ingest buffer: frames received and not yet applied. Past it frames are
    dropped, counted per pod, and the pod is resynced (replayed where it can be)."""
    max_frame_bytes: ByteSize = 64 * 1024 * 1024
    """Largest ZeroMQ frame accepted (ZMQ_MAXMSGSIZE); a sender of a larger one is cut off."""

    @field_validator("pods")
    @classmethod
    def _unique_pods(cls, pods: tuple[ZmqPod, ...]) -> tuple[ZmqPod, ...]:
        _require_unique("pod_id", [pod.pod_id for pod in pods])
        return pods


class ApiSettings(_Section):
    """HTTP: REST, ``/metrics``, ``/healthz``, ``/readyz``."""

    host: Name = "0.0.0.0"
    """Address the HTTP server binds."""
    port: Port = 8080
    """HTTP port; 0 picks a free port."""
    max_tokens: Count = 131_072
    """Most tokens in one query; beyond it 413."""
    max_body_bytes: ByteSize = 8 * 1024 * 1024
    """Largest request body; beyond it 413."""


class GrpcSettings(_Section):
    """The gRPC server."""

    host: Name = "0.0.0.0"
    """Address the gRPC server binds."""
    port: Port = 9090
    """gRPC port; 0 picks a free port."""


class IndexSettings(_Section):
    """The block index."""

    ttl: Duration = 3600.0
    """An entry (block, pod) not re-stored within this time expires."""
    max_size: Count = Field(default=1_000_000, validation_alias=AliasChoices("max_size", "maxSize"))
    """Most (block, pod) entries kept per process; beyond it the coldest go first."""
    backend: Literal["memory", "redis"] = "memory"
    """``memory`` (in-process) or ``redis`` (needs ``redis.url``)."""
    sweep_interval: Duration = 1.0
    """How often expired entries are swept."""


class RedisSettings(_Section):
    """Redis/Valkey, for ``index.backend: redis``."""

    url: Annotated[str | None, AfterValidator(_redis_url)] = None
    """e.g. ``redis://host:6379/0``."""


class TierWeightSettings(_Section):
    """Weight of a cached block by its best tier."""

    gpu: Weight = 1.0
    cpu: Weight = 0.8
    disk: Weight = 0.5


class ScoringSettings(_Section):
    """How answers are scored."""

    tier_weights: TierWeightSettings = TierWeightSettings()


class ModelSettings(_Section):
    """Per-model settings; a model seen only in events gets these defaults."""

    name: Name
    key_mode: KeyMode = "tokens"
    """``tokens`` (own keys from token ids) or ``vllm`` (reproduce the engine's hash)."""
    hash_algorithm: HashAlgorithm = "sha256"
    """``vllm`` mode: the engine's ``--prefix-caching-hash-algo``."""
    hash_seed: Annotated[str | None, BeforeValidator(_seed)] = None
    """``vllm`` mode: the engines' ``PYTHONHASHSEED``; unset means vLLM's default seed."""
    tokenizer: str | None = None
    """Tokenizer for ``prompt``/``messages`` queries: a ``tokenizer.json``, its directory, or
    a hub id in the local Hugging Face cache; default: the model name, looked up the same way."""
    chat_template: str | None = None
    """A chat template file (jinja) to use instead of the tokenizer's (vLLM's
    ``--chat-template``)."""
    prefix_store_bytes: int = 64 * 1024 * 1024
    """Bound of the store of tokenised prompt prefixes (a byte size); 0 turns it off."""

    @field_validator("prefix_store_bytes", mode="before")
    @classmethod
    def _store_size(cls, value: object) -> object:
        return 0 if value in (0, "0") and not isinstance(value, bool) else parse_byte_size(value)


class DiscoverySettings(_Section):
    """Kubernetes pod discovery: connect mode to every Ready pod the label selector matches."""

    enabled: bool = False
    """Watch pods through the Kubernetes API and subscribe to each Ready one."""
    namespace: Name | None = None
    """Namespace watched; unset: the service's own (service account), else ``default``."""
    label_selector: str = "app=vllm"
    """Which pods are vLLM engines, e.g. ``app=vllm,tier=gpu``."""
    pod_id_template: Annotated[str, AfterValidator(_pod_id_template)] = "{ip}:{port}"
    """A pod's id in answers, from ``{ip}``, ``{name}``, ``{namespace}`` and ``{port}``."""
    http_port: RemotePort = 8000
    """The engines' HTTP port: ``{port}`` in ``pod_id_template``."""
    event_port: RemotePort = 5557
    """The engines' PUB port; DP rank r publishes on this port + r."""
    replay_port: Annotated[RemotePort | None, BeforeValidator(_none_if_empty)] = 5558
    """The engines' ROUTER replay port (rank r on port + r); unset: no replay."""
    model_annotation: Name = "kv-cache/model"
    """Annotation (or label) naming a pod's model, for topics that name none."""
    dp_size_annotation: Name = "kv-cache/data-parallel-size"
    """Annotation giving a pod's data-parallel size; absent: 1."""
    not_ready_grace: Duration = 30.0
    """A subscribed pod not Ready this long is dropped (unsubscribed, entries removed)."""
    api_url: Annotated[str | None, AfterValidator(_api_url)] = None
    """Kubernetes API server URL, used without credentials (``kubectl proxy``, tests);
    unset: in-cluster config, else the kubeconfig (``KUBECONFIG``, ``~/.kube/config``)."""
    resync_backoff_max: Duration = 30.0
    """Longest wait before retrying a failed list or watch."""


class LoggingSettings(_Section):
    """Structured logs on stderr."""

    level: Annotated[Literal["debug", "info", "warning", "error"], BeforeValidator(_lower)] = "info"
    format: Literal["json", "console"] = "json"


class Settings(_Section):
    """Everything the service is configured with, validated and frozen."""

    data_plane: Literal["native", "python"] = "native"
    """``native`` (the C++ data plane) or ``python`` (the reference: slow, for comparison)."""
    zmq: ZmqSettings = ZmqSettings()
    api: ApiSettings = ApiSettings()
    grpc: GrpcSettings = GrpcSettings()
    index: IndexSettings = IndexSettings()
    redis: RedisSettings = RedisSettings()
    scoring: ScoringSettings = ScoringSettings()
    models: tuple[ModelSettings, ...] = ()
    discovery: DiscoverySettings = DiscoverySettings()
    logging: LoggingSettings = LoggingSettings()

    @field_validator("models")
    @classmethod
    def _unique_models(cls, models: tuple[ModelSettings, ...]) -> tuple[ModelSettings, ...]:
        _require_unique("model name", [model.name for model in models])
        return models

    @model_validator(mode="after")
    def _redis_needs_url(self) -> Settings:
        if self.index.backend == "redis" and self.redis.url is None:
            raise _CrossKeyError(
                "redis.url: required when index.backend is 'redis'", "index.backend"
            )
        return self

    def settings_for(self, model: str) -> ModelSettings:
        """The configured settings of ``model``, or the defaults (a model seen only in events)."""
        for configured in self.models:
            if configured.name == model:
                return configured
        return ModelSettings(name=model)

    def redacted(self) -> dict[str, Any]:
        """JSON-ready settings with the Redis password masked, for logging."""
        dumped = self.model_dump(mode="json")
        url = self.redis.url
        if url is not None and (parts := urlsplit(url)).password is not None:
            netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
            dumped["redis"]["url"] = urlunsplit(parts._replace(netloc=netloc))
        return dumped


def _require_unique(what: str, values: list[str]) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"duplicate {what} {value!r}")
        seen.add(value)


# --- reading the schema ----------------------------------------------------------------


def _section_of(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _items_of(annotation: object) -> type[BaseModel] | None:
    """The model of a ``tuple[Model, ...]`` field (``zmq.pods``, ``models``)."""
    if get_origin(annotation) is tuple:
        return _section_of(get_args(annotation)[0])
    return None


def _leaf_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, field in model.model_fields.items():
        section = _section_of(field.annotation)
        if section is None:
            yield (*prefix, name)
        else:
            yield from _leaf_paths(section, (*prefix, name))


def _env_table() -> dict[str, tuple[str, ...]]:
    table: dict[str, tuple[str, ...]] = {}
    for path in _leaf_paths(Settings):
        name = ENV_PREFIX + "_".join(path).upper()
        if name in table:  # only a schema change can cause this; fail at import
            raise RuntimeError(f"{name} would name both {table[name]} and {path}")
        table[name] = path
    return table


_ENV_PATHS: Final = _env_table()

ENV_KEYS: Final[Mapping[str, str]] = MappingProxyType(
    {name: ".".join(path) for name, path in _ENV_PATHS.items()}
)
"""Every environment variable read, mapped to its dotted key."""

# Kubernetes injects these for every Service in the namespace (a Service named ``kv-cache``
# gives ``KV_CACHE_SERVICE_HOST``, ``KV_CACHE_PORT_8080_TCP``, ...): not ours, not warned.
_SERVICE_LINK = re.compile(
    r"KV_CACHE_(?:\w+_)?(?:SERVICE_HOST|SERVICE_PORT(?:_\w+)?|PORT(?:_\d+_(?:TCP|UDP|SCTP)\w*)?)"
)
_SERVICE_LINK_VALUE = re.compile(r"(?:tcp|udp|sctp)://[\w.:\[\]-]+:\d+")


def unknown_env_vars(environ: Mapping[str, str]) -> dict[str, str | None]:
    """``KV_CACHE_*`` variables that name no setting (they are ignored), each with the
    closest known name or ``None``. Kubernetes service-link variables are left out."""
    unknown: dict[str, str | None] = {}
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in _ENV_PATHS:
            if _SERVICE_LINK.fullmatch(name):
                continue
            # Compare what follows the shared prefix, or every name looks close.
            tails = {known.removeprefix(ENV_PREFIX): known for known in _ENV_PATHS}
            close = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), tails, n=1)
            unknown[name] = tails[close[0]] if close else None
    return unknown


# --- loading ---------------------------------------------------------------------------

_Loc = tuple[str | int, ...]
_Sources = dict[tuple[str, ...], str]


def load_settings(
    config_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Settings:
    """Validated settings: ``overrides`` (dotted keys, e.g. from flags) > ``environ`` >
    ``config_file`` (YAML) > defaults.

    ``environ`` defaults to ``os.environ``; only ``KV_CACHE_*`` names from ``ENV_KEYS`` are
    read (list keys as JSON). Maps merge key by key across layers; lists are replaced whole.
    Raises ``ConfigError`` naming each bad key, its value and its source.
    """
    tree: dict[str, Any] = {}
    sources: _Sources = {}
    if config_file is not None:
        origin = f"config file {str(config_file)!r}"
        _merge(
            tree, _normalise(_read_yaml(Path(config_file)), Settings, (), origin), origin, sources
        )
    for name, text in sorted((os.environ if environ is None else environ).items()):
        if (path := _ENV_PATHS.get(name)) is not None:
            layer = _nest(path, _env_value(name, path, text))
            _merge(tree, _normalise(layer, Settings, (), name), name, sources)
    for key, value in (overrides or {}).items():
        layer = _nest(tuple(key.split(".")), copy.deepcopy(value))
        _merge(tree, _normalise(layer, Settings, (), "flag"), "flag", sources)
    try:
        return Settings.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(
            "\n".join(_describe(details, sources) for details in error.errors())
        ) from None


def _read_yaml(path: Path) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r}: not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {str(path)!r}: cannot read: {error}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        detail = " ".join(str(error).split())
        raise ConfigError(f"config file {str(path)!r}: invalid YAML: {detail}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r}: expected a mapping of keys, got {type(data).__name__}"
        )
    return data


def _env_value(name: str, path: tuple[str, ...], value: str) -> object:
    field = _field_at(path)
    if field is not None and _items_of(field.annotation) is not None:
        try:
            return json.loads(value)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{'.'.join(path)}: invalid JSON: {error} (from {name})") from None
    if value == "" and field is not None and field.default is None:
        return None  # an empty optional means unset
    return value


def _field_at(path: tuple[str, ...]) -> Any:
    model: type[BaseModel] | None = Settings
    field = None
    for part in path:
        if model is None or (field := model.model_fields.get(part)) is None:
            return None
        model = _section_of(field.annotation)
    return field


def _nest(path: tuple[str, ...], value: object) -> dict[str, Any]:
    tree: dict[str, Any] = {path[-1]: value}
    for part in reversed(path[:-1]):
        tree = {part: tree}
    return tree


def _aliases(model: type[BaseModel]) -> dict[str, str]:
    found: dict[str, str] = {}
    for name, field in model.model_fields.items():
        if isinstance(field.validation_alias, AliasChoices):
            for choice in field.validation_alias.choices:
                if isinstance(choice, str) and choice != name:
                    found[choice] = name
    return found


def _normalise(tree: object, model: type[BaseModel], where: _Loc, origin: str) -> Any:
    """Spell keys by field name (``maxSize`` -> ``max_size``) so layers merge key by key,
    and treat an empty section (``zmq:`` with nothing under it) as absent."""
    if not isinstance(tree, dict):
        return tree  # validation reports it with its path
    aliases = _aliases(model)
    out: dict[str, Any] = {}
    for raw_key, value in tree.items():
        key = aliases.get(str(raw_key), str(raw_key))
        if key in out:
            raise ConfigError(
                f"{_dotted((*where, key))}: given twice, as {key!r} and {str(raw_key)!r}"
                f" (from {origin})"
            )
        field = model.model_fields.get(key)
        section = None if field is None else _section_of(field.annotation)
        items = None if field is None else _items_of(field.annotation)
        if value is None and (section or items):
            continue
        if section is not None:
            value = _normalise(value, section, (*where, key), origin)
        elif items is not None and isinstance(value, list):
            value = [
                _normalise(item, items, (*where, key, i), origin) for i, item in enumerate(value)
            ]
        out[key] = value
    return out


def _merge(
    into: dict[str, Any],
    layer: dict[str, Any],
    origin: str,
    sources: _Sources,
    prefix: tuple[str, ...] = (),
) -> None:
    for key, value in layer.items():
        path = (*prefix, key)
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value, origin, sources, path)
            continue
        into[key] = value
        sources[path] = origin
        if isinstance(value, dict):
            for sub_path in _dict_paths(value, path):
                sources[sub_path] = origin


def _dict_paths(tree: dict[str, Any], prefix: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
    for key, value in tree.items():
        yield (*prefix, key)
        if isinstance(value, dict):
            yield from _dict_paths(value, (*prefix, key))


# --- error messages --------------------------------------------------------------------


def _dotted(loc: _Loc) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else part
    return text


def _source(loc: _Loc, sources: _Sources) -> str | None:
    keys: list[str] = []
    found = None
    for part in loc:
        if isinstance(part, int):
            break
        keys.append(part)
        found = sources.get(tuple(keys), found)
    return found


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _describe(details: ErrorDetails, sources: _Sources) -> str:
    loc = tuple(details["loc"])
    kind = details["type"]
    error = details.get("ctx", {}).get("error")
    source = _source(loc, sources)
    if isinstance(error, _CrossKeyError):
        # A rule over keys: say where the keys that were set came from.
        given = [(key, _source(tuple(key.split(".")), sources)) for key in error.keys]
        origins = ", ".join(f"{key} from {src}" for key, src in given if src)
        return f"{error}" + (f" ({origins})" if origins else "")
    if kind == "extra_forbidden":
        message = "unknown key" + _suggestion(loc)
    elif kind == "missing":
        message = "required"
    elif isinstance(error, ValueError):
        message = str(error)  # ours: names the value already
    else:
        text = details["msg"]
        message = f"{text[:1].lower()}{text[1:]}, got {_show(details['input'])}"
    if (
        source is not None
        and source.startswith(ENV_PREFIX)
        and _SERVICE_LINK_VALUE.fullmatch(str(details["input"]))
    ):
        message += (
            f"; {source} looks like a Kubernetes service link (a Service named"
            f" {source.removesuffix('_PORT').lower().replace('_', '-')}):"
            " set enableServiceLinks: false in the pod spec"
        )
    where = _dotted(loc)
    line = f"{where}: {message}" if where else message
    return line + (f" (from {source})" if source else "")


def _suggestion(loc: _Loc) -> str:
    model: type[BaseModel] | None = Settings
    for part in loc[:-1]:
        if model is None:
            return ""
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return ""
        model = _section_of(field.annotation) or _items_of(field.annotation)
    if model is None:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), [*model.model_fields, *_aliases(model)], n=1)
    return f", did you mean {close[0]!r}?" if close else ""
