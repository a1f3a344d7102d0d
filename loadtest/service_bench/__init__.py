"""Benchmark: the running daemon -- query latency, event-to-visible lag, memory.

Run: ``.venv/bin/python -m loadtest.bench_service [--quick] [--rss-10m | --no-rss-10m]
[--no-ramp] [--no-pin] [--out DIR] [--json FILE]`` (``--rate``, ``--events-per-batch``,
``--max-size``, ``--ramp-lag`` change the load; docs/performance.md has the figures and how
to read them). The report goes to stdout and to ``loadtest/results/service.md`` and
``service.json`` (``service-quick.*`` with ``--quick``; ``--no-save`` writes nothing).

Starts ``python -m service serve`` as a subprocess on 127.0.0.1 (free ports, ZeroMQ bind
mode, ``index.max_size`` 16M so nothing is evicted) and drives it like a deployment:

- 8 publisher *processes*, each a stand-in vLLM engine (an XPUB socket connecting to the
  daemon's bound SUB, topic ``kv@<pod>@<model>``, sequence numbers from 0, vLLM 0.23
  array-form batches of 32-block ``BlockStored`` events, byte-identical to
  ``tests.support.vllm_wire.encode_batch``). Each first stores a prefix of the query prompt
  (512, 448, ... 64 of its 512 blocks), so every query matches on all 8 pods.
- Memory: the publishers fill the index as fast as the daemon applies (bursts, windowed on
  ``kv_cache_events_received_total``) to 100k and 1M entries, and (full mode, or
  ``--rss-10m``) to 10M entries after every other phase; RSS from ``/proc/<pid>/status``.
- Query latency of an 8192-token prompt (block size 16: 512 blocks), at concurrency 1, 16
  and 64 (in-flight requests from one asyncio client), idle and while the publishers together
  publish ~100k blocks/s (paced): gRPC ``KVCacheService/Locality`` over one ``grpc.aio``
  channel; REST ``POST /v1/locality`` over a keep-alive ``httpx.AsyncClient``; and REST
  again over a minimal keep-alive HTTP/1.1 client (``rest-raw``), to tell httpx's own
  cost from the server's. Client-observed percentiles, the service's own
  ``kv_cache_query_duration_seconds``, and CPU per request of the daemon and the client.
- Ingest ramp: the publishers offer 50k, 100k, 150k, ... blocks/s (paced, no queries) and
  each step's visible lag is read from the histogram; the ramp stops at the first step whose
  lag p99 passes 5 ms (``--ramp-lag``), where the daemon applied < 95% of the offer, dropped
  batches or did not drain its backlog within 10 s. The result: the highest rate sustained.
- Lag: ``kv_cache_event_visible_lag_seconds`` (engine batch ts -> applied), quantiles
  interpolated within histogram buckets, over stretches of ingest without queries and during
  each query cell; and a direct probe: publish a marker block, poll ``/v1/locality`` (raw
  client) until it shows, a few dozen times.

The machine has 2 cores for the daemon, the publishers and the client: by default the
daemon (all its threads) is pinned to the last CPU and this process and the publishers to
the others (``--no-pin`` leaves it to the kernel). Progress (phase lines and tqdm bars) goes
to stderr, the report (Markdown) to stdout and ``loadtest/results/``. The daemon is always
stopped (SIGTERM) at the end.

Modules:

- ``workload``: the prompt, the pods, and the vLLM batches the engines publish.
- ``daemon``: the daemon subprocess, CPU pinning, and CPU and memory readings from /proc.
- ``publishers``: the publisher processes (preload, bursts, paced load).
- ``metrics``: ``/metrics`` snapshots and quantiles (samples and histogram buckets).
- ``clients``: the gRPC, httpx and minimal HTTP query clients.
- ``probe``: the marker probe of event-to-visible lag.
- ``results``: what is measured; ``report``: the Markdown report; ``progress``: stderr.
- ``plan``: full and quick; ``runner``: the phases (fill, latency idle and under load,
  lag, ingest ramp, fill to 10M); ``cli``: ``main``.
"""
