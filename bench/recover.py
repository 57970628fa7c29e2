"""``python -m bench recover``: what a short distillation (`sparsegraph.recover`) wins back of what one-shot
weight pruning loses, on MiniLM.

Pipelines: static neuron removal (``neuron-pruning``) at 25% and 50% of every MLP's neurons, and 2:4 weights
on the MLP linears (``nm-2-4``), one-shot, with ``schedule: progressive`` (the mask tightens dense → 3:4
→ 2:4 over the first half of the recovery steps; its one-shot figures are those of ``nm-2-4``) and with
``score: activation`` (Wanda's |W|·rms of the input feature, from ``linear_profile``). Each is
compiled once (calibration: ``--calibration`` standard-library sentences in batches of 16), measured
one-shot, then recovered for ``--steps`` Adam steps at peak learning rate ``--lr`` on the same calibration
batches (final-output MSE to dense, normalised by the dense output's variance, plus ``--layers`` times the
same on every MLP site's output; masks fixed) and measured again. Figures on ``--unseen`` held-out sentences
(modules never used for calibration): mean and worst cosine of the sentence embeddings to dense. The load
average at the start and end is recorded: recovery times are only comparable on a quiet machine.

EfficientNet-Lite0 (ImageNet weights) with ``conv_sparsity`` at 80% and 90% of its 1x1 conv weights (the
defaults otherwise: activation-aware scores, compensation, batch norm and ReLU6 folded), calibrated and
recovered (``--image-steps`` steps, peak lr ``--image-lr``, final-logit loss plus ``--image-layers`` times the
same on every 1x1 conv site's output) on ``--image-train`` crops in
batches of ``IMAGE_BATCH``, measured on ``--image-unseen`` held-out crops: top-1 agreement with dense and
mean KL(dense ‖ sparse) in nats. Training and held-out crops come from disjoint pixels: training crops
from the left ``SPLIT_COLUMN`` columns of the two sample photographs, held-out ones from the columns right
of it (`region_crops`), each a seeded square of side 160–320 px resized to 224. Random crops of the
whole photographs with different seeds would overlap the training pixels.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

import sparsegraph as sg
from bench.common import machine, machine_line, parse, parser, table, write
from sparsegraph import models, pipelines
from sparsegraph.data import sample_images
from sparsegraph.data.stdlib_text import sentences

BATCH = 16
IMAGE_BATCH = 8
SPLIT_COLUMN = 320  # the sample photographs are 427 x 640: training crops left of it, held-out right
IMAGE_TARGETS = (0.8, 0.9)


def configs() -> dict[str, dict]:
    """The pipelines measured, by label."""
    out = {}
    for fraction in (0.25, 0.5):
        config = pipelines.get("neuron-pruning")
        config["passes"] = [{"neuron_pruning": {"fraction": fraction}} if _name(p) == "neuron_pruning" else p
                            for p in config["passes"]]
        out[f"neuron-pruning {fraction:.0%}"] = config
    out["nm-2-4 (MLPs)"] = pipelines.get("nm-2-4")
    progressive = pipelines.get("nm-2-4")
    progressive["passes"] = [{"nm_weights": {**p["nm_weights"], "schedule": "progressive"}}
                             if _name(p) == "nm_weights" else p for p in progressive["passes"]]
    out["nm-2-4 progressive (MLPs)"] = progressive
    wanda = pipelines.get("nm-2-4")
    wanda["passes"] = ["linear_profile", *({"nm_weights": {**p["nm_weights"], "score": "activation"}}
                                           if _name(p) == "nm_weights" else p for p in wanda["passes"])]
    out["nm-2-4 activation-aware (MLPs)"] = wanda
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
        if args.only and not any(o in label for o in args.only):
            continue
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
                     "steps": args.steps, "data": f"{args.calibration} sentences", "recover_s": seconds})
        print(rows[-1], flush=True)
    return rows


def region_crops(n: int, seed: int, held_out: bool, size: int = 224, min_side: int = 160) -> torch.Tensor:
    """`n` ImageNet-normalised seeded crops [n, 3, size, size] of the sample photographs, from the columns
    left of `SPLIT_COLUMN` (training) or from those right of it (`held_out`): the two sets share no pixel.
    Otherwise drawn as `sample_images.crops` draws (image, side, place, flip)."""
    images = tuple(im[:, :, SPLIT_COLUMN:] if held_out else im[:, :, :SPLIT_COLUMN]
                   for im in sample_images._images())
    return sample_images.crops(n, size, seed, min_side, images=images)


def agreement(fn, images: torch.Tensor, dense: torch.Tensor) -> tuple[float, float]:
    """Top-1 agreement with `dense` logits and mean KL(dense ‖ ours) in nats, over `images` in chunks."""
    with torch.inference_mode():
        ours = torch.cat([fn(b) for b in images.split(50)])
    kl = F.kl_div(ours.log_softmax(-1), dense.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    return float((ours.argmax(-1) == dense.argmax(-1)).float().mean()), float(kl.mean())


def run_images(args) -> list[dict]:
    model, example = models.load("efficientnet_lite0")
    train = region_crops(args.image_train, seed=1, held_out=False)
    calibration = [(train[i:i + IMAGE_BATCH],) for i in range(0, len(train), IMAGE_BATCH)]
    unseen = region_crops(args.image_unseen, seed=2, held_out=True)
    with torch.inference_mode():
        dense = torch.cat([model(b) for b in unseen.split(50)])
    rows = []
    for target in IMAGE_TARGETS:
        label = f"efficientnet-lite0 1x1 convs {target:.0%}"
        if args.only and not any(o in label for o in args.only):
            continue
        config = {"passes": ["conv_profile", {"conv_sparsity": {"target": target}}]}
        cm = sg.compile(model, config, example_inputs=example, calibration=calibration, quiet=True)
        top1, kl = agreement(cm, unseen, dense)
        started = time.perf_counter()
        rc = sg.recover(cm, calibration, steps=args.image_steps, lr=args.image_lr, seed=args.seed,
                        layers=args.image_layers, quiet=False)
        seconds = time.perf_counter() - started
        top1_after, kl_after = agreement(rc, unseen, dense)
        result = rc.plan.passes["recover"]["summary"]["runs"][-1]
        rows.append({"pipeline": label, "metric": "top-1 agreement / mean KL", "one_shot_mean": top1,
                     "one_shot_kl": kl, "recovered_mean": top1_after, "recovered_kl": kl_after,
                     "loss_before": result["loss_before"], "loss_after": result["loss_after"],
                     "parameters": result["parameters"], "steps": args.image_steps,
                     "data": f"{args.image_train} crops", "recover_s": seconds})
        print(rows[-1], flush=True)
    return rows


def _markdown(rows: list[dict], args, load: tuple[float, float]) -> str:
    body = [[r["pipeline"], r.get("metric", "mean cosine / worst"), *_pair(r, "one_shot"),
             *_pair(r, "recovered"), f"{r['loss_before']:.4f} → {r['loss_after']:.4f}",
             f"{r.get('steps', args.steps)}", r.get("data", f"{args.calibration} sentences"),
             f"{r['parameters'] / 1e6:.2f} M", f"{r['recover_s']:.0f}"] for r in rows]
    return "\n".join([
        "# Recovery: one-shot vs after a short distillation toward dense", "",
        *([f"MiniLM-L6 (pretrained); calibration {args.calibration} sentences in batches of {BATCH} (also "
           f"the recovery data); recovery {args.steps} Adam steps, peak lr {args.lr:g} (cosine decay), "
           f"layer-wise weight {args.layers:g}, seed {args.seed}; figures on {args.unseen} held-out "
           "sentences of modules never calibrated on: cosine of the sentence embeddings to dense.", ""]
          if args.text else []),
        *([f"EfficientNet-Lite0 rows: {args.image_train} training crops (left of column {SPLIT_COLUMN}) in "
           f"batches of {IMAGE_BATCH}, {args.image_unseen} held-out crops (right of it), {args.image_steps} "
           f"steps at peak lr {args.image_lr:g}, layer-wise weight {args.image_layers:g}, seed {args.seed}; "
           "figures: top-1 agreement with dense and "
           "mean KL(dense ‖ sparse) in nats.", ""] if args.images else []),
        f"Load average {load[0]:.2f} at the start, {load[1]:.2f} at the end.", "",
        *table(["pipeline", "metric", "one-shot", "one-shot worst / KL", "recovered", "recovered worst / KL",
                "calibration loss (mse/var)", "steps", "data", "trained", "recover s"], body), ""])


def _pair(row: dict, which: str) -> list[str]:
    second = row.get(f"{which}_worst", row.get(f"{which}_kl"))
    return [f"{row[f'{which}_mean']:.4f}", f"{second:.4f}"]


def main(argv: list[str] | None = None) -> int:
    ap = parser("recover", __doc__, name="recover-cpu")
    ap.add_argument("--calibration", type=int, default=1024)
    ap.add_argument("--unseen", type=int, default=512)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--lr", type=float, default=8e-4)
    ap.add_argument("--layers", type=float, default=1.0, help="weight of the layer-wise (MLP outputs) term")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", default=None, help="run only the pipelines whose label contains one")
    ap.add_argument("--image-train", type=int, default=64, help="EfficientNet training crops")
    ap.add_argument("--image-unseen", type=int, default=512, help="EfficientNet held-out crops")
    ap.add_argument("--image-steps", type=int, default=60)
    ap.add_argument("--image-lr", type=float, default=2e-4)
    ap.add_argument("--image-layers", type=float, default=1.0,
                    help="weight of the layer-wise (1x1 conv outputs) term for EfficientNet")
    ap.add_argument("--no-text", dest="text", action="store_false", help="skip the MiniLM rows")
    ap.add_argument("--no-images", dest="images", action="store_false", help="skip the EfficientNet rows")
    args = parse(ap, argv)
    start_load = os.getloadavg()[0]
    rows = run(args) if args.text else []
    rows += run_images(args) if args.images else []
    load = (start_load, os.getloadavg()[0])
    info = machine(args.threads)
    write(args.out, args.name, {"machine": info, "settings": vars(args), "load_average": load, "rows": rows},
          _markdown(rows, args, load) + "\n" + machine_line(info) + "\n")
    return 0
