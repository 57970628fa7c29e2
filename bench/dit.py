"""``python -m bench dit``: one denoising step of a video DiT at long token counts, dense vs 3-D windows.

The model: ``MovingDigitsDiT`` (`sparsegraph.models.moving_digits_dit`: Conv3d patchify with tokens
frame-major, 3-D sin-cos positions that extend to any grid, AdaLN-Zero blocks, ``qkv`` Linear → SDPA →
``proj``, GELU MLP). Clips are ``T`` token frames of 32 × 32 tokens (its patch 2 × 4 × 4: 2T frames of
128 × 128 pixels): 8, 16, 32 token frames = 8k, 16k, 32k tokens; the input is the first sampling step's
(pure noise, t = 1).

Patterns, two sources:

- ``--trained``: the shipped trained weights (all its blocks: one real step) and the trained model's own
  fit: ``head_patterns`` (families dense, ``window_3d`` and ``pyramid``) on its calibration clips at the
  training size (8 frames of 32x32 pixels: 4 × 8 × 8 tokens) over five timesteps, costed at each long
  clip's grid (``target_grid``; ``--cost-at calibration``: at the calibration grid, one fit for all
  sizes). Windows are fitted on token displacements, so their extents mean the same on the long grid;
  costed at the long grid, a head is dense or a pyramid (its far blocks read pooled: calibration never
  saw the mass beyond the short clip, so no head drops it).
- default: random weights, ``--depth`` blocks of width ``--dim`` with ``--heads`` heads (a step is the same
  work per block, so a few blocks give the per-step ratio). Random weights give near-uniform attention,
  which no sparse pattern fits, so the plan's heads are set to the documented per-head assignment
  `ASSIGNMENT` (extents in tokens: local 3-D, spatial-only, temporal-only, wider neighbourhoods, the head
  kinds Sparse-vDiT reports in video DiTs); the bench says so in its output.

Each plan is made at the short clip and replayed at its long size(s) with
``sparsegraph.compile(model, plan=...)``: window heads are re-specialised to the long grid.

Candidates, same inputs, same run, interleaved after warm-up, median of ``--repeats``: dense eager (the
model as it is), ours (the replayed compiled model: ``sparsegraph::block_sparse_attention`` on its
compiled CPU kernel; no compile step of ours: its first call is timed), and the model with its SDPA
calls routed to ``torch.compile(flex_attention)`` with the same block masks (a ``BlockMask`` built from
the layouts' index lists, every listed block full; its compile + first call timed separately). Also: the
share of a dense step spent in attention (SDPA calls timed inside one dense step), per-head density,
the step output of ours against dense eager (relative L2 error and cosine: what the sparse attention
changes at the long size, where the model has no trained reference), and the max |ours − flex| of the
step outputs where both run the same sparse attention.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import time
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

import sparsegraph as sg
from bench.common import machine, machine_line, parse, parser, table, write
from sparsegraph import attention_layouts
from sparsegraph.codegen import cpu_kernels
from sparsegraph.models import moving_digits_dit as mdd

# extents [a_t, a_h, a_w] in tokens of the 32 × 32 canvas (module docstring); cycled over the heads
ASSIGNMENT = [[1, 4, 4], [2, 8, 8], [0, 31, 31], [31, 1, 1], [4, 2, 2], [1, 16, 16]]
CANVAS = 32  # tokens per side at the long sizes
PATCH = (2, 4, 4)  # MovingDigitsDiT's


# ------------------------------------------------------------------------------------------ model


def build(frames: int, side: int, args) -> tuple[nn.Module, str]:
    """`MovingDigitsDiT` at `frames` × `side` × `side` tokens. With ``--trained``: the shipped trained weights
    (no parameter depends on the grid: positions are sin-cos of the grid). Else random weights, seeded
    (the same for every size), ``--dim``/``--heads``/``--depth``; parameters left at zero by the model's init
    (AdaLN-Zero gates, the zero output layer) get N(0, 0.02) values: with them at zero, attention would not
    reach the output and the output comparisons say nothing."""
    kwargs = dict(frames=frames * PATCH[0], height=side * PATCH[1], width=side * PATCH[2])
    if args.trained:
        model = mdd.MovingDigitsDiT(**kwargs)
        model.load_state_dict(mdd.load()[0].state_dict())
        return model.eval(), f"zoo:moving_digits_dit (trained weights, {len(model.blocks)} blocks)"
    torch.manual_seed(0)
    model = mdd.MovingDigitsDiT(**kwargs, dim=args.dim, depth=args.depth, heads=args.heads)
    with torch.no_grad():
        for p in model.parameters():
            if not bool(p.any()):
                p.normal_(0.0, 0.02)
    return model.eval(), f"MovingDigitsDiT (random weights, {args.depth} blocks)"


def inputs(frames: int, side: int, seed: int = 0):
    """One noisy clip (pure noise: the first step of sampling), timestep 1, digit 3."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, frames * PATCH[0], side * PATCH[1], side * PATCH[2], generator=g)
    return x, torch.tensor([1.0]), torch.tensor([3])


