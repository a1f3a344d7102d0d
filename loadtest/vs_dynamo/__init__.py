"""Benchmark: our daemon against NVIDIA Dynamo's standalone KV indexer, side by side.

Run: ``.venv/bin/python -m loadtest.vs_dynamo [--runs N] [--quick] [--check-prompts N]
[--no-replay] [--dynamo-threads N] [--wait-quiet SECONDS] [--ours-root DIR] [--keep-logs DIR]
[--no-save]`` (``--help`` says what each does). The report goes to
``loadtest/results/vs_dynamo.md`` and ``.json`` (``vs_dynamo-quick.*`` with ``--quick``)
and the target table to stdout; every figure is the median of N runs (default 3).

8 engine pods, each a process running vLLM 0.33's own ``ZmqEventPublisher`` (from the
released wheel, without torch), publish map-form ``BlockStored`` events of 16 blocks with
real vLLM block hashes; our daemon (``python -m service serve``, connect mode) and Dynamo's
indexer (``python -m dynamo.indexer``, pods registered over HTTP) both connect to all 8.
Phase 1 publishes 100,000 blocks at full speed, phase 2 300,000 more; then every pod's
answer for a sample of stored prompts is checked against what the pods stored; then a
512-block prompt is queried (Dynamo HTTP, our REST and gRPC) by 1 and 8 client processes,
idle and while the pods store 100,000 blocks/s. All of it runs in a network namespace with
only ``lo``.

Modules, one job each:

- ``workload``: prompts, events, the pods' plan per phase, and the reference answers.
- ``vllm_loader``: vLLM's publisher and hash, imported from the wheel without torch.
- ``publishers``: the pod processes.
- ``indexers``, ``ours``, ``dynamo``: the indexers under test as subprocesses.
- ``clients``: the HTTP and gRPC query clients and the latency cells.
- ``procs``: ports, /proc readings, subprocess lifetime.
- ``visibility``: when an indexer's answers show what the pods published.
- ``measure``: one run, step by step.
- ``verdicts``: medians over runs, ratios, targets met or missed; ``report``: the Markdown.
- ``install``: the Dynamo and vLLM venvs; ``cli``: the command.
"""
