"""The Kubernetes manifests a user applies: valid for the API server, wired to the service's
real configuration, routes and ports, and ``config/kv-cache/`` exactly the default overlay.

Schemas come from kubernetes-validate's bundled copies, so nothing here needs a network or a
cluster. The comparison with a real kustomize render needs ``kubectl`` (or ``kustomize``) on
PATH and is skipped without one; a small resolver of the few kustomize features the
kustomizations use (``resources``, ``labels``, ``images``) runs everywhere instead.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from fastapi.routing import APIRoute
from prometheus_client import CollectorRegistry

from service.api.query import QueryService
from service.api.rest import create_rest_app
from service.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "k8s"
DEFAULT_OVERLAY = DEPLOY / "overlays" / "default"
SERVICEMONITOR_COMPONENT = DEPLOY / "components" / "servicemonitor"
RENDERED = ROOT / "config" / "kv-cache"
DOCKER_CONFIG = ROOT / "docker" / "config.yaml"

# The oldest Kubernetes the manifests support (the preStop ``sleep`` action is on by default
# from 1.30) and the newest whose schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.latest_version())
# Custom resources: no bundled schema; each is checked by a test of its own below.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
# The service exits within 5 s of SIGTERM (service/app.py, _STOP_SECONDS).
SHUTDOWN_SECONDS = 5
# Measured RSS at capacity in tokens key mode, rounded up (docs/deploy.md, "Sizing").
BASE_MEMORY = 128 * 2**20
BYTES_PER_ENTRY = 400

Manifest = dict[str, Any]


# --- reading manifests -----------------------------------------------------------------


def load_documents(path: Path) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def manifest_files() -> list[Path]:
    """Every Kubernetes manifest shipped: deploy/k8s (but not its kustomizations) and
    config/kv-cache."""
    files = [p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml"]
    return sorted([*files, *RENDERED.glob("*.yaml")])


def rendered() -> list[Manifest]:
    """config/kv-cache/, what ``kubectl apply -f config/kv-cache/`` creates, in file order."""
    return [doc for path in sorted(RENDERED.glob("*.yaml")) for doc in load_documents(path)]


def identity(obj: Manifest) -> tuple[str, str, str, str]:
    metadata = obj["metadata"]
    return obj["apiVersion"], obj["kind"], metadata.get("namespace", ""), metadata["name"]


def by_identity(objects: list[Manifest]) -> dict[tuple[str, str, str, str], Manifest]:
    found: dict[tuple[str, str, str, str], Manifest] = {}
    for obj in objects:
        assert identity(obj) not in found, f"{identity(obj)} appears twice"
        found[identity(obj)] = obj
    return found


def only(objects: list[Manifest], kind: str) -> Manifest:
    matches = [obj for obj in objects if obj["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, found {len(matches)}"
    return matches[0]


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# --- a resolver for the kustomize features the kustomizations use ----------------------

_KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "labels", "images"}
_LABEL_KEYS = {"pairs", "includeSelectors", "includeTemplates"}
_IMAGE_KEYS = {"name", "newName", "newTag", "digest"}
_TEMPLATED_KINDS = {"Deployment", "ReplicaSet", "StatefulSet", "DaemonSet", "Job"}


def resolve(directory: Path) -> list[Manifest]:
    """The objects ``kustomize build directory`` emits (order aside), for kustomizations
    made of ``resources`` (files and directories), ``labels`` and ``images`` only.

    Anything else fails loudly, so a kustomization that outgrows this resolver is noticed
    here rather than compared wrongly.
    """
    path = directory / "kustomization.yaml"
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    unknown = sorted(set(spec) - _KUSTOMIZATION_KEYS)
    assert not unknown, f"{relative(path)}: {unknown} not supported by this resolver; extend it"
    assert spec.get("kind", "Kustomization") == "Kustomization", relative(path)
    objects: list[Manifest] = []
    for entry in spec.get("resources", []):
        target = (directory / entry).resolve()
        assert target.is_relative_to(ROOT), f"{relative(path)}: {entry} is outside the repo"
        objects += resolve(target) if target.is_dir() else load_documents(target)
    for labels in spec.get("labels", []):
        assert set(labels) <= _LABEL_KEYS, f"{relative(path)}: labels {sorted(labels)}"
        assert not labels.get("includeSelectors"), f"{relative(path)}: includeSelectors"
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(labels["pairs"])
            if labels.get("includeTemplates") and obj["kind"] in _TEMPLATED_KINDS:
                template = obj["spec"]["template"].setdefault("metadata", {})
                template.setdefault("labels", {}).update(labels["pairs"])
    for image in spec.get("images", []):
        assert set(image) <= _IMAGE_KEYS, f"{relative(path)}: images {sorted(image)}"
        for container in _containers(objects):
            container["image"] = _retag(container["image"], image)
    return objects


def _containers(objects: list[Manifest]) -> Iterator[Manifest]:
    for obj in objects:
        if obj["kind"] in _TEMPLATED_KINDS:
            pod = obj["spec"]["template"]["spec"]
            yield from pod.get("initContainers", [])
            yield from pod["containers"]


def _split_image(image: str) -> tuple[str, str | None, str | None]:
    """``name[:tag][@digest]`` -> (name, tag, digest); a registry port is not a tag."""
    name, _, digest = image.partition("@")
    head, colon, tag = name.rpartition(":")
    if colon and "/" not in tag:
        return head, tag, digest or None
    return name, None, digest or None


def _retag(image: str, rule: Manifest) -> str:
    name, tag, digest = _split_image(image)
    if name != rule["name"]:
        return image
    name = str(rule.get("newName", name))
    if "digest" in rule:
        return f"{name}@{rule['digest']}"
    tag = str(rule["newTag"]) if "newTag" in rule else tag
    return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def kustomize(directory: Path) -> list[Manifest]:
    """A real kustomize render of ``directory``; skips the test when none is installed."""
    if kubectl := shutil.which("kubectl"):
        command = [kubectl, "kustomize", str(directory)]
    elif standalone := shutil.which("kustomize"):
        command = [standalone, "build", str(directory)]
    else:
        pytest.skip(
            "neither kubectl (with its built-in kustomize) nor kustomize is on PATH, so"
            " config/kv-cache/ is not compared with a real render here;"
            " test_rendered_manifests_are_the_default_overlay checks it without one"
        )
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


# --- config/kv-cache/ is the default overlay -------------------------------------------


def test_rendered_manifests_are_the_default_overlay() -> None:
    expected, actual = by_identity(resolve(DEFAULT_OVERLAY)), by_identity(rendered())
    assert sorted(actual) == sorted(expected), "objects differ: run `make manifests`"
    stale = [key for key in expected if expected[key] != actual[key]]
    assert not stale, f"stale objects in config/kv-cache/, run `make manifests`: {stale}"


def test_rendered_manifests_are_what_kustomize_renders() -> None:
    real = kustomize(DEFAULT_OVERLAY)
    assert by_identity(rendered()) == by_identity(real), "run `make manifests`"
    # The files are numbered in kustomize's order, which apply follows.
    assert [identity(obj) for obj in rendered()] == [identity(obj) for obj in real]


def test_resolver_agrees_with_kustomize() -> None:
    """Keeps the always-running comparison above honest where kustomize is installed."""
    assert by_identity(resolve(DEFAULT_OVERLAY)) == by_identity(kustomize(DEFAULT_OVERLAY))


def test_render_script_finds_no_drift() -> None:
    kustomize(DEFAULT_OVERLAY)  # skips without kustomize, as the script would fail
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "render_manifests.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_servicemonitor_component_adds_only_the_servicemonitor(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                # kustomize takes relative paths only
                "resources": [os.path.relpath(DEFAULT_OVERLAY, tmp_path)],
                "components": [os.path.relpath(SERVICEMONITOR_COMPONENT, tmp_path)],
            }
        )
    )
    with_component = by_identity(kustomize(tmp_path))
    added = [with_component[key] for key in with_component.keys() - by_identity(rendered())]
    assert [obj["kind"] for obj in added] == ["ServiceMonitor"]


# --- every manifest is valid for the API server ----------------------------------------


@pytest.mark.parametrize("path", manifest_files(), ids=relative)
def test_manifest_matches_the_kubernetes_schema(path: Path) -> None:
    documents = load_documents(path)
    assert documents, f"{relative(path)} holds no object"
    problems = []
    for doc in documents:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                # strict: unknown fields (a typo such as readinessprobe) are errors too.
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                where = ".".join(str(part) for part in error.path)
                problems.append(
                    f"{doc['kind']}/{doc['metadata']['name']} ({version}): {where}: {error.message}"
                )
            except kubernetes_validate.SchemaNotFoundError as error:
                problems.append(f"{error.message}; add a check for it like ServiceMonitor's")
    assert not problems, "\n".join(problems)


def test_servicemonitor_scrapes_the_metrics_route() -> None:
    monitor = only(
        load_documents(SERVICEMONITOR_COMPONENT / "servicemonitor.yaml"), "ServiceMonitor"
    )
    service = only(rendered(), "Service")
    assert monitor["metadata"]["name"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    service_ports = {port["name"] for port in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports
        assert endpoint["path"] in get_routes()
        assert re.fullmatch(r"\d+[smh]", endpoint["interval"])


# --- wired to the service: config, routes, ports ---------------------------------------


def get_routes() -> set[str]:
    """The GET routes of the real REST app (the query service is never called here)."""
    app = create_rest_app(cast(QueryService, object()), CollectorRegistry(), max_body_bytes=1024)
    return {
        route.path
        for route in app.fastapi.routes
        if isinstance(route, APIRoute) and "GET" in (route.methods or ())
    }


def shipped_settings(tmp_path: Path) -> Settings:
    """The settings the ConfigMap's config.yaml gives, with no KV_CACHE_* variables set."""
    config_map = only(rendered(), "ConfigMap")
    path = tmp_path / "config.yaml"
    path.write_text(config_map["data"]["config.yaml"], encoding="utf-8")
    return load_settings(path, environ={})


