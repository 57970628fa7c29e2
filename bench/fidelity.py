"""``python -m bench fidelity``: what the quality budget keeps, on data neither the analyses nor the
budget saw, against the same pipeline without it.

- **MiniLM** (real pretrained sentence encoder), ``combined`` as shipped (``speed_check`` times every
  sparse op here, so what it keeps varies from run to run on a busy machine: the case the budget is
  for), without a floor and with ``fidelity: {metric: cosine, min: 0.99}`` and ``min: 0.995``.
  Calibration: ``--calibration`` standard-library sentences in batches of 16 (the budget holds out the
  last quarter of the batches); figures on ``--unseen`` held-out sentences (modules never used for
  calibration): mean cosine of the sentence embeddings to dense, the worst sentence's cosine, and time
  per batch of the example shape against dense eager, interleaved, median of ``--repeats``.
- **digits_vit** (the ViT trained here on sklearn's digits), ``vit-token-pruning`` and a harder schedule
  (keep 0.5 before blocks 1–4), each with and without ``fidelity: {metric: top1, min: 0.98}``.
  Calibration: the first 192 test images in batches of 64 (the budget holds out the last; training
  images would not do: the model fits them, so every schedule agrees there); figures on the other 167
  test images: top-1 agreement with dense, accuracy against the labels, speed against dense eager at
  batch 64.
- **stdlib_lm** (the Llama trained here), ``llm-activation-sparsity`` at 60%, with and without
  ``fidelity: {metric: perplexity, max: 1.05}``. Calibration: 16 training windows of 128 tokens in
  batches of 4; figures on 64 held-out windows (modules never trained on): perplexity and its ratio to
  dense, and greedy agreement with dense over 8 held-out prompts of 32 tokens continued by 32 through the
  KV-cache decode graphs.
"""

from __future__ import annotations

import time

import torch

import sparsegraph as sg
from bench.common import machine, machine_line, parse, parser, table, write
from sparsegraph import models, pipelines
from sparsegraph.data.stdlib_text import sentences
from sparsegraph.measure import compare


def minilm(args) -> list[dict]:
    model, example = models.load("minilm", seq_len=128, batch=16)
    texts = sentences("calibration", limit=args.calibration)
    calibration = [model.tokenize(texts[i:i + 16], max_length=128) for i in range(0, len(texts), 16)]
    unseen = [model.tokenize(b, max_length=128) for b in _chunks(sentences("heldout", limit=args.unseen), 32)]
    with torch.inference_mode():
        dense = [model(*b) for b in unseen]
    rows = []
    for floor in (None, 0.99, 0.995):
        config = pipelines.get("combined")
        if floor is not None:
            config["fidelity"] = {"metric": "cosine", "min": floor}
        started = time.perf_counter()
        cm = sg.compile(model, config, example_inputs=example, calibration=calibration, quiet=True)
        compile_s = time.perf_counter() - started
        with torch.inference_mode():
            cosines = torch.cat([torch.nn.functional.cosine_similarity(cm(*b), d, dim=-1)
                                 for b, d in zip(unseen, dense)])
        reverted = cm.plan.passes["speed_check"]["stats"]["counters"].get("reverted", [])
        rows.append({"model": "MiniLM", "pipeline": "combined", "floor": floor, "speed_check": len(reverted),
                     "mean_cosine": cosines.mean().item(), "worst_cosine": cosines.min().item(),
                     **_budget(cm), **_speed(model, cm, example, args.repeats), "compile_s": compile_s})
        print(rows[-1], flush=True)
    return rows


