"""Routing quality on simulated vLLM engines: ``python -m loadtest.sim [--quick]``.

- ``chain``: token ids and vLLM's chained block hashes of a growing context.
- ``cache``: an engine's prefix cache with vLLM's block-pool semantics.
- ``engine``: a simulated engine (cache, FIFO prefill queue, service-time model).
- ``publisher``: an engine's ZeroMQ PUB and replay ROUTER, in vLLM's wire format.
- ``daemon``: the real kv-cache daemon as a subprocess, queried over gRPC.
- ``workloads``: chat, RAG, agentic, control and JSONL-trace sessions.
- ``routers``: round-robin, random, approximate, precise (this service), oracle.
- ``simulator``: the discrete-event loop and its results; ``report``: table and charts.
"""
