"""``python -m bench recover``: what a short distillation (`sparsegraph.recover`) wins back of what one-shot
weight pruning loses, on MiniLM.

Pipelines: static neuron removal (``neuron-pruning``) at 25% and 50% of every MLP's neurons, and 2:4
weights on the MLP linears (``nm-2-4``). Each is compiled once (calibration: ``--calibration``
standard-library sentences in batches of 16), measured one-shot, then recovered for ``--steps`` Adam steps
at peak learning rate ``--lr`` on the same calibration batches (final-output MSE to dense, normalised by
the dense output's variance, plus ``--layers`` times the same on every MLP site's output; masks fixed) and
measured again. Figures on ``--unseen`` held-out sentences
(modules never used for calibration): mean and worst cosine of the sentence embeddings to dense. The load
average at the start and end is recorded: recovery times are only comparable on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import sparsegraph as sg
from bench.common import machine, machine_line, table, write
from sparsegraph import models, pipelines
from sparsegraph.data.stdlib_text import sentences

BATCH = 16


def configs() -> dict[str, dict]:
    """The pipelines measured, by label."""
    out = {}
    for fraction in (0.25, 0.5):
        config = pipelines.get("neuron-pruning")
        config["passes"] = [{"neuron_pruning": {"fraction": fraction}} if _name(p) == "neuron_pruning" else p
                            for p in config["passes"]]
        out[f"neuron-pruning {fraction:.0%}"] = config
    out["nm-2-4 (MLPs)"] = pipelines.get("nm-2-4")
    return out


def _name(entry) -> str:
    return entry if isinstance(entry, str) else next(iter(entry))


def cosines(fn, batches, dense) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([torch.nn.functional.cosine_similarity(fn(*b), d, dim=-1)
                          for b, d in zip(batches, dense)])


def run(args) -> list[dict]:
    model, example = models.load("minilm", seq_len=128, batch=BATCH)
    texts = sentences("calibration", limit=args.calibration)
    calibration = [model.tokenize(texts[i:i + BATCH], max_length=128) for i in range(0, len(texts), BATCH)]
    held = sentences("heldout", limit=args.unseen)
    unseen = [model.tokenize(held[i:i + 32], max_length=128) for i in range(0, len(held), 32)]
    with torch.inference_mode():
        dense = [model(*b) for b in unseen]
    rows = []
    for label, config in configs().items():
        cm = sg.compile(model, config, example_inputs=example, calibration=calibration, quiet=True)
        one_shot = cosines(cm, unseen, dense)
        started = time.perf_counter()
        rc = sg.recover(cm, calibration, steps=args.steps, lr=args.lr, seed=args.seed, layers=args.layers,
                        quiet=False)
        seconds = time.perf_counter() - started
        after = cosines(rc, unseen, dense)
        result = rc.plan.passes["recover"]["summary"]["runs"][-1]
        rows.append({"pipeline": label, "one_shot_mean": one_shot.mean().item(),
                     "one_shot_worst": one_shot.min().item(), "recovered_mean": after.mean().item(),
                     "recovered_worst": after.min().item(), "loss_before": result["loss_before"],
                     "loss_after": result["loss_after"], "parameters": result["parameters"],
                     "recover_s": seconds})
        print(rows[-1], flush=True)
    return rows


def _markdown(rows: list[dict], args, load: tuple[float, float]) -> str:
    body = [[r["pipeline"], f"{r['one_shot_mean']:.4f}", f"{r['one_shot_worst']:.4f}",
             f"{r['recovered_mean']:.4f}", f"{r['recovered_worst']:.4f}",
             f"{r['loss_before']:.4f} → {r['loss_after']:.4f}", f"{r['parameters'] / 1e6:.2f} M",
             f"{r['recover_s']:.0f}"] for r in rows]
    return "\n".join([
        "# Recovery: one-shot vs after a short distillation toward dense", "",
        f"MiniLM-L6 (pretrained); calibration {args.calibration} sentences in batches of {BATCH} (also the "
        f"recovery data); recovery {args.steps} Adam steps, peak lr {args.lr:g} (cosine decay), layer-wise "
        f"weight {args.layers:g}, seed {args.seed}; figures on {args.unseen} held-out sentences of modules "
        f"never calibrated on: cosine of the sentence embeddings to dense. Load average {load[0]:.2f} at the "
        f"start, {load[1]:.2f} at the end.", "",
        *table(["pipeline", "one-shot mean cosine", "one-shot worst", "recovered mean cosine",
                "recovered worst", "calibration loss (mse/var)", "trained", "recover s"], body), ""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench recover", description=__doc__.splitlines()[0])
    ap.add_argument("--calibration", type=int, default=1024)
    ap.add_argument("--unseen", type=int, default=512)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--lr", type=float, default=8e-4)
    ap.add_argument("--layers", type=float, default=1.0, help="weight of the layer-wise (MLP outputs) term")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--name", default="recover-cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    start_load = os.getloadavg()[0]
    rows = run(args)
    load = (start_load, os.getloadavg()[0])
    info = machine(args.threads)
    write(args.out, args.name, {"machine": info, "settings": vars(args), "load_average": load, "rows": rows},
          _markdown(rows, args, load) + "\n" + machine_line(info) + "\n")
    return 0
