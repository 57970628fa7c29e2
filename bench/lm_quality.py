"""``python -m bench lm_quality``: what TEAL-style activation sparsity costs a trained decoder, on held-out
text.

Model: ``zoo:stdlib_lm`` (a Llama trained here on the standard library's docstrings; held-out modules
never seen in training). For each target sparsity the ``llm-activation-sparsity`` pipeline (inputs of
q/k/v, o, gate/up and down below per-layer thresholds skipped) is compiled with thresholds calibrated on
training text, then measured on the held-out split:

- **perplexity** (per token of the model's tokenizer; exp of the mean next-token cross-entropy over
  held-out windows of ``--length`` tokens), and its increase over dense;
- **top-1 agreement**: share of held-out positions where the sparse model's most likely next token is
  dense's (teacher-forced: both read the same text);
- **greedy agreement**: share of generated tokens equal to dense's, over ``--prompts`` held-out prompts
  of ``--prompt`` tokens continued for ``--new`` tokens through the KV-cache decode graphs
  (`CompiledModel.generate`), counted up to the first difference's end of row (positions after a first
  difference are compared as generated: they diverge honestly).

Then the same for **decode attention** (which acts in decode steps only, so the text is scored through
the decode graphs: `Decoder.teacher_forced`, the first ``--decode-prompt`` tokens prefilled and every
later token fed to a decode step): perplexity and top-1 agreement over the decode-step positions of the
held-out windows, against dense scored the same way, and greedy agreement as above. Patterns, with
cache blocks of ``--block`` slots: dynamic (per step, the blocks with the largest block-mean q·k; the
first block and the current one always read) at 50% and 25% of the blocks, and static (each head's
``head_patterns`` band at recall 0.95, calibrated on training windows).
"""

from __future__ import annotations

import math
import time

import torch

import sparsegraph as sg
from bench.common import machine, machine_line, parse, parser, table, write
from bench.decode import sparse_config
from sparsegraph.models import stdlib_lm


def main(argv: list[str] | None = None) -> int:
    ap = parser("lm_quality", __doc__, name="lm-quality-cpu")
    ap.add_argument("--sparsities", default="0.3,0.4,0.5,0.6")
    ap.add_argument("--length", type=int, default=128, help="held-out window length for perplexity")
    ap.add_argument("--windows", type=int, default=64, help="held-out windows for perplexity (None: all)")
    ap.add_argument("--calibration", type=int, default=16, help="training windows the thresholds come from")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--decode-prompt", type=int, default=16, help="tokens prefilled before teacher forcing")
    ap.add_argument("--block", type=int, default=16, help="decode attention's cache block (slots)")
    args = parse(ap, argv)
    started = time.perf_counter()
    model, example = stdlib_lm.load(seq_len=args.length)
    calibration = list(stdlib_lm.train_ids(args.length, args.calibration).split(4))
    heldout = stdlib_lm.heldout_ids(args.length, args.windows)
    prompts = stdlib_lm.heldout_ids(args.prompt, args.prompts)

    def logits_of(cm):
        return lambda ids: cm(ids).logits

    dense = sg.compile(model, "dense", example_inputs=example, quiet=True)
    with torch.inference_mode():
        dense_top1 = torch.cat([dense(w).logits.argmax(-1) for w in heldout.split(16)])
    dense_ppl = stdlib_lm.perplexity(logits_of(dense), args.length, args.windows)
    dense_new = dense.generate(prompts, max_new_tokens=args.new, eos_token_id=[])[:, args.prompt:]
    rows = [{"sparsity": 0.0, "perplexity": dense_ppl, "delta": 0.0, "top1_agreement": 1.0,
             "greedy_agreement": 1.0}]
    for sparsity in (float(s) for s in args.sparsities.split(",")):
        cm = sg.compile(model, sparse_config(sparsity), example_inputs=example, calibration=calibration,
                        quiet=True)
        rewritten = cm.plan.passes["neuron_sparsity"]["stats"]["rewritten"]
        assert rewritten > 0, f"no site rewritten at {sparsity}: the figure would be dense's"
        ppl = stdlib_lm.perplexity(logits_of(cm), args.length, args.windows)
        with torch.inference_mode():
            top1 = torch.cat([cm(w).logits.argmax(-1) for w in heldout.split(16)])
        new = cm.generate(prompts, max_new_tokens=args.new, eos_token_id=[])[:, args.prompt:]
        rows.append({"sparsity": sparsity, "perplexity": ppl, "delta": ppl - dense_ppl,
                     "top1_agreement": (top1 == dense_top1).float().mean().item(),
                     "greedy_agreement": (new == dense_new).float().mean().item()})
    attention = _decode_attention_rows(model, example, calibration, heldout, prompts, dense_new, args)
    results = {"machine": machine(args.threads), "settings": vars(args), "rows": rows, "attention": attention,
               "unigram_perplexity": stdlib_lm.unigram_perplexity(args.length, args.windows),
               "seconds": time.perf_counter() - started}
    assert all(math.isfinite(r["perplexity"]) for r in rows)
    md = "\n".join([
        machine_line(results["machine"]),
        f"zoo:stdlib_lm (Llama, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, trained "
        f"here), held-out modules: perplexity over {heldout.shape[0]} windows of {args.length} tokens; top-1 "
        f"agreement teacher-forced on the same windows; greedy agreement over {args.prompts} prompts of "
        f"{args.prompt} tokens continued by {args.new} through the KV-cache decode graphs. Thresholds from "
        f"{args.calibration} training windows. Unigram baseline perplexity: "
        f"{results['unigram_perplexity']:.1f}.", "",
        *table(["TEAL sparsity (all projections)", "perplexity", "Δ vs dense", "top-1 agreement",
                "greedy agreement"],
               [[f"{r['sparsity']:.0%}" if r["sparsity"] else "dense", f"{r['perplexity']:.2f}",
                 f"{r['delta']:+.2f}", f"{r['top1_agreement']:.3f}", f"{r['greedy_agreement']:.3f}"]
                for r in rows]), "",
        f"Decode attention: held-out windows scored through the decode graphs ({args.decode_prompt} tokens "
        f"prefilled, then one decode step per token; figures over the {args.length - args.decode_prompt} "
        f"decode-step positions), cache blocks of {args.block} slots; greedy agreement as above.", "",
        *table(["decode attention", "share of cache blocks read", "perplexity (decode steps)", "Δ vs dense",
                "top-1 agreement", "greedy agreement"],
               [[r["pattern"], f"{r['read']:.2f}", f"{r['perplexity']:.2f}", f"{r['delta']:+.2f}",
                 f"{r['top1_agreement']:.3f}", f"{r['greedy_agreement']:.3f}"] for r in attention]), ""])
    write(args.out, args.name, results, md)
    return 0


