"""Load tools: simulators, load generators and benchmarks (run with python -m)."""