def digits(args) -> list[dict]:
    from sparsegraph.models import digits_vit

    model, _ = models.load("digits_vit")
    test = digits_vit.dataset("test")
    calibration = [test.images[i:i + 64] for i in range(0, 192, 64)]
    images, labels = test.images[192:], test.labels[192:]
    with torch.inference_mode():
        dense = model(images).argmax(-1)
    example = (test.images[:64],)
    harder = {"passes": ["cost", {"token_pruning": {"layers": [1, 2, 3, 4], "keep": 0.5}}]}
    rows = []
    for name, base in (("vit-token-pruning", pipelines.get("vit-token-pruning")),
                       ("keep 0.5 before blocks 1-4", harder)):
        for floor in (None, 0.98):
            config = dict(base, **({"fidelity": {"metric": "top1", "min": floor}} if floor else {}))
            started = time.perf_counter()
            cm = sg.compile(model, config, example_inputs=example, calibration=calibration, quiet=True)
            compile_s = time.perf_counter() - started
            with torch.inference_mode():
                pred = cm(images).argmax(-1)
            rows.append({"model": "digits_vit", "pipeline": name, "floor": floor,
                         "top1_agreement": (pred == dense).float().mean().item(),
                         "accuracy": (pred == labels).float().mean().item(),
                         "accuracy_dense": (dense == labels).float().mean().item(),
                         **_budget(cm), **_speed(model, cm, example, args.repeats), "compile_s": compile_s})
            print(rows[-1], flush=True)
    return rows


def lm(args) -> list[dict]:
    from bench.decode import sparse_config
    from sparsegraph.models import stdlib_lm

    model, example = stdlib_lm.load(seq_len=128)
    calibration = list(stdlib_lm.train_ids(128, 16).split(4))
    heldout, prompts = stdlib_lm.heldout_ids(128, 64), stdlib_lm.heldout_ids(32, 8)

    def perplexity(fn) -> float:
        with torch.inference_mode():
            logits = torch.cat([fn(w).logits for w in heldout.split(16)])
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).double(),
                                                 heldout[:, 1:].flatten()).exp().item()

    dense_ppl = perplexity(model)
    dense_new = sg.compile(model, "dense", example_inputs=example, quiet=True).generate(
        prompts, max_new_tokens=32, eos_token_id=[])[:, 32:]
    rows = []
    for ceiling in (None, 1.05):
        config = sparse_config(0.6)
        if ceiling is not None:
            config["fidelity"] = {"metric": "perplexity", "max": ceiling}
        started = time.perf_counter()
        cm = sg.compile(model, config, example_inputs=example, calibration=calibration, quiet=True)
        compile_s = time.perf_counter() - started
        ppl = perplexity(cm)
        new = cm.generate(prompts, max_new_tokens=32, eos_token_id=[])[:, 32:]
        rows.append({"model": "stdlib_lm", "pipeline": "llm-activation-sparsity 60%", "floor": ceiling,
                     "perplexity": ppl, "perplexity_dense": dense_ppl, "ratio": ppl / dense_ppl,
                     "greedy_agreement": (new == dense_new).float().mean().item(), **_budget(cm),
                     "compile_s": compile_s})
        print(rows[-1], flush=True)
    return rows


def _budget(cm) -> dict:
    summary = cm.plan.summary("budget")
    if summary is None:
        return {"kept": None, "lowered": None, "reverted": None, "holdout_score": None}
    counters = cm.plan.passes["budget"]["stats"]["counters"]
    return {"kept": counters.get("keep", 0), "lowered": counters.get("lower", 0),
            "reverted": counters.get("revert", 0), "holdout_score": summary["final"],
            "holdout_score_all_rewrites": summary["full"]}