def pod_spec() -> Manifest:
    spec: Manifest = only(rendered(), "Deployment")["spec"]["template"]["spec"]
    return spec


def container() -> Manifest:
    containers: list[Manifest] = pod_spec()["containers"]
    assert [c["name"] for c in containers] == ["kv-cache"]
    return containers[0]


def test_configmap_config_loads(tmp_path: Path) -> None:
    settings = shipped_settings(tmp_path)
    assert settings.zmq.endpoint == "tcp://*:5555"  # bind mode: vLLM pods connect to us
    assert (settings.api.host, settings.grpc.host) == ("0.0.0.0", "0.0.0.0")


def test_image_default_config_is_the_configmap_config(tmp_path: Path) -> None:
    assert load_settings(DOCKER_CONFIG, environ={}) == shipped_settings(tmp_path)


def test_deployment_reads_the_configmap() -> None:
    args = container()["args"]
    assert args[0] == "serve"
    config_path = Path(args[args.index("--config") + 1])
    mount = next(
        m for m in container()["volumeMounts"] if m["mountPath"] == str(config_path.parent)
    )
    volume = next(v for v in pod_spec()["volumes"] if v["name"] == mount["name"])
    config_map = only(rendered(), "ConfigMap")
    assert volume["configMap"]["name"] == config_map["metadata"]["name"] == "kv-cache-config"
    assert config_path.name in config_map["data"]


