"""``python -m bench activation``: MiniLM activation sparsity, fidelity curves and speed, in one run.

Real MiniLM-L6 weights; calibration on 256 standard-library docstring sentences, evaluation on 300
held-out sentences that calibration never sees (`sparsegraph.data.stdlib_text`). Fidelity is the
mean cosine of the sentence embeddings to the dense model's; "skipped" is the fraction of MLP
activations actually skipped on the held-out tokens (padding excluded), measured, not the target.

Speed: batch 1, sequence 128, same inputs and threads, interleaved rounds, median: dense eager; the
traced dense graph; static pruning and dynamic sparsity (eager); dense and pruned ONNX in onnxruntime.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import sparsegraph as sg
from bench.common import machine, machine_line, parse, parser, table, write
from sparsegraph import models
from sparsegraph.codegen.sparse_linear import OP
from sparsegraph.data.stdlib_text import sentences
from sparsegraph.measure import compare, cosine
from sparsegraph.onnx_export import OnnxModel

TARGETS = (0.3, 0.5, 0.6, 0.7, 0.9)
METHODS = ("magnitude", "centred", "topk", "core")
PRUNE = (0.25, 0.5)


def main(argv: list[str] | None = None) -> int:
    ap = parser("activation", __doc__, name="activation-cpu")
    ap.add_argument("--calibration", type=int, default=256)
    ap.add_argument("--heldout", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--no-speed", action="store_true", help="fidelity curves only")
    args = parse(ap, argv)
    model, example = models.load("minilm", seq_len=128, batch=1)
    texts = sentences("calibration", limit=args.calibration)
    calibration = [model.tokenize(texts[i:i + 32], max_length=128) for i in range(0, len(texts), 32)]
    heldout = model.tokenize(sentences("heldout", limit=args.heldout), max_length=128)
    with torch.inference_mode():
        dense = model(*heldout)

    def build(passes):
        return sg.compile(model, {"passes": ["activation_profile", *passes]}, example_inputs=example,
                          calibration=calibration, quiet=True)

    curve = []
    for method in args.methods:
        for target in TARGETS:
            cm = build([{"neuron_sparsity": {"target": target, "method": method}}])
            curve.append({"method": method, "target": target, **evaluate(cm, heldout, dense)})
            print(curve[-1], flush=True)
    for fraction in PRUNE:
        cm = build([{"neuron_pruning": {"fraction": fraction}}])
        curve.append({"method": "static pruning (energy, compensated)", "target": fraction,
                      "skipped": fraction, "cosine": cosine(cm(*heldout), dense)})
        print(curve[-1], flush=True)

    if args.no_speed:
        results = {"machine": machine(args.threads), "settings": vars(args), "curve": curve}
        write(args.out, args.name, results, markdown(results, None))
        return 0
    pruned = build([{"neuron_pruning": {"fraction": 0.5}}])
    dynamic = build([{"neuron_sparsity": {"target": 0.5, "method": "centred"}}])
    traced = sg.compile(model, "dense", example_inputs=example, quiet=True)
    with tempfile.TemporaryDirectory() as tmp:
        ort_dense = OnnxModel(traced.export_onnx(Path(tmp) / "d.onnx"), traced.graph_module,
                              threads=args.threads)
        ort_pruned = OnnxModel(pruned.export_onnx(Path(tmp) / "p.onnx"), pruned.graph_module,
                               threads=args.threads)
        fidelity = {"pruned 50% (ORT)": cosine(ort_pruned(*heldout), dense),
                    "dense (ORT)": cosine(ort_dense(*heldout), dense)}
        times = compare({
            "dense eager": lambda: model(*example),
            "traced dense (sg, eager)": lambda: traced(*example),
            "pruned 50% (sg, eager)": lambda: pruned(*example),
            "centred 50% (sg, eager)": lambda: dynamic(*example),
            "dense (ORT)": lambda: ort_dense(*example),
            "pruned 50% (ORT)": lambda: ort_pruned(*example),
        }, warmup=3, repeats=args.repeats)
    with torch.inference_mode():
        fidelity.update({"dense eager": 1.0, "traced dense (sg, eager)": cosine(traced(*heldout), dense),
                         "pruned 50% (sg, eager)": cosine(pruned(*heldout), dense),
                         "centred 50% (sg, eager)": cosine(dynamic(*heldout), dense)})
    results = {"machine": machine(args.threads), "settings": vars(args), "curve": curve,
               "speed_ms": {k: v * 1e3 for k, v in times.items()}, "fidelity": fidelity}
    write(args.out, args.name, results, markdown(results, times))
    return 0


def evaluate(cm, heldout, dense) -> dict:
    """Cosine to dense, and the fraction of down-projection inputs skipped on held-out (non-padding) tokens.

    Counted inside the sparse_linear CPU kernel on the held-out run; core mode keeps k of I inputs per
    sequence by construction.
    """
    kept, total = [], []
    mask = heldout[1].bool()

    def count(fn):
        def wrapper(x, w_t, bias, centre, threshold, k):
            a = x if centre is None else x - centre
            keep = a.abs().topk(k, -1).values[..., -1:] <= a.abs() if k > 0 else a.abs() > threshold
            kept.append(int(keep[mask].sum()))
            total.append(int(mask.sum()) * x.shape[-1])
            return fn(x, w_t, bias, centre, threshold, k)
        return wrapper

    original = OP.cpu
    OP.cpu = count(original)
    try:
        with torch.inference_mode():
            out = cm(*heldout)
    finally:
        OP.cpu = original
    if not total:  # core mode (core_linear): k of I inputs per sequence, by construction
        site = next(s for s in cm.plan.model["sites"] if s["kind"] == "mlp")
        k = next(iter(cm.plan.sites.values()))["neuron_sparsity"]["decision"]["down_input"]["k"]
        return {"skipped": 1 - k / site["intermediate"], "cosine": cosine(out, dense)}
    return {"skipped": 1 - sum(kept) / max(sum(total), 1), "cosine": cosine(out, dense)}


def markdown(results: dict, times: dict) -> str:
    s = results["settings"]
    rows = [[r["method"], r["target"], f"{r['skipped']:.3f}", f"{r['cosine']:.4f}"] for r in results["curve"]]
    lines = [
        machine_line(results["machine"]), "",
        f"MiniLM-L6 (real weights). Calibration: {s['calibration']} stdlib docstring sentences; evaluation: "
        f"{s['heldout']} held-out sentences; cosine = mean cosine of sentence embeddings to dense; skipped = "
        "fraction of MLP activations skipped on held-out tokens (measured).", "",
        "### Fidelity", "", *table(["method", "target", "skipped", "cosine"], rows), ""]
    if times is None:
        return "\n".join(lines)
    base = times["dense eager"]
    speed = [[k, f"{v * 1e3:.1f}", f"{base / v:.2f}", f"{results['fidelity'][k]:.4f}"]
             for k, v in times.items()]
    return "\n".join([*lines,
        f"### Speed, batch 1, sequence 128 (median of {s['repeats']} interleaved rounds)", "",
        *table(["candidate", "ms", "speed-up vs dense eager", "cosine"], speed), ""])
