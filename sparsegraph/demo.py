"""``sparsegraph demo``: the real MiniLM sentence encoder end to end, printed step by step.

1. load MiniLM-L6 (pretrained, bundled) and trace it; print its sites and cost (``inspect``);
2. compile it with each demo pipeline (calibrated on stdlib docstring sentences); save plan and report:
   ``activation-sparsity`` (centred dynamic sparsity, 50% of MLP activations skipped) and
   ``neuron-pruning`` (50% of MLP neurons removed, chosen by the profile);
3. export the compiled model to ONNX and load it in onnxruntime;
4. print a table: time per batch (median, same inputs and threads, interleaved runs) and fidelity
   (mean cosine of the sentence embeddings to the dense model's on held-out English sentences).
"""

from __future__ import annotations

from pathlib import Path

import torch

import sparsegraph as sg
from sparsegraph import models
from sparsegraph.cli import calibration_for, inspect_table
from sparsegraph.data.stdlib_text import sentences
from sparsegraph.measure import compare, cosine

PIPELINES = ("activation-sparsity", "neuron-pruning")
SEQ, BATCH, EVAL_SENTENCES, CALIBRATION = 128, 1, 200, 128


def run(out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    print(f"1. MiniLM-L6 (real weights), batch {BATCH}, sequence {SEQ}, {torch.get_num_threads()} threads")
    model, example = models.load("minilm", seq_len=SEQ, batch=BATCH)
    print(inspect_table(sg.trace(model, example)))

    calibration = calibration_for(model, example, CALIBRATION)
    heldout = model.tokenize(sentences("heldout", limit=EVAL_SENTENCES), max_length=SEQ)
    with torch.inference_mode():
        dense_eval = model(*heldout)
    candidates = {"dense (PyTorch eager)": lambda: model(*example)}
    rows = {"dense (PyTorch eager)": 1.0}
    for name in ("dense", *PIPELINES):
        print(f"\n2. compile with pipeline {name!r}")
        cm = sg.compile(model, name, example_inputs=example, calibration=calibration, quiet=True)
        if name == "dense":  # the baseline in onnxruntime
            ort = cm.onnx_model(threads=torch.get_num_threads())
            with torch.inference_mode():
                rows["dense (ONNX Runtime)"] = cosine(ort(*heldout), dense_eval)
            candidates["dense (ONNX Runtime)"] = lambda ort=ort: ort(*example)
            continue
        cm.plan.save(out / f"plan-{name}.json")
        cm.report().to_html(out / f"report-{name}.html")
        stats = {p: (e["stats"]["matched"], e["stats"]["rewritten"]) for p, e in cm.plan.passes.items()}
        print(f"   passes (matched, rewritten): {stats}; plan → {out / f'plan-{name}.json'}")
        path = cm.export_onnx(out / f"minilm-{name}.onnx")
        ort = cm.onnx_model(threads=torch.get_num_threads())
        print(f"3. exported {path} ({path.stat().st_size / 1e6:.1f} MB)")
        with torch.inference_mode():
            rows[f"{name} (eager)"] = cosine(cm(*heldout), dense_eval)
            rows[f"{name} (ONNX Runtime)"] = cosine(ort(*heldout), dense_eval)
        candidates[f"{name} (eager)"] = lambda cm=cm: cm(*example)
        candidates[f"{name} (ONNX Runtime)"] = lambda ort=ort: ort(*example)
    times = compare(candidates, warmup=2, repeats=7)
    base, base_ort = times["dense (PyTorch eager)"], times["dense (ONNX Runtime)"]
    print(f"\n4. {EVAL_SENTENCES} held-out sentences for fidelity; time per batch of {BATCH}×{SEQ}, same run")
    print(f"| {'model':<34} | ms/batch | vs dense eager | vs dense ORT | cosine to dense |\n|---|---|---|---|---|")
    results = []
    for name, secs in times.items():
        results.append({"model": name, "ms": secs * 1e3, "speedup": base / secs, "speedup_vs_ort": base_ort / secs,
                        "cosine": rows[name]})
        print(f"| {name:<34} | {secs * 1e3:8.1f} | {base / secs:14.2f} | {base_ort / secs:12.2f} | "
              f"{rows[name]:15.4f} |")
    return results