def test_probes_call_real_routes() -> None:
    routes = get_routes()
    probes = {name: container()[name]["httpGet"] for name in ("livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    startup = container()["startupProbe"]["httpGet"]
    for probe in [*probes.values(), startup]:
        assert probe["path"] in routes
        assert probe["port"] == "http"


def container_ports() -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in container()["ports"]}


def test_ports_are_the_configured_ones(tmp_path: Path) -> None:
    settings = shipped_settings(tmp_path)
    zmq_port = int(settings.zmq.endpoint.rsplit(":", 1)[1])
    expected = {"http": settings.api.port, "grpc": settings.grpc.port, "zmq": zmq_port}
    assert container_ports() == expected
    service = only(rendered(), "Service")
    assert service["metadata"]["name"] == "kv-cache-service"  # vLLM's endpoint names it
    ports = {port["name"]: port for port in service["spec"]["ports"]}
    assert {name: port["port"] for name, port in ports.items()} == expected
    assert all(port["targetPort"] == name for name, port in ports.items())
    assert ports["grpc"]["appProtocol"] == "grpc"
    annotations = only(rendered(), "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.api.port)
    assert annotations["prometheus.io/path"] in get_routes()


def test_every_object_is_labelled_app_kv_cache() -> None:
    unlabelled = [
        identity(o) for o in rendered() if o["metadata"]["labels"].get("app") != "kv-cache"
    ]
    assert not unlabelled


def test_selectors_select_the_kv_cache_pods() -> None:
    objects = rendered()
    deployment = only(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"].items()
    assert pod_labels >= {"app": "kv-cache"}.items()
    selectors = {
        "Deployment": deployment["spec"]["selector"]["matchLabels"],
        "Service": only(objects, "Service")["spec"]["selector"],
        "PodDisruptionBudget": only(objects, "PodDisruptionBudget")["spec"]["selector"][
            "matchLabels"
        ],
        "NetworkPolicy": only(objects, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"],
    }
    for kind, selector in selectors.items():
        assert selector and selector.items() <= pod_labels, kind


def test_pod_runs_locked_down() -> None:
    pod, ours = pod_spec()["securityContext"], container()["securityContext"]

    def effective(key: str) -> object:  # a container setting overrides the pod's
        return ours.get(key, pod.get(key))

    assert effective("runAsNonRoot") is True
    assert effective("runAsUser") == 65532  # the image's USER (test_dockerfile.py)
    assert effective("seccompProfile") == {"type": "RuntimeDefault"}
    assert ours["readOnlyRootFilesystem"] is True
    assert ours["allowPrivilegeEscalation"] is False
    assert ours["capabilities"]["drop"] == ["ALL"]
    assert ours.get("privileged", False) is False
    # The one writable place: HOME and scratch space (the image sets HOME=/tmp).
    tmp = next(m for m in container()["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in next(v for v in pod_spec()["volumes"] if v["name"] == tmp["name"])


def test_service_links_off_and_shutdown_fits_the_grace_period() -> None:
    # A Service named kv-cache-api would inject KV_CACHE_API_PORT=tcp://...: our api.port.
    assert pod_spec()["enableServiceLinks"] is False
    pre_stop = container()["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod_spec()["terminationGracePeriodSeconds"] >= max(10, pre_stop + SHUTDOWN_SECONDS + 5)


def test_one_replica_with_the_in_memory_index(tmp_path: Path) -> None:
    # Each replica would index only the engines whose connection the Service sent its way.
    if shipped_settings(tmp_path).index.backend == "memory":
        assert only(rendered(), "Deployment")["spec"]["replicas"] == 1
        pdb = only(rendered(), "PodDisruptionBudget")["spec"]
        assert "minAvailable" not in pdb, "with one replica, minAvailable blocks node drains"


def memory_bytes(quantity: str) -> int:
    """Bytes of a memory quantity in the forms the manifests use: ``512Mi``, ``1Gi``, ``4096``."""
    match = re.fullmatch(r"(\d+)([KMGT]i)?", quantity)
    assert match is not None, f"unexpected memory quantity {quantity!r}"
    number, unit = match.groups()
    return int(number) * (1 << (10 * ("KMGT".index(unit[0]) + 1)) if unit else 1)


def test_memory_fits_the_configured_index(tmp_path: Path) -> None:
    resources = container()["resources"]
    limit = memory_bytes(resources["limits"]["memory"])
    assert memory_bytes(resources["requests"]["memory"]) <= limit
    max_size = shipped_settings(tmp_path).index.max_size
    assert limit >= BASE_MEMORY + max_size * BYTES_PER_ENTRY, "raise the memory with max_size"
    assert resources["requests"]["cpu"] and resources["limits"]["cpu"]


def test_network_policy_lets_in_every_service_port_and_guards_events() -> None:
    policy = only(rendered(), "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress"]  # egress open: docs/deploy.md says why
    open_ports = {
        port["port"]: rule["from"] for rule in policy["ingress"] for port in rule["ports"]
    }
    service_ports = {port["targetPort"] for port in only(rendered(), "Service")["spec"]["ports"]}
    assert service_ports <= open_ports.keys()
    # Whoever can publish events writes into the index: only labelled vLLM pods may.
    publishers = [peer["podSelector"]["matchLabels"] for peer in open_ports["zmq"]]
    assert publishers == [{"kv-cache/publisher": "true"}]
    guide = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    assert 'kv-cache/publisher: "true"' in guide, "the vLLM example must carry the label"


def test_service_account_may_watch_pods() -> None:
    objects = rendered()
    account = only(objects, "ServiceAccount")["metadata"]["name"]
    assert pod_spec()["serviceAccountName"] == account
    assert pod_spec().get("automountServiceAccountToken", True) is True
    role, binding = only(objects, "Role"), only(objects, "RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert {"kind": "ServiceAccount", "name": account} in [
        {k: s[k] for k in ("kind", "name")} for s in binding["subjects"]
    ]
    rule = next(r for r in role["rules"] if "pods" in r["resources"])
    assert rule["apiGroups"] == [""]
    assert {"get", "list", "watch"} <= set(rule["verbs"])


def test_image_is_the_project_release() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "version"
    ]
    assert container()["image"] == f"ghcr.io/kv-cache/kv-cache:{version}"


def test_resolver_rewrites_images_like_kustomize() -> None:
    rule = {"name": "ghcr.io/kv-cache/kv-cache", "newName": "registry:5000/kv", "newTag": "2"}
    assert _retag("ghcr.io/kv-cache/kv-cache:0.1.0", rule) == "registry:5000/kv:2"
    assert _retag("ghcr.io/kv-cache/kv-cache", {"name": rule["name"], "newTag": "3"}).endswith(":3")
    assert _retag("other:1", rule) == "other:1"
    assert _retag("registry:5000/kv", {"name": "registry:5000/kv", "digest": "sha256:ab"}) == (
        "registry:5000/kv@sha256:ab"
    )
