"""Which pods are subscribed to, under which id and at which endpoints; and their settings."""

from __future__ import annotations

from typing import Any

import pytest

from service.config import ConfigError, DiscoverySettings, load_settings
from service.discovery.pods import PodTargets, parse_pod
from service.events.subscriber import PodEndpoint
from tests.support.kube_api import pod_object

MODEL = "meta-llama/Llama-3.1-8B"


def endpoint(settings: DiscoverySettings | None = None, **pod: Any) -> PodEndpoint | None:
    return PodTargets(settings or DiscoverySettings()).endpoint_for(
        parse_pod(pod_object("vllm-0", **pod))
    )


def test_defaults_name_the_pod_by_ip_and_http_port() -> None:
    assert endpoint(ip="10.0.0.7", annotations={"kv-cache/model": MODEL}) == PodEndpoint(
        "10.0.0.7:8000", "tcp://10.0.0.7:5557", "tcp://10.0.0.7:5558", MODEL, 1
    )


def test_only_running_ready_pods_with_an_ip_are_targets() -> None:
    assert endpoint(ready=False) is None
    assert endpoint(ip=None) is None  # Pending
    terminating = pod_object("vllm-0")
    terminating["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    assert PodTargets(DiscoverySettings()).endpoint_for(parse_pod(terminating)) is None
    failed = pod_object("vllm-0")
    failed["status"]["phase"] = "Failed"
    assert PodTargets(DiscoverySettings()).endpoint_for(parse_pod(failed)) is None


def test_template_ports_model_label_and_data_parallel_size() -> None:
    settings = DiscoverySettings(
        pod_id_template="{name}.{namespace}:{port}",
        http_port=9000,
        event_port=6000,
        replay_port=None,
        model_annotation="model",
    )
    found = endpoint(
        settings,
        namespace="prod",
        labels={"app": "vllm", "model": "qwen3"},
        annotations={"kv-cache/data-parallel-size": "4"},
    )
    assert found == PodEndpoint("vllm-0.prod:9000", "tcp://10.0.0.1:6000", None, "qwen3", 4)
    unset = endpoint(annotations={"kv-cache/data-parallel-size": ""})
    assert unset is not None
    assert unset.data_parallel_size == 1


def test_ipv6_pod_ip_is_bracketed_in_endpoints() -> None:
    found = endpoint(ip="fd00::7")
    assert found is not None
    assert found.pod_id == "fd00::7:8000"
    assert found.endpoint == "tcp://[fd00::7]:5557"


@pytest.mark.parametrize("value", ["two", "0", "-1", "1.5"])
def test_bad_data_parallel_annotation_is_an_error_naming_it(value: str) -> None:
    with pytest.raises(ValueError, match="kv-cache/data-parallel-size"):
        endpoint(annotations={"kv-cache/data-parallel-size": value})


def test_parse_pod_rejects_what_is_not_a_pod() -> None:
    with pytest.raises(ValueError):
        parse_pod({"kind": "Status"})
    with pytest.raises(ValueError):
        parse_pod([])


def test_discovery_settings_defaults_and_env() -> None:
    settings = load_settings(environ={}).discovery
    assert settings == DiscoverySettings()
    assert not settings.enabled
    assert (settings.label_selector, settings.pod_id_template) == ("app=vllm", "{ip}:{port}")
    assert (settings.http_port, settings.event_port, settings.replay_port) == (8000, 5557, 5558)
    assert settings.not_ready_grace == 30.0
    env = load_settings(
        environ={
            "KV_CACHE_DISCOVERY_ENABLED": "true",
            "KV_CACHE_DISCOVERY_REPLAY_PORT": "",
            "KV_CACHE_DISCOVERY_NOT_READY_GRACE": "2m",
            "KV_CACHE_DISCOVERY_API_URL": "http://127.0.0.1:8001",
        }
    ).discovery
    assert env.enabled
    assert env.replay_port is None
    assert env.not_ready_grace == 120.0
    assert env.api_url == "http://127.0.0.1:8001"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("POD_ID_TEMPLATE", "{pod}:{port}", "unknown field 'pod'"),
        ("POD_ID_TEMPLATE", "{port}", "names no pod"),
        ("POD_ID_TEMPLATE", "{ip", "invalid pod id template"),
        ("API_URL", "127.0.0.1:8001", "invalid API server URL"),
        ("EVENT_PORT", "0", "discovery.event_port"),
    ],
)
def test_bad_discovery_settings_are_reported_by_key(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        load_settings(environ={f"KV_CACHE_DISCOVERY_{name}": value})
    assert f"KV_CACHE_DISCOVERY_{name}" in str(caught.value)
