"""Throughput and memory benchmarks (not tests): run them as scripts, e.g. `python benchmarks/step.py`."""