def _speed(model, cm, example, repeats: int) -> dict:
    times = compare({"dense": lambda: model(*example), "compiled": lambda: cm(*example)}, repeats=repeats)
    return {"dense_ms": times["dense"] * 1e3, "compiled_ms": times["compiled"] * 1e3,
            "speedup": times["dense"] / times["compiled"]}


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _markdown(rows: list[dict], args) -> str:
    def fmt(v, spec=".4f"):
        return "–" if v is None else format(v, spec)

    minilm_rows = [[f"{r['pipeline']} ({r['speed_check']} sites reverted by speed_check)",
                    "none" if r["floor"] is None else f"cosine ≥ {r['floor']}",
                    fmt(r["holdout_score"]), fmt(r["mean_cosine"]), fmt(r["worst_cosine"]),
                    f"{r['kept']}/{r['lowered']}/{r['reverted']}" if r["kept"] is not None else "–",
                    f"{r['dense_ms']:.1f}", f"{r['compiled_ms']:.1f}", f"{r['speedup']:.2f}x",
                    f"{r['compile_s']:.0f}"] for r in rows if r["model"] == "MiniLM"]
    digit_rows = [[r["pipeline"], "none" if r["floor"] is None else f"top-1 ≥ {r['floor']}",
                   fmt(r["holdout_score"]), fmt(r["top1_agreement"]),
                   f"{r['accuracy']:.4f} ({r['accuracy_dense']:.4f} dense)",
                   f"{r['kept']}/{r['lowered']}/{r['reverted']}" if r["kept"] is not None else "–",
                   f"{r['dense_ms']:.1f}", f"{r['compiled_ms']:.1f}", f"{r['speedup']:.2f}x",
                   f"{r['compile_s']:.0f}"] for r in rows if r["model"] == "digits_vit"]
    lm_rows = [[r["pipeline"], "none" if r["floor"] is None else f"perplexity ≤ {r['floor']}× dense",
                fmt(r["holdout_score"]), f"{r['perplexity']:.2f} ({r['perplexity_dense']:.2f})",
                f"{r['ratio']:.4f}", f"{r['greedy_agreement']:.3f}",
                f"{r['kept']}/{r['lowered']}/{r['reverted']}" if r["kept"] is not None else "–",
                f"{r['compile_s']:.0f}"] for r in rows if r["model"] == "stdlib_lm"]
    return "\n".join([
        "# Quality budget: held-out fidelity with and without a floor", "",
        f"MiniLM-L6 (pretrained), `combined` (speed_check timing each op), sequence 128, batch 16; "
        f"calibration {args.calibration} sentences in batches of 16, the last quarter held out for the "
        "budget; "
        f"unseen: {args.unseen} sentences of modules never calibrated on. Speed: one batch of the example "
        f"shape, dense eager vs compiled, interleaved, median of {args.repeats}.", "",
        *table(["pipeline", "floor", "budget's held-out score", "unseen mean cosine", "unseen worst",
                "kept/lowered/reverted", "dense ms", "compiled ms", "speed-up", "compile s"], minilm_rows),
        "", "digits_vit (trained here): calibration on the first 192 test images in batches of 64 (the last "
            "held out by the budget), figures on the other 167; speed at batch 64.", "",
        *table(["pipeline", "floor", "budget's held-out score", "test top-1 agreement", "test accuracy",
                "kept/lowered/reverted", "dense ms", "compiled ms", "speed-up", "compile s"], digit_rows),
        "", "stdlib_lm (trained here): calibration 16 training windows of 128 tokens (batches of 4, the last "
            "held out by the budget); figures on 64 held-out windows and 8 held-out prompts (32 + 32 greedy "
            "tokens through the decode graphs).", "",
        *table(["pipeline", "ceiling", "budget's held-out ratio", "unseen perplexity (dense)",
                "ratio to dense", "greedy agreement", "kept/lowered/reverted", "compile s"], lm_rows),
        ""])


def main(argv: list[str] | None = None) -> int:
    ap = parser("fidelity", __doc__, name="fidelity-cpu")
    ap.add_argument("--calibration", type=int, default=128)
    ap.add_argument("--unseen", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    args = parse(ap, argv)
    rows = digits(args) + minilm(args) + lm(args)
    info = machine(args.threads)
    write(args.out, args.name, {"machine": info, "settings": vars(args), "rows": rows},
          _markdown(rows, args) + "\n" + machine_line(info) + "\n")
    return 0
