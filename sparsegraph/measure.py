"""Measuring speed and fidelity the same way everywhere (CLI demo, bench, docs).

`median_seconds` times a call after warm-up and returns the median of repeats (medians resist the
noise of a shared machine). `compare` times several callables on the same inputs, interleaving them
round by round so that drift in machine load hits every candidate alike; ratios come from one run.
`cosine` is the mean cosine similarity of rows, the fidelity figure for embeddings and logits.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_seconds(fn: Callable[[], object], warmup: int = 2, repeats: int = 7) -> float:
    return compare({"fn": fn}, warmup, repeats)["fn"]


def compare(candidates: dict[str, Callable[[], object]], warmup: int = 2,
            repeats: int = 7) -> dict[str, float]:
    """Median seconds of each candidate; one call of each per round, rounds interleaved."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in candidates.values():
                fn()
        for _ in range(repeats):
            for name, fn in candidates.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of cos(a_i, b_i), rows being all leading dimensions flattened."""
    a, b = a.detach().float().flatten(0, -2), b.detach().float().flatten(0, -2)
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item()
