"""``sparsegraph demo``: the whole story on bundled data, printed step by step (about 2–3 minutes on 2 cores).

Text, the real MiniLM-L6 sentence encoder (batch 1, 128 tokens):

1. trace it and print its sites and cost (``inspect``);
2. compile it with ``activation-sparsity`` (centred dynamic sparsity, 50% of MLP activations skipped)
   and ``combined`` (activation sparsity + per-head attention patterns + token pruning from block 4,
   one plan), calibrated on stdlib docstring sentences; save each plan and HTML report;
3. export each to ONNX and load it in onnxruntime;
4. print a table: time per call (median, same inputs and threads, interleaved) vs dense eager and vs
   dense ONNX Runtime, and fidelity (mean cosine of embeddings to dense on held-out text: consecutive
   held-out sentences joined to fill all 128 tokens, so token pruning drops real tokens, not padding).

Vision, the real digits_vit (a ViT trained on scikit-learn's digits, pasted at random places):

5. compile with ``roi`` (boxes from the class token's attention) + token pruning to the RoI tokens from
   block 4, and with keep 0.5 from block 2; print accuracy and speed against dense, and the mean IoU of
   the RoI boxes with the true digit boxes; the report draws the boxes over example images.
"""

from __future__ import annotations

from pathlib import Path

import torch

import sparsegraph as sg
from sparsegraph import models
from sparsegraph.data.calibration import calibration_for
from sparsegraph.data.stdlib_text import sentences
from sparsegraph.measure import compare, cosine
from sparsegraph.models import digits_vit
from sparsegraph.passes.analysis.roi import rois
from sparsegraph.report import sites_table
from sparsegraph.sections import Table

PIPELINES = ("activation-sparsity", "combined")
SEQ, EVAL_TEXTS, CALIBRATION = 128, 64, 64
VISION_BATCH = 64


def run(out: Path) -> dict[str, list[dict]]:
    out.mkdir(parents=True, exist_ok=True)
    return {"text": text(out), "vision": vision(out)}


def text(out: Path) -> list[dict]:
    print(f"1. MiniLM-L6 (real weights), batch 1, sequence {SEQ}, {torch.get_num_threads()} threads")
    model, _ = models.load("minilm", seq_len=SEQ, batch=1)
    heldout = model.tokenize(_filled(model, sentences("heldout"), SEQ, EVAL_TEXTS), max_length=SEQ,
                             pad_to=SEQ)
    example = (heldout[0][:1], heldout[1][:1])
    print(sites_table(sg.trace(model, example)))

    calibration = calibration_for(model, example, CALIBRATION)
    with torch.inference_mode():
        dense_eval = model(*heldout)
    candidates = {"dense (PyTorch eager)": lambda: model(*example)}
    fidelity = {"dense (PyTorch eager)": 1.0}
    compiled = {}
    for name in ("dense", *PIPELINES):
        print(f"\n2. compile with pipeline {name!r}")
        cm = sg.compile(model, name, example_inputs=example, calibration=calibration, quiet=True)
        ort = cm.onnx_model(threads=torch.get_num_threads())
        if name == "dense":  # the baseline in onnxruntime
            with torch.inference_mode():
                fidelity["dense (ONNX Runtime)"] = cosine(ort(*heldout), dense_eval)
            candidates["dense (ONNX Runtime)"] = lambda ort=ort: ort(*example)
            continue
        compiled[f"minilm-{name}"] = cm
        with torch.inference_mode():
            fidelity[f"{name} (eager)"] = cosine(cm(*heldout), dense_eval)
            fidelity[f"{name} (ONNX Runtime)"] = cosine(ort(*heldout), dense_eval)
        candidates[f"{name} (eager)"] = lambda cm=cm: cm(*example)
        candidates[f"{name} (ONNX Runtime)"] = lambda ort=ort: ort(*example)
    print(f"\n4. {EVAL_TEXTS} held-out texts of {SEQ} tokens for fidelity; time per call of 1×{SEQ} "
          "tokens, same run")
    rows = _table(compare(candidates, warmup=2, repeats=7), fidelity, "cosine to dense")
    for name, cm in compiled.items():
        _save(cm, out, name, rows)
    return rows