# ------------------------------------------------------------------------------------------ plan


def make_plan(args, log, frames: int) -> tuple[dict, str]:
    """The plan fitted at the short clip for clips of `frames` token frames: with ``--trained``, the
    trained model's own fit; else its heads set to `ASSIGNMENT`."""
    if args.trained:
        target = (frames, args.canvas, args.canvas) if args.cost_at == "target" else None
        return trained_plan(args, log, target)
    model, _ = build(args.calib_frames, 8, args)
    calib = [inputs(args.calib_frames, 8, seed) for seed in range(1, 3)]
    config = {"passes": [{"head_patterns": {"block": args.block, "recall": 0.9,
                                            "patterns": ["dense", "window_3d"]}},
                         {"sparse_attention": {"max_density": 1.0}}]}
    cm = sg.compile(model, config, example_inputs=inputs(args.calib_frames, 8), calibration=calib)
    plan = copy.deepcopy(cm.plan.to_json())
    fitted = [h["pattern"] for site in plan["sites"].values() if "head_patterns" in site
              for h in site["head_patterns"]["evidence"]["heads"]]
    log(f"fit at {args.calib_frames}x8x8 tokens (random weights): {fitted.count('window_3d')} of "
        f"{len(fitted)} heads window_3d; heads set to the documented assignment")
    return assign(plan), "documented per-head assignment (random weights fit no sparse pattern)"


def trained_plan(args, log, target) -> tuple[dict, str]:
    """``head_patterns`` (families ``--patterns``: those that carry to another grid; recall ``--recall``,
    block ``--fit-block``) on the trained model at its training clip (8 frames of 32x32: 4 × 8 × 8 tokens),
    calibrated on `moving_digits_dit.calibration` (test clips noised at five timesteps), costed at the
    token grid `target` of the long clip (``target_grid``: dense or pyramid per head) or, None, at the
    calibration grid. Windows (a pyramid's near part too) are fitted on tokens (their extent means the
    same at any grid and block), so the replay lays them out at the bench's ``--block``: each site's
    block is set to it."""
    model, example = mdd.load()
    options = {"block": args.fit_block, "recall": args.recall, "patterns": list(args.patterns)}
    if target is not None:
        options["target_grid"] = list(target)
    config = {"passes": [{"head_patterns": options}, {"sparse_attention": {"max_density": 1.0}}]}
    cm = sg.compile(model, config, example_inputs=example, calibration=mdd.calibration(), quiet=True)
    plan = copy.deepcopy(cm.plan.to_json())
    fitted = []
    for entry in plan["sites"].values():
        decision = entry.get("sparse_attention", {}).get("decision")
        if decision is not None:
            decision["block"] = args.block
            fitted += [h["pattern"] + (str(h["params"]["extent"]) if "extent" in h["params"] else "")
                       for h in decision["heads"]]
    counts = {f: sum(x.split("[")[0] == f for x in fitted) for f in args.patterns}
    at = "the calibration grid" if target is None else "x".join(map(str, target))
    log(f"trained model's fit at 4x8x8 tokens (recall {args.recall}, block {args.fit_block}, costed at "
        f"{at}): heads of the rewritten sites by family {counts}: {fitted}")
    return plan, (f"the trained model's own fit (recall {args.recall}; families {', '.join(args.patterns)}; "
                  + ("costed at the calibration grid)" if target is None else "costed at each clip's grid)"))