def _decode_attention_rows(model, example, calibration, heldout, prompts, dense_new, args) -> list[dict]:
    """Perplexity, top-1 and greedy agreement of decode attention patterns, scored through the decode
    graphs against dense scored the same way."""
    configs = {
        "dense": {"passes": []},
        "dynamic, 50% of blocks": {"passes": [{"decode_attention": {"mode": "dynamic", "keep": 0.5,
                                                                     "block": args.block}}]},
        "dynamic, 25% of blocks": {"passes": [{"decode_attention": {"mode": "dynamic", "keep": 0.25,
                                                                     "block": args.block}}]},
        "static (head_patterns, recall 0.95)": {"passes": [
            {"head_patterns": {"block": args.block, "recall": 0.95}}, "decode_attention"]},
    }
    rows, reference = [], None
    for name, config in configs.items():
        cm = sg.compile(model, config, example_inputs=example, calibration=calibration, quiet=True)
        logits = torch.cat([cm.decoder().teacher_forced(w, args.decode_prompt) for w in heldout.split(16)])
        scored = logits[:, args.decode_prompt - 1:-1]  # each decode step's prediction of the next token
        targets = heldout[:, args.decode_prompt:]
        ce = torch.nn.functional.cross_entropy(scored.flatten(0, 1).double(), targets.flatten())
        top1 = scored.argmax(-1)
        reference = top1 if reference is None else reference
        new = cm.generate(prompts, max_new_tokens=args.new, eos_token_id=[])[:, args.prompt:]
        rows.append({"pattern": name, "read": _blocks_read(cm, args.length),
                     "perplexity": math.exp(ce.item()),
                     "top1_agreement": (top1 == reference).float().mean().item(),
                     "greedy_agreement": (new == dense_new).float().mean().item()})
        print(rows[-1], flush=True)
    for row in rows:
        row["delta"] = row["perplexity"] - rows[0]["perplexity"]
    return rows


def _blocks_read(cm, length: int) -> float:
    """Mean share of the blocks of a full cache of `length` slots that one step's decode attention reads,
    over the step graph's ops and heads: each head's static band, its query's own block, and at least
    ⌈keep · blocks⌉ in dynamic mode (1.0: no decode attention)."""
    from sparsegraph import attention_layouts, ir
    from sparsegraph.codegen.decode_attention import OP

    shares = []
    for node in cm.decoder().step.graph.nodes:
        if node.target is not OP.overload:
            continue
        layout = ir.get_attr(node.graph.owning_module, node.args[4].target)
        keep, block = node.args[5], node.args[6]
        blocks = -(-length // block)
        listed = attention_layouts.block_mask_from_layout(attention_layouts.layout(layout, 1, blocks, False),
                                                          blocks)[:, 0]  # [heads, blocks]
        listed[:, -1] = True
        read = listed.float().sum(-1).clamp(min=min(blocks, math.ceil(keep * blocks)))
        shares += (read / blocks).tolist()
    return sum(shares) / len(shares) if shares else 1.0