def vision(out: Path) -> list[dict]:
    print(f"\n5. digits_vit (trained ViT, 65 tokens), {torch.get_num_threads()} threads")
    model, _ = models.load("digits_vit")
    test = digits_vit.dataset("test")
    calibration = [(digits_vit.dataset("train").images[i:i + 64],) for i in range(0, 256, 64)]
    batch = (test.images[:VISION_BATCH],)

    def accuracy(fn, size: int = 120) -> float:
        with torch.inference_mode():
            pred = torch.cat([fn(test.images[i:i + size]).argmax(-1)
                              for i in range(0, len(test.labels), size)])
        return (pred == test.labels).float().mean().item()

    roi_model = sg.compile(model, {"passes": ["roi", {"token_pruning": {"layers": [4], "select": "roi"}}]},
                           example_inputs=batch, calibration=calibration, quiet=True)
    half = sg.compile(model, {"passes": ["token_importance",
                                         {"token_pruning": {"layers": [2], "keep": 0.5}}]},
                      example_inputs=batch, calibration=calibration, quiet=True)
    boxes = [b for i in range(0, len(test.labels), 120) for b in rois(roi_model, test.images[i:i + 120])]
    iou = sum(b[0].iou(tuple(t)) if b else 0.0 for b, t in zip(boxes, test.boxes.tolist())) / len(boxes)
    print(f"   RoI boxes (class-token attention of blocks 0-3): mean IoU {iou:.3f} with the true digit boxes")
    dense_ort = sg.compile(model, "dense", example_inputs=batch, quiet=True).onnx_model(
        torch.get_num_threads())
    half_ort = half.onnx_model(torch.get_num_threads())
    one = (test.images[:1],)
    candidates = {"dense (PyTorch eager)": lambda: model(*batch),
                  "dense (ONNX Runtime)": lambda: dense_ort(*batch),
                  "keep 0.5 from block 2 (eager)": lambda: half(*batch),
                  "keep 0.5 from block 2 (ONNX Runtime)": lambda: half_ort(*batch),
                  "RoI tokens from block 4 (eager, per image ×64)":
                      lambda: [roi_model(one[0]) for _ in range(VISION_BATCH)]}
    acc = {"dense (PyTorch eager)": accuracy(model), "dense (ONNX Runtime)": accuracy(dense_ort),
           "keep 0.5 from block 2 (eager)": accuracy(half),
           "keep 0.5 from block 2 (ONNX Runtime)": accuracy(half_ort),
           "RoI tokens from block 4 (eager, per image ×64)": accuracy(roi_model, 1)}
    print(f"   time per batch of {VISION_BATCH} images, same run; test accuracy on {len(test.labels)} images")
    rows = _table(compare(candidates, warmup=1, repeats=5), acc, "test accuracy")
    _save(roi_model, out, "digits-roi", rows, facts={"RoI mean IoU with the true digit boxes": f"{iou:.3f}"})
    _save(half, out, "digits-keep-half", rows)
    return rows


def _filled(model, texts: list[str], tokens: int, count: int) -> list[str]:
    """`count` texts made of consecutive `texts` joined until each has at least `tokens` tokens."""
    out, current = [], ""
    for t in texts:
        current = f"{current} {t}".strip()
        if len(model.tokenizer(current)["input_ids"]) >= tokens:
            out.append(current)
            current = ""
            if len(out) == count:
                break
    return out


def _save(cm, out: Path, name: str, rows: list[dict], facts: dict | None = None) -> None:
    """Plan and HTML report, the report with the speed and fidelity this run measured."""
    cm.plan.save(out / f"plan-{name}.json")
    report = out / f"report-{name}.html"
    doc = cm.report()
    doc.facts.update(facts or {})
    metric = next(k for k in rows[0] if k not in ("model", "ms", "speedup", "speedup_vs_ort"))
    doc.tables.insert(0, Table("Measured in this run (same inputs and threads, interleaved, median)",
                               ["model", "ms", "vs dense eager", "vs dense ORT", metric.replace("_", " ")],
                               [[r["model"], f"{r['ms']:.1f}", f"{r['speedup']:.2f}",
                                 f"{r['speedup_vs_ort']:.2f}", f"{r[metric]:.4f}"] for r in rows]))
    doc.to_html(report)
    stats = {p: (e["stats"]["matched"], e["stats"]["rewritten"]) for p, e in cm.plan.passes.items()}
    print(f"   passes (matched, rewritten): {stats}\n   plan → {out / f'plan-{name}.json'}, report → "
          f"{report}")


def _table(times: dict[str, float], fidelity: dict[str, float], metric: str) -> list[dict]:
    base, base_ort = times["dense (PyTorch eager)"], times["dense (ONNX Runtime)"]
    print(f"| {'model':<46} | ms | vs dense eager | vs dense ORT | {metric} |\n|---|---|---|---|---|")
    rows = []
    for name, secs in times.items():
        rows.append({"model": name, "ms": secs * 1e3, "speedup": base / secs,
                     "speedup_vs_ort": base_ort / secs, metric.replace(" ", "_"): fidelity[name]})
        print(f"| {name:<46} | {secs * 1e3:7.1f} | {base / secs:14.2f} | {base_ort / secs:12.2f} | "
              f"{fidelity[name]:.4f} |")
    return rows
