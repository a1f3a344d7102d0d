# syntax=docker/dockerfile:1
# The kv-cache image. Build: docker build -t kv-cache:dev .   (docker/README.md)

ARG PYTHON_IMAGE=python:3.11-slim

# --- builder: the install steps of `make` (Makefile, the $(STAMP) target) without the dev
# extras and the editable install: a venv, pip upgraded, then the project.
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
# The native data plane's build (setup.py, scripts/native_deps.sh): a C++ compiler and the
# headers of xxhash (compiled in), ZeroMQ, OpenSSL and gRPC, whose shared libraries the
# runtime stage installs. Versions follow the base image's Debian release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        g++ libc6-dev libxxhash-dev libzmq3-dev libssl-dev libgrpc++-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/kv-cache
COPY pyproject.toml setup.py README.md ./
COPY native/ ./native/
COPY service/ ./service/
# pip compiles every installed module, so the runtime never writes bytecode.
RUN /opt/kv-cache/bin/pip install --quiet --upgrade pip \
    && /opt/kv-cache/bin/pip install --quiet .

# --- runtime: the same base (the venv's python links to it), the venv and the default config.
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="kv-cache" \
      org.opencontainers.image.description="KV-cache-aware routing service for vLLM" \
      org.opencontainers.image.licenses="Apache-2.0"
# Read-only root filesystem: no bytecode writes, and HOME (tokenizer caches, scratch) is
# /tmp, the one writable place (an emptyDir in Kubernetes, --tmpfs /tmp with docker run).
ENV PATH=/opt/kv-cache/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
# The shared libraries service._dataplane links: ZeroMQ, OpenSSL's libcrypto, gRPC.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libzmq5 libssl3 libgrpc++1.51 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /opt/kv-cache /opt/kv-cache
# The default configuration; Kubernetes mounts the kv-cache-config ConfigMap over it.
COPY docker/config.yaml /etc/kv-cache/config.yaml
# Numeric, so Kubernetes' runAsNonRoot can check it without a passwd entry.
USER 65532:65532
# HTTP (REST, /metrics, /healthz, /readyz), gRPC, ZeroMQ events (bind mode).
EXPOSE 8080 9090 5555
ENTRYPOINT ["kv-cache"]
CMD ["serve", "--config", "/etc/kv-cache/config.yaml"]
