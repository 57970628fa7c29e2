"""Benchmarks: speed claimed as same-run ratios (see bench/run.py)."""