def assign(plan: dict) -> dict:
    """`plan` with every attention site's heads set to `ASSIGNMENT` (cycled), as sparse_attention would
    have decided them: window_3d heads on the site's fitted grid, which the replay re-specialises."""
    sites = 0
    for entry in plan["sites"].values():
        facts = entry.get("head_patterns", {}).get("evidence")
        if facts is None or facts.get("grid") is None:
            continue
        heads = [{"pattern": "window_3d", "params": {"extent": ASSIGNMENT[h % len(ASSIGNMENT)],
                                                     "grid": facts["grid"]}}
                 for h in range(len(facts["heads"]))]
        entry["sparse_attention"] = {
            "decision": {"block": facts["block"], "seq_len": facts["seq_len"], "key_len": facts["seq_len"],
                         "causal": False, "grid": facts["grid"], "heads": heads},
            "evidence": {"density": None, "recall": [None] * len(heads)}}
        sites += 1
    for key in ("decided", "stats"):
        plan["passes"]["sparse_attention"][key].update(rewritten=sites, refused=[])
    return plan


# ------------------------------------------------------------------------------------------ candidates


def tables(cm) -> list[torch.Tensor]:
    """The compiled model's layout tables, in graph order (one per rewritten attention site)."""
    gm = cm.graph_module if hasattr(cm, "graph_module") else cm.gm
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and "block_sparse_attention" in str(node.target):
            found.append(getattr(gm, node.args[3].target) if hasattr(node.args[3], "target") else None)
    return found


def layer_lists(cm, layer_tables: list[torch.Tensor], nb: int) -> list[torch.Tensor]:
    """Per attention site, in graph order: its key-block lists [H, nb, ≤ nb] (`attention_layouts.layout`);
    a site sparse_attention left dense lists every block."""
    found, out = iter(layer_tables), []
    for entry in cm.plan.sites.values():
        if "head_patterns" not in entry:
            continue
        if "decision" in entry.get("sparse_attention", {}):
            out.append(attention_layouts.layout(next(found), nb, nb, False))
        else:
            heads = len(entry["head_patterns"]["evidence"]["heads"])
            out.append(torch.arange(nb).expand(heads, nb, nb).contiguous())
    return out


def bands_over_window(table: torch.Tensor, nb: int) -> list[float | None]:
    """Per head of a layout table: blocks of the fewest diagonals that cover its window_3d layout (a
    pyramid's near window too: every diagonal the window touches, as a multi_diagonal head would list
    them) over the window's own blocks (None for other heads): what expressing the window as bands would
    cost."""
    masks = attention_layouts.block_mask(table, nb, nb, False)
    rel = torch.arange(nb)[:, None] - torch.arange(nb)[None, :]
    out = []
    for h in range(table.shape[0]):
        if int(table[h, 0]) % attention_layouts.POOLED != attention_layouts.WINDOW:
            out.append(None)
            continue
        diagonals = sorted(set(rel[masks[h]].tolist()))
        banded = attention_layouts.pattern_mask("multi_diagonal", {"diagonals": diagonals}, nb, nb, False)
        out.append(round(int(banded.sum()) / int(masks[h].sum()), 3))
    return out


