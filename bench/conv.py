"""``python -m bench conv``: sparse 1x1 convolutions on EfficientNet-Lite0 (ImageNet weights), batch 1,
224×224, on the CPU: per-layer and whole-model speed, and fidelity to the dense model.

The model is ``zoo:efficientnet_lite0``; ``conv_sparsity`` runs with its defaults (activation-aware
scores, the layer as comparison group, compensation, the first 1x1 conv kept) at each ``--targets``
sparsity (and at ``--block`` 1×k blocks for the highest), calibrated on ``--calibration`` crops.

- **Per layer.** Each rewritten 1x1 conv on the input it gets from a real crop in the dense model:
  ``F.conv2d`` of the dense weight (oneDNN on more than one thread) against ``sparsegraph::sparse_conv1x1``
  with the layer's kept weights, called through the op (``torch.ops``, eager backend: what runs in the
  compiled model, custom-op dispatch included) and the compiled kernel alone (its binding). Neither side
  adds bias or clamp. Interleaved round by round in 6 orders of the candidates, the median of the
  orders' medians (`bench.common.compare_orders`: a call right after another candidate finds its
  weights in cache or evicted by it); the summary is Σ dense time / Σ sparse time over the layers.
  ``F.conv2d`` is also timed on one thread (batch-1 1x1 convs then take torch's own GEMM path, not
  oneDNN), and the summary gives the speed-up over the faster dense time of each layer too.
- **Whole model.** Dense eager, the dense model in onnxruntime (exported by sparsegraph), and each
  compiled sparse model (eager backend; batch norm and ReLU6 folded into the sparse ops), plus the
  highest target's compiled model in onnxruntime (a dense Conv of the pruned weights: dense speed);
  timed as the layers are.
- **Fidelity.** ``--crops`` seeded random crops of scikit-learn's two sample photographs
  (`sparsegraph.data.sample_images`: side 160–427 px, resized to 224, ImageNet-normalised; other seeds
  than the calibration crops), dense against sparse logits: top-1 agreement and mean KL(dense ‖ sparse)
  in nats. Two photographs are little data: these are many different inputs, not a labelled test set.

Every timing runs under ``torch.inference_mode()``, dense and sparse alike (how a deployed model runs:
no autograd dispatch; under ``no_grad`` each op call still passes the autograd layer).
Threads: torch's intra-op threads and onnxruntime's are both ``--threads``. The load average of the
machine before and after is written with the results: timings on a machine other work is using are
not figures.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import sparsegraph as sg
from bench.common import compare_orders, machine, machine_line, parse, parser, table, write
from sparsegraph import ir, models
from sparsegraph.codegen import cpu_kernels, use_backend
from sparsegraph.codegen.sparse_conv1x1 import OP
from sparsegraph.data.sample_images import crops
from sparsegraph.onnx_export import OnnxModel

CALIBRATION_SEED, EXAMPLE_SEED, FIDELITY_SEED = 1, 0, 2


def _compile(model, example, calibration, target: float, block: int):
    config = {"passes": ["conv_profile", {"conv_sparsity": {"target": target, "block": block}}]}
    return sg.compile(model, config, example_inputs=example, calibration=calibration, quiet=True)


def _layer_inputs(model, example) -> dict[str, torch.Tensor]:
    """The input each 1x1 conv module gets on the example, by module path."""
    seen = {}
    pointwise = [(name, m) for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)]
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: seen.__setitem__(name, i[0]))
             for name, m in pointwise]
    with torch.no_grad():
        model(*example)
    for h in hooks:
        h.remove()
    return seen


def _sparse_layers(cm) -> dict[str, tuple]:
    """``{module path: (weight, values, indices, indptr)}`` of every sparse op in the compiled graph."""
    gm = cm.graph_module
    out = {}
    for node in gm.graph.nodes:
        if node.target is OP.overload:
            weight, _, values, indices, indptr = (ir.get_attr(gm, a.target) for a in node.args[1:6])
            out[sg.meta.get(node).module_path] = (weight, values, indices, indptr)
    return out


def per_layer(model, compiled: dict, inputs: dict, args) -> list[dict]:
    weights = dict(model.named_parameters())
    rows = []
    layers = _sparse_layers(next(iter(compiled.values())))
    for path in layers:
        x = inputs[path]
        dense_w = weights[f"{path}.weight"].detach()
        candidates = {"dense": lambda x=x, w=dense_w: F.conv2d(x, w)}
        for key, cm in compiled.items():
            weight, values, indices, indptr = _sparse_layers(cm)[path]
            candidates[f"op {key}"] = (lambda x=x, a=(weight, None, values, indices, indptr):
                                       OP(x, *a, None, None))
            candidates[f"kernel {key}"] = (lambda x=x, a=(values, indices, indptr), o=weight.shape[0]:
                                           cpu_kernels.sparse_conv1x1(x, *a, None, o, None, None))
        with use_backend("eager"):
            times = compare_orders(candidates, warmup=3, repeats=args.repeats)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # oneDNN on two threads can be slower than one on convs this small
        times["dense 1 thread"] = compare_orders({"dense": candidates["dense"]}, warmup=3,
                                                 repeats=args.repeats)["dense"]
        torch.set_num_threads(threads)
        rows.append({"layer": path, "in": x.shape[1], "out": dense_w.shape[0],
                     "pixels": x.shape[2] * x.shape[3], "seconds": times})
    return rows


def whole_model(model, example, compiled: dict, args, tmp: Path) -> dict:
    dense = sg.compile(model, "dense", example_inputs=example, quiet=True)
    ort = OnnxModel(dense.export_onnx(tmp / "dense.onnx"), dense.graph_module, threads=args.threads)
    candidates = {"dense eager": lambda: model(*example), "onnxruntime dense": lambda: ort(*example)}
    for key, cm in compiled.items():
        candidates[f"sg {key}"] = lambda cm=cm: cm(*example)
    key = max(compiled)
    sparse_ort = OnnxModel(compiled[key].export_onnx(tmp / "sparse.onnx"), compiled[key].graph_module,
                           threads=args.threads)
    candidates[f"sg {key} + onnxruntime"] = lambda: sparse_ort(*example)
    with use_backend("eager"):
        return compare_orders(candidates, warmup=3, repeats=args.repeats)


def fidelity(model, compiled: dict, args) -> dict:
    images = crops(args.crops, 224, seed=FIDELITY_SEED)
    out = {}
    with torch.no_grad(), use_backend("eager"):
        dense = torch.cat([model(b) for b in images.split(50)])
        for key, cm in compiled.items():
            sparse = torch.cat([cm(b) for b in images.split(50)])
            kl = F.kl_div(sparse.log_softmax(-1), dense.log_softmax(-1), log_target=True, reduction="none")
            out[key] = {"top1_agreement": float((sparse.argmax(-1) == dense.argmax(-1)).float().mean()),
                        "mean_kl": float(kl.sum(-1).mean())}
    out["dense"] = {"mean_top1_probability": float(dense.softmax(-1).max(-1).values.mean())}
    return out


def _markdown(results: dict) -> str:
    keys, layers, whole = results["keys"], results["per_layer"], results["whole_model"]
    fid = results["fidelity"]
    lines = ["# Sparse 1x1 convolutions: EfficientNet-Lite0 on the CPU", "",
             machine_line(results["machine"]) + f" Load average (1 min) {results['load'][0]:.2f} before, "
             f"{results['load'][1]:.2f} after; per-layer repeats {results['repeats']}.", "",
             "`python -m bench conv` (bench/conv.py says how each figure is made). Batch 1, 224×224, fp32; "
             "sparsity = share of each rewritten 1x1 conv's weights that are zero; `b4` = 1×4 blocks.", ""]
    dense_total = sum(r["seconds"]["dense"] for r in layers)
    best_total = sum(min(r["seconds"]["dense"], r["seconds"]["dense 1 thread"]) for r in layers)
    summary = []
    for key in keys:
        op = sum(r["seconds"][f"op {key}"] for r in layers)
        kernel = sum(r["seconds"][f"kernel {key}"] for r in layers)
        summary.append([key, f"{op * 1e3:.2f}", f"{dense_total / op:.2f}x", f"{best_total / op:.2f}x",
                        f"{kernel * 1e3:.2f}", f"{dense_total / kernel:.2f}x"])
    lines += [f"## The {len(layers)} rewritten 1x1 convs, summed", "",
              f"F.conv2d: {dense_total * 1e3:.2f} ms on {results['machine']['threads']} threads; the faster "
              f"of that and one thread per layer: {best_total * 1e3:.2f} ms.", "",
              *table(["sparsity", "op ms", "op speed-up", "over the faster dense", "kernel ms",
                      "kernel speed-up"], summary),
              "", "Per layer (speed-up of the op over F.conv2d):", ""]
    lines += table(["layer", "C→O", "pixels", "F.conv2d µs", *keys],
                   [[r["layer"], f"{r['in']}→{r['out']}", r["pixels"], f"{r['seconds']['dense'] * 1e6:.0f}",
                     *(f"{r['seconds']['dense'] / r['seconds'][f'op {k}']:.2f}x" for k in keys)]
                    for r in layers])
    base = whole["dense eager"]
    lines += ["", "## Whole model", "",
              *table(["candidate", "ms", "vs dense eager", "vs onnxruntime dense"],
                     [[name, f"{t * 1e3:.2f}", f"{base / t:.2f}x", f"{whole['onnxruntime dense'] / t:.2f}x"]
                      for name, t in whole.items()])]
    lines += ["", f"## Fidelity to dense ({results['crops']} crops)", "",
              f"Dense model's mean top-1 probability on these crops: "
              f"{fid['dense']['mean_top1_probability']:.3f}.", "",
              *table(["sparsity", "top-1 agreement", "mean KL (nats)"],
                     [[key, f"{fid[key]['top1_agreement']:.3f}", f"{fid[key]['mean_kl']:.4f}"]
                      for key in keys])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = parser("conv", __doc__, name="conv-cpu")
    ap.add_argument("--targets", default="0.7,0.8,0.9", help="sparsities, comma-separated")
    ap.add_argument("--block", type=int, default=4,
                    help="also the highest target with 1×k blocks (1: no)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--calibration", type=int, default=64, help="calibration crops")
    ap.add_argument("--crops", type=int, default=500, help="crops for fidelity")
    args = parse(ap, argv)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    model, example = models.load("efficientnet_lite0", seed=EXAMPLE_SEED)
    calibration = [(b,) for b in crops(args.calibration, 224, seed=CALIBRATION_SEED).split(32)]
    targets = [float(t) for t in args.targets.split(",")]
    settings = [(f"{t:.0%}", t, 1) for t in targets]
    if args.block > 1:
        settings.append((f"{max(targets):.0%} b{args.block}", max(targets), args.block))
    compiled = {key: _compile(model, example, calibration, t, block) for key, t, block in settings}
    inputs = _layer_inputs(model, example)
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        layers = per_layer(model, compiled, inputs, args)
        whole = whole_model(model, example, compiled, args, Path(tmp))
    results = {"machine": machine(args.threads), "load": [load_before, os.getloadavg()[0]],
               "repeats": args.repeats, "crops": args.crops, "keys": list(compiled),
               "cpu_kernels": cpu_kernels.status(), "per_layer": layers, "whole_model": whole,
               "fidelity": fidelity(model, compiled, args),
               "densities": {k: cm.plan.passes["conv_sparsity"]["stats"]["counters"]["density"]
                             for k, cm in compiled.items()},
               "seconds": round(time.perf_counter() - start, 1)}
    write(args.out, args.name, results, _markdown(results))
    return 0
