"""``python -m bench foundation``: dense eager vs torch.compile vs ONNX Runtime vs sparsegraph, as
same-run ratios.

For each workload (model, batch, sequence) every candidate runs on the same inputs with the same
thread count (torch intra-op threads = onnxruntime intra-op threads = ``--threads``), after warm-up,
interleaved round by round, and the median of ``--repeats`` rounds is reported. Ratios are speed-ups
over dense PyTorch eager measured in the same run; absolute times vary with the machine's load.

Candidates: ``eager`` (the user's model), ``torch.compile`` (default inductor backend; compile time
excluded, reported separately), ``onnxruntime`` (the dense traced graph exported by sparsegraph),
and for each ``--pipeline``: ``sg:<pipeline>`` (compiled, eager backend) and ``sg:<pipeline>+ort``.

Writes ``<out>/<name>.json`` and ``<out>/<name>.md`` (the table, with the machine named).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

import sparsegraph as sg
from bench.common import machine, machine_line, parse, parser, write
from sparsegraph import models
from sparsegraph.measure import compare
from sparsegraph.onnx_export import OnnxModel

WORKLOADS = {
    "minilm-s128": ("minilm", {"seq_len": 128, "batch": 1}),
    "minilm-s512": ("minilm", {"seq_len": 512, "batch": 1}),
    "vit_b_16-b1": ("vit_b_16", {}),
}


def main(argv: list[str] | None = None) -> int:
    ap = parser("foundation", __doc__, name="foundation-cpu")
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--pipelines", nargs="*", default=[], help="sparsegraph pipelines to add as candidates")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to compile)")
    args = parse(ap, argv)
    results = {"machine": machine(args.threads), "settings": vars(args), "workloads": {}}
    for workload in args.workloads:
        print(f"== {workload}", flush=True)
        results["workloads"][workload] = run_workload(workload, args)
    write(args.out, args.name, results, markdown(results))
    return 0


def run_workload(workload: str, args) -> dict:
    name, options = WORKLOADS[workload]
    model, example = models.load(name, **options)
    candidates = {"eager": lambda: model(*example)}
    notes: dict[str, float] = {}
    if not args.no_compile:
        compiled = torch.compile(model)
        start = time.perf_counter()
        with torch.inference_mode():
            compiled(*example)
        notes["torch.compile seconds to compile"] = time.perf_counter() - start
        candidates["torch.compile"] = lambda: compiled(*example)
    tmp = tempfile.TemporaryDirectory(prefix="sg-bench-")
    dense = sg.compile(model, "dense", example_inputs=example, quiet=True)
    ort = OnnxModel(dense.export_onnx(Path(tmp.name) / "dense.onnx"), dense.graph_module,
                    threads=args.threads)
    candidates["onnxruntime"] = lambda: ort(*example)
    for pipeline in args.pipelines:
        cm = sg.compile(model, pipeline, example_inputs=example, quiet=True)
        cm_ort = OnnxModel(cm.export_onnx(Path(tmp.name) / f"{pipeline}.onnx"), cm.graph_module,
                           threads=args.threads)
        candidates[f"sg:{pipeline}"] = lambda cm=cm: cm(*example)
        candidates[f"sg:{pipeline}+ort"] = lambda o=cm_ort: o(*example)
    times = compare(candidates, warmup=args.warmup, repeats=args.repeats)
    tmp.cleanup()
    shapes = [list(x.shape) for x in example]
    return {"model": name, "inputs": shapes, "ms": {k: v * 1e3 for k, v in times.items()},
            "speedup_vs_eager": {k: times["eager"] / v for k, v in times.items()}, "notes": notes}


def markdown(results: dict) -> str:
    lines = [machine_line(results["machine"]),
             f"Median of {results['settings']['repeats']} interleaved rounds after "
             f"{results['settings']['warmup']} warm-up rounds; speed-up = eager time / candidate time, "
             "same run.", ""]
    for workload, r in results["workloads"].items():
        lines += [f"### {workload} (inputs {r['inputs']})", "", "| candidate | ms | speed-up vs eager |",
                  "|---|---|---|"]
        lines += [f"| {k} | {v:.1f} | {r['speedup_vs_eager'][k]:.2f} |" for k, v in r["ms"].items()]
        lines += [f"\n{k}: {v:.1f}" for k, v in r["notes"].items()] + [""]
    return "\n".join(lines)