def flex_step(model, lists_per_layer: list[torch.Tensor], block: int, example):
    """The model with its SDPA calls (in order, one per block) done by torch.compile(flex_attention) with
    each layer's block mask, every listed block full (no mask_mod: flex's cheapest case). Returns the
    step and its compile + first-call seconds."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    masks = []
    for lists in lists_per_layer:
        nq = lists.shape[1]
        count = (lists >= 0).sum(-1).to(torch.int32)[None]
        index = F.pad(lists.clamp(min=0), (0, nq - lists.shape[-1])).to(torch.int32)[None]
        masks.append(BlockMask.from_kv_blocks(torch.zeros_like(count), torch.zeros_like(index), count, index,
                                              BLOCK_SIZE=block))
    compiled = torch.compile(flex_attention, dynamic=False)
    calls = [0]

    def sdpa(q, k, v, *a, **kw):
        mask = masks[calls[0] % len(masks)]
        calls[0] += 1
        return compiled(q, k, v, block_mask=mask)

    def step():
        with mock.patch("torch.nn.functional.scaled_dot_product_attention", sdpa):
            return model(*example)

    start = time.perf_counter()
    with torch.inference_mode():
        out = step()
    return step, time.perf_counter() - start, out


def attention_share(model, example) -> float:
    """Seconds in SDPA over seconds of one dense step (timed inside the step)."""
    spent = [0.0]
    real = F.scaled_dot_product_attention

    def timed(*a, **kw):
        start = time.perf_counter()
        out = real(*a, **kw)
        spent[0] += time.perf_counter() - start
        return out

    with torch.inference_mode(), mock.patch("torch.nn.functional.scaled_dot_product_attention", timed):
        start = time.perf_counter()
        model(*example)
        total = time.perf_counter() - start
    return spent[0] / total


def median_times(calls: dict, warmup: int, repeats: int) -> tuple[dict[str, float], dict]:
    """Median seconds per call, candidates interleaved, the order rotated every round (none always
    follows the same one); and each candidate's output from the first warm-up round (empty without one)."""
    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    outputs = {}
    with torch.inference_mode():
        for w in range(warmup):
            for n in names:
                out = calls[n]()
                if w == 0:
                    outputs[n] = out
        for r in range(repeats):
            for n in names[r % len(names):] + names[:r % len(names)]:
                start = time.perf_counter()
                calls[n]()
                times[n].append(time.perf_counter() - start)
    return {n: sorted(t)[len(t) // 2] for n, t in times.items()}, outputs


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = parser("dit", __doc__, name="dit-cpu")
    ap.add_argument("--frames", type=int, nargs="+", default=[8, 16, 32],
                    help="clip lengths in frames of 32 x 32 tokens (8, 16, 32: 8k, 16k, 32k tokens)")
    ap.add_argument("--canvas", type=int, default=CANVAS, help="tokens per side of a frame")
    ap.add_argument("--dim", type=int, default=128, help="width of the random-weight model")
    ap.add_argument("--heads", type=int, default=4, help="heads of the random-weight model")
    ap.add_argument("--depth", type=int, default=2, help="blocks (a step is the same work per block)")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--calib-frames", type=int, default=4, help="frames of the short clip the plan is fit at")
    ap.add_argument("--trained", action="store_true",
                    help="the trained zoo:moving_digits_dit (all its blocks) with its own fitted windows")
    ap.add_argument("--recall", type=float, default=0.9, help="head_patterns recall of the trained fit")
    ap.add_argument("--fit-block", type=int, default=16, help="head_patterns block of the trained fit")
    ap.add_argument("--patterns", nargs="+", default=["dense", "window_3d", "pyramid"],
                    choices=["dense", "window_3d", "pyramid"],
                    help="head_patterns families of the trained fit (those that carry to another grid)")
    ap.add_argument("--cost-at", choices=["target", "calibration"], default="target",
                    help="the trained fit's costs: at each clip's grid (head_patterns' target_grid, one fit "
                         "per size) or at the calibration grid (one fit for every size)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-flex", action="store_true")
    args = parse(ap, argv)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bench-dit-inductor-"))
    notes: list[str] = []
    per_size = args.trained and args.cost_at == "target"
    plans = {}  # frames → plan path
    for frames in (args.frames if per_size else args.frames[:1]):
        plan, source = make_plan(args, notes.append, frames)
        plans[frames] = os.path.join(tempfile.mkdtemp(prefix="bench-dit-"), "plan.json")
        with open(plans[frames], "w") as f:
            json.dump(plan, f)
    results = {"machine": machine(args.threads), "settings": vars(args), "patterns": source,
               "assignment": None if args.trained else ASSIGNMENT, "cpu_kernels": cpu_kernels.status(),
               "notes": notes, "cases": []}
    rows = []
    for frames in args.frames:
        model, name = build(frames, args.canvas, args)
        example = inputs(frames, args.canvas)
        tokens = frames * args.canvas * args.canvas
        start = time.perf_counter()
        cm = sg.compile(model, plan=plans.get(frames, plans[args.frames[0]]), example_inputs=example)
        replay = time.perf_counter() - start
        layer_tables = tables(cm)
        nb = math.ceil(tokens / args.block)
        lists = layer_lists(cm, layer_tables, nb)
        per_head = [round(float(((x >= 0).sum((1, 2)) / (nb * nb))[h]), 4)
                    for x in lists[:1] for h in range(x.shape[0])]
        pooled = sum(int(attention_layouts.pooled_heads(t).sum()) for t in layer_tables)
        # a step's attention work over dense: listed blocks, and nb pooled keys a query of pyramid heads
        density = float((sum(int((x >= 0).sum()) for x in lists) + pooled * nb * nb / args.block)
                        / (len(lists) * lists[0].shape[0] * nb * nb))
        bands = bands_over_window(layer_tables[0], nb) if layer_tables else []
        start = time.perf_counter()
        with torch.inference_mode():
            ours_out = cm(*example)
        first = time.perf_counter() - start
        calls = {"dense eager": lambda m=model, e=example: m(*e),
                 "ours (sparsegraph.compile)": lambda c=cm, e=example: c(*e)}
        flex_first = flex_diff = None
        if not args.no_flex:
            step, flex_first, flex_out = flex_step(model, lists, args.block, example)
            if pooled:  # a block mask cannot express pooled keys: flex does the listed blocks only, less work
                calls["flex_attention (torch.compile), listed blocks only"] = step
                notes.append(f"{tokens} tokens: flex_attention runs the listed blocks only; ours also reads "
                             f"the pooled keys of {pooled} pyramid heads (so their outputs differ)")
            else:
                calls["flex_attention (torch.compile)"] = step
                flex_diff = float((_out(ours_out) - _out(flex_out)).abs().max())
        share = attention_share(model, example)
        times, outputs = median_times(calls, args.warmup, args.repeats)
        error = None
        if "dense eager" in outputs:  # the sparse step against the dense one: same weights, same input
            dense_y, ours_y = _out(outputs["dense eager"]), _out(ours_out)
            error = {"relative_l2": round(float((ours_y - dense_y).norm() / dense_y.norm()), 5),
                     "cosine": round(float(F.cosine_similarity(ours_y.flatten(), dense_y.flatten(), 0)), 6)}
        base = times["dense eager"]
        case = {"frames": frames, "grid": [frames, args.canvas, args.canvas], "tokens": tokens, "model": name,
                "density": round(density, 4), "density_per_head_layer0": per_head, "pyramid_heads": pooled,
                "bands_over_window_blocks_layer0": bands,
                "attention_share_of_dense_step": round(share, 3), "seconds": times,
                "speedup": {k: round(base / v, 2) for k, v in times.items()},
                "ours_first_call_s": round(first, 2), "replay_compile_s": round(replay, 2),
                "flex_compile_and_first_call_s": None if flex_first is None else round(flex_first, 2),
                "max_abs_ours_minus_flex": flex_diff, "ours_vs_dense_step_output": error,
                "load_average": os.getloadavg()[0],
                "respecialised_window_heads":
                    cm.plan.passes["sparse_attention"]["stats"]["counters"].get("respecialised_window_heads")}
        results["cases"].append(case)
        print(json.dumps(case), flush=True)
        for k, v in times.items():
            first_s = (case["flex_compile_and_first_call_s"] if k.startswith("flex")
                       else {"ours (sparsegraph.compile)": case["ours_first_call_s"]}.get(k))
            rows.append([tokens, f"{frames}x{args.canvas}x{args.canvas}", f"{density:.3f}",
                         f"{share:.2f}" if k == "dense eager" else "", k, f"{v:.2f}", f"{base / v:.2f}",
                         "" if first_s is None else f"{first_s:.1f}"])
    m = results["machine"]
    md = [machine_line(m), "",
          f"One denoising step (batch 1, fp32, CPU, {args.threads} threads) of "
          f"{results['cases'][0]['model']}, clips of T token frames x {args.canvas} x {args.canvas} tokens "
          "(patch "
          f"{'x'.join(map(str, PATCH))}). Patterns: "
          f"{source}, fitted/made at {args.calib_frames}x8x8 tokens and replayed at each size with "
          "sparsegraph.compile(plan=...) (window_3d heads re-specialised to the long grid). Density = listed "
          f"blocks / all blocks (block {args.block}), a pyramid head's pooled keys counted as blocks' worth "
          "(nb keys a query: nb / block blocks a query block). "
          f"Median of {args.repeats} interleaved rounds after "
          f"{args.warmup} warm-up; speed-up vs dense eager in the same run. First call: ours' first call "
          "after the replay (no compile step); flex: torch.compile + first call. Load average (1 min) at "
          "each size: "
          + ", ".join(f"{c['tokens']}: {c['load_average']:.2f}" for c in results["cases"]) + ".", "",
          *table(["tokens", "grid T x H x W", "density", "attention share of dense step", "candidate",
                  "s / step", "speed-up vs dense", "first call (s)"], rows), "",
          "Per-head density (layer 0) at each size: "
          + "; ".join(f"{c['tokens']}: {c['density_per_head_layer0']}" for c in results["cases"]) + ".", "",
          "The same windows as bands (the diagonals they touch, as multi_diagonal would list them), blocks "
          "over the window's blocks, per head (layer 0): "
          + "; ".join(f"{c['tokens']}: {c['bands_over_window_blocks_layer0']}" for c in results["cases"])
          + ".", ""]
    if any(c["ours_vs_dense_step_output"] for c in results["cases"]):
        md += ["Step output (the velocity) of ours against dense eager, the same weights and input (relative "
               "L2 error, cosine): "
               + ", ".join(f"{c['tokens']}: {c['ours_vs_dense_step_output']['relative_l2']:.4f}, "
                           f"{c['ours_vs_dense_step_output']['cosine']:.5f}"
                           for c in results["cases"] if c["ours_vs_dense_step_output"]) + ".", ""]
    if any(c["max_abs_ours_minus_flex"] is not None for c in results["cases"]):
        md.append("Max |ours - flex_attention| of the step output: "
                  + ", ".join(f"{c['tokens']}: {c['max_abs_ours_minus_flex']:.1e}" for c in results["cases"]
                            if c["max_abs_ours_minus_flex"] is not None))
    if not args.trained:
        md.append(f"\nPer-head assignment (extents [a_t, a_h, a_w] in tokens, cycled over heads): "
                  f"{ASSIGNMENT}.")
    md += ["", *notes]
    write(args.out, args.name, results, "\n".join(md) + "\n")
    return 0


def _out(y):
    return (y.sample if hasattr(y, "sample") else y).float()
