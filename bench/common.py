"""What every bench suite shares: its command line's common options, the machine's description and writing
results as JSON + markdown."""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
from pathlib import Path

import torch

from sparsegraph.measure import compare


def parser(suite: str, doc: str, name: str | None) -> argparse.ArgumentParser:
    """The suite's argument parser with the options every suite has: ``--threads`` (intra-op threads,
    default 2: the machine the tables are measured on), ``--out`` (the results folder) and ``--name`` (the
    results' file stem; `name` is the default, None where the suite derives it from other options)."""
    summary = " ".join(doc.strip().split("\n\n")[0].split())  # the docstring's first paragraph
    ap = argparse.ArgumentParser(prog=f"python -m bench {suite}", description=summary)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--name", default=name, help="file stem of the JSON and markdown results")
    return ap


def parse(ap: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse `argv` and set torch's intra-op threads to ``--threads``."""
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args


def machine(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    return {"cpu": cpu, "logical_cores": torch.multiprocessing.cpu_count(), "threads": threads,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version()}


def machine_line(m: dict) -> str:
    return (f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, {m['threads']} threads, "
            f"GPU: {m['gpu'] or 'none'}; torch {m['torch']}, onnxruntime {m['onnxruntime']}.")


def write(out: str, name: str, results: dict, markdown: str) -> None:
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    (path / f"{name}.md").write_text(markdown)
    print(markdown)


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def compare_orders(calls: dict, warmup: int, repeats: int, orders: int = 6) -> dict[str, float]:
    """Median seconds per call: `compare` (interleaved rounds) in `orders` orders of the candidates (the
    given one, then seeded shuffles), the median of the orders' medians. A call runs slower right after
    a heavy one (its caches and branch predictors cold: 14.6 → 19.6 µs at 256 → 688 after
    embedding_bag), so no candidate always follows the same one."""
    names, shuffle = list(calls), random.Random(0)
    rounds = max(3, math.ceil(repeats / orders))
    medians: dict[str, list[float]] = {name: [] for name in names}
    for n in range(orders):
        order = names if n == 0 else shuffle.sample(names, len(names))
        times = compare({name: calls[name] for name in order}, warmup=warmup if n == 0 else 1, repeats=rounds)
        for name, t in times.items():
            medians[name].append(t)
    return {name: statistics.median(t) for name, t in medians.items()}
