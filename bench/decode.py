"""``python -m bench decode``: one decode step of a SwiGLU MLP with TEAL-style input sparsity.

SwiGLU ``down(silu(gate(x)) * up(x))``, d = 2048, ffn = 5632, batch 1, one token, fp32 (CPU) or fp16
(GPU). sparsegraph compiles it with the ``llm-activation-sparsity`` pipeline: 50% of the inputs of all
three projections are skipped (thresholds calibrated on random hidden states and the MLP's own
intermediate activations), and each projection becomes ``sparsegraph::sparse_linear`` whose kernels
read only the weight rows of the surviving inputs. The bound is 2x: half the weight bytes.

Candidates, same inputs and threads, interleaved: the dense module (eager; cuBLAS/MKL GEMV), the same
module through sparsegraph with no passes (the traced graph), and the sparse compile.
"""

from __future__ import annotations

import argparse

import torch

import sparsegraph as sg
from bench.common import machine, machine_line, table, write
from sparsegraph.codegen import use_backend
from sparsegraph.measure import compare


class SwiGLU(torch.nn.Module):
    def __init__(self, d: int, ffn: int):
        super().__init__()
        self.gate = torch.nn.Linear(d, ffn, bias=False)
        self.up = torch.nn.Linear(d, ffn, bias=False)
        self.down = torch.nn.Linear(ffn, d, bias=False)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench decode", description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = SwiGLU(args.d, args.ffn).eval()
        calibration = [(torch.randn(8, 16, args.d),) for _ in range(4)]
        x = torch.randn(1, 1, args.d)
    cm = sg.compile(model, "llm-activation-sparsity", example_inputs=(x,), calibration=calibration,
                    quiet=True)
    traced = sg.compile(model, "dense", example_inputs=(x,), quiet=True)
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(cm(x).flatten(), model(x).flatten(), dim=0).item()
    model, cm, traced = (m.to(device, dtype) for m in (model, cm, traced))
    x = x.to(device, dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    backend = "triton" if device == "cuda" else "eager"

    def run(fn):
        def call():
            fn()
            sync()
        return call

    def sparse():
        with use_backend(backend):
            cm(x)

    times = compare({"dense eager": run(lambda: model(x)), "traced dense": run(lambda: traced(x)),
                     f"sparse ({backend})": run(sparse)}, warmup=args.warmup, repeats=args.repeats)
    base = times["dense eager"]
    results = {"machine": machine(args.threads), "settings": vars(args), "device": device,
               "dtype": str(dtype), "ms": {k: v * 1e3 for k, v in times.items()},
               "speedup": {k: base / v for k, v in times.items()}, "cosine_to_dense": cos}
    rows = [[k, f"{v * 1e3:.2f}", f"{base / v:.2f}"] for k, v in times.items()]
    md = "\n".join([machine_line(results["machine"]),
                    f"SwiGLU d={args.d}, ffn={args.ffn}, batch 1, one token, {dtype}, {device}; 50% of the "
                    f"inputs of gate, up and down skipped; median of {args.repeats} interleaved rounds "
                    f"after {args.warmup} warm-up. Cosine of the sparse output to dense: {cos:.4f}.", "",
                    *table(["candidate", "ms", "speed-up vs dense eager"], rows), ""])
    write(args.out, args.name or f"decode-{device}", results, md)
    return 0
