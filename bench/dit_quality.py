"""``python -m bench dit_quality``: the attention patterns of a trained video DiT, how stable they are over
the denoising timesteps, and what sparse attention at each recall costs its samples.

Model: ``zoo:moving_digits_dit`` (a class-conditional video DiT trained here as a rectified-flow denoiser
of sklearn digits moving on a canvas; 8 frames of 32x32 in (2, 4, 4) patches: 256 tokens, frame-major).
Calibration: `moving_digits_dit.calibration` (test clips noised at ``--timesteps``, ``--calibration``
batches of ``--batch`` clips per timestep, labels cycling through the digits).

1. **Patterns.** For each recall r in ``--recalls`` the model is compiled with ``head_patterns`` (block
   ``--block``, its default families, or ``--patterns``) + ``sparse_attention`` (``max_density`` 1: every
   site with a sparse head is rewritten) on all the calibration batches; per layer and head the family
   chosen, its parameters and its block density (listed blocks / all blocks; a pyramid's pooled keys
   counted as blocks' worth) are reported.
2. **Stability over timesteps** (Sparse-vDiT's claim: a head's pattern is stable enough to fix offline).
   ``head_patterns`` is fitted again on each timestep's batches alone, at ``--stability-recall``. Per head
   and timestep: whether the family is the one of the all-timestep fit, the Jaccard overlap of the two
   block masks |A_t ∩ A| / |A_t ∪ A|, and — the figure that decides whether fixing it offline works —
   the recall the *all-timestep* pattern A keeps on that timestep's attention alone,

       R_t(A) = Σ_{(I,J) ∈ A} M_t[h, I, J] / Σ M_t[h],

   with M_t the block attention mass of the timestep's batches, measured here from the eager model's
   own q and k (softmax(q kᵀ/√E) summed over the batch and each block's queries and keys; hooks on each
   attention's ``qkv`` linear). ``dynamic_topk`` and ``skip`` heads list no static blocks: no Jaccard or
   R_t for them; for a ``pyramid`` head both are of its exact near blocks (the rest it reads pooled).
3. **Fidelity of sparse sampling.** ``--samples`` clips (labels 0, 1, …, 9, 0, …), the same seeded noise,
   ``--steps`` Euler steps with guidance ``--guidance`` (`moving_digits_dit.sample`), sampled with the
   dense eager model and with each compiled model. Against the dense clips: PSNR on the pixel scale
   [0, 1] (10·log10(1 / MSE) over all pixels of all clips), mean per-clip cosine of the clips in [−1, 1];
   and `moving_digits_dit.DigitClassifier`'s majority vote over frames: accuracy (= the requested label;
   chance 0.1) and agreement with its vote on the dense clip. The first ``--strip`` clips, dense and at
   each recall, are drawn frame by frame in the HTML report of the sparsest compiled model
   (``<out>/<name>-report.html``, beside its per-layer × per-head pattern grid).

``--target-grid T,H,W`` fits the plans as ``bench dit`` does for long clips (``head_patterns``'
``target_grid``: costed at that grid, dense or pyramid per head); their fidelity is measured here, at the
training size, the one size the model was trained for.

Quality figures do not depend on the machine's load; the seconds recorded do.
"""

from __future__ import annotations

import math
import time

import torch

import sparsegraph as sg
from bench.common import machine, machine_line, parse, parser, table, write
from sparsegraph import attention_layouts
from sparsegraph.models import moving_digits_dit as mdd

STATIC_LESS = ("dynamic_topk", "skip")  # families without a static block mask


def main(argv: list[str] | None = None) -> int:
    ap = parser("dit_quality", __doc__, name="dit-quality-cpu")
    ap.add_argument("--recalls", default="0.9,0.95,0.98")
    ap.add_argument("--stability-recall", type=float, default=0.95)
    ap.add_argument("--block", type=int, default=16, help="block size of head_patterns and the sparse op")
    ap.add_argument("--timesteps", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--calibration", type=int, default=2, help="calibration batches per timestep")
    ap.add_argument("--batch", type=int, default=4, help="clips per calibration batch")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--strip", type=int, default=3, help="clips shown dense vs sparse in the HTML report")
    ap.add_argument("--patterns", default="", help="head_patterns families, comma-separated (default: its "
                    "default candidates; add pyramid to offer it)")
    ap.add_argument("--target-grid", default="", help="head_patterns' target_grid T,H,W (tokens): cost the "
                    "patterns at that grid, as a plan for long clips is (densities are then at that grid)")
    args = parse(ap, argv)
    started = time.perf_counter()
    recalls = [float(r) for r in args.recalls.split(",")]
    timesteps = [float(t) for t in args.timesteps.split(",")]
    model, example = mdd.load(batch=2)
    batches = mdd.calibration(args.calibration, tuple(timesteps), batch=args.batch)
    by_t = {t: batches[i * args.calibration:(i + 1) * args.calibration] for i, t in enumerate(timesteps)}

    # 1. patterns at each recall (and the compiled models for 3.)
    compiled, patterns = {}, {}
    for r in recalls:
        cm = sg.compile(model, _config(args.block, r, rewrite=True, patterns=args.patterns,
                                       target_grid=args.target_grid),
                        example_inputs=example, calibration=batches, quiet=True)
        rewritten = cm.plan.passes["sparse_attention"]["stats"]["rewritten"]
        # a recall where every head stays dense rewrites nothing: no fidelity row for it (it would be dense's)
        compiled[r] = cm if rewritten > 0 else None
        patterns[r] = _heads(cm)
        print(f"recall {r}: {rewritten} sites rewritten, mean density {_mean_density(patterns[r]):.3f}",
              flush=True)

    # how concentrated the attention is: the fewest blocks (block_topk) that hold each recall, per head
    concentration = _concentration(block_mass(model, batches, args.block), recalls)

    # 2. stability over timesteps
    stability = _stability(model, example, batches, by_t, args)

    # 3. fidelity of sparse sampling
    labels = torch.arange(args.samples) % mdd.NUM_CLASSES
    classifier = mdd.DigitClassifier()
    t0 = time.perf_counter()
    dense = mdd.sample(model, labels, steps=args.steps, seed=0, guidance=args.guidance)
    dense_seconds = time.perf_counter() - t0
    dense_pred = classifier.clips(dense)
    samples = {"dense": dense}
    rows = [{"recall": None, "density": 1.0, "psnr": None, "cosine": 1.0,
             "accuracy": float((dense_pred == labels).float().mean()), "agreement": 1.0,
             "seconds": dense_seconds}]
    for r in recalls:
        if compiled[r] is None:
            continue
        t0 = time.perf_counter()
        clip = mdd.sample(compiled[r], labels, steps=args.steps, seed=0, guidance=args.guidance)
        seconds = time.perf_counter() - t0
        pred = classifier.clips(clip)
        samples[f"recall {r}"] = clip
        rows.append({"recall": r, "density": _mean_density(patterns[r]), **_compare(clip, dense),
                     "accuracy": float((pred == labels).float().mean()),
                     "agreement": float((pred == dense_pred).float().mean()), "seconds": seconds})
        print(rows[-1], flush=True)

    results = {"machine": machine(args.threads), "settings": vars(args),
               "model": {"parameters": sum(p.numel() for p in model.parameters()),
                         "tokens": _tokens(), "sites": len(patterns[recalls[0]])},
               "patterns": {str(r): patterns[r] for r in recalls}, "concentration": concentration,
               "rewritten": {str(r): compiled[r] is not None for r in recalls}, "stability": stability,
               "fidelity": rows, "seconds": time.perf_counter() - started}
    write(args.out, args.name, results, _markdown(results, recalls, timesteps, args))
    # the HTML report of the sparsest compiled model, with the dense and sparse samples of the same noise
    sparsest = next((compiled[r] for r in sorted(recalls) if compiled[r] is not None), None)
    if sparsest is not None:
        report = sparsest.report()
        report.add_frames("samples", {f"digit {i}, {name}": clip[i, 0] for i in range(args.strip)
                                      for name, clip in samples.items()})
        report.to_html(f"{args.out}/{args.name}-report.html")
    return 0


def _config(block: int, recall: float, rewrite: bool, patterns: str = "", target_grid: str = "") -> dict:
    options = {"block": block, "recall": recall}
    if patterns:
        options["patterns"] = patterns.split(",")
    if target_grid:
        options["target_grid"] = [int(x) for x in target_grid.split(",")]
    passes: list = [{"head_patterns": options}]
    if rewrite:
        passes.append({"sparse_attention": {"max_density": 1.0}})
    return {"passes": passes}


def _heads(cm) -> list[dict]:
    """Per attention site of `cm`'s plan (graph order): its id and per head pattern, params, density."""
    out = []
    for site in cm.plan.sites:
        if "head_patterns" not in cm.plan.sites[site]:
            continue
        ev = cm.plan.evidence("head_patterns", site)
        out.append({"site": site, "seq_len": ev["seq_len"], "block": ev["block"],
                    "heads": [{"pattern": h["pattern"], "params": h["params"], "density": h["density"],
                               "recall": h["recall"]} for h in ev["heads"]]})
    return out


def _mean_density(sites: list[dict]) -> float:
    densities = [h["density"] for s in sites for h in s["heads"]]
    return sum(densities) / len(densities)


def _tokens() -> int:
    return (mdd.FRAMES // mdd.PATCH[0]) * (mdd.CANVAS // mdd.PATCH[1]) * (mdd.CANVAS // mdd.PATCH[2])


def _mask(head: dict, nq: int, nk: int, block: int) -> torch.Tensor | None:
    """A head's static block mask [nq, nk] (None for families without one)."""
    if head["pattern"] in STATIC_LESS:
        return None
    return attention_layouts.pattern_mask(head["pattern"], head["params"], nq, nk, False, block=block)


@torch.no_grad()
def block_mass(model: mdd.MovingDigitsDiT, batches, block: int) -> list[torch.Tensor]:
    """Per block of `model`: the attention mass M [H, nq, nk] (float64) summed over `batches`, from the
    model's own q and k (hooks on each attention's qkv linear; softmax(q kᵀ/√E))."""
    masses: list[torch.Tensor | None] = [None] * len(model.blocks)

    def hook(index, heads):
        def run(module, inputs, output):
            B, N = output.shape[:2]
            q, k, _ = output.reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4)
            p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # [B, H, N, N]
            n = math.ceil(N / block)
            p = torch.nn.functional.pad(p, (0, n * block - N, 0, n * block - N))
            m = p.view(B, heads, n, block, n, block).sum((0, 3, 5)).double()
            masses[index] = m if masses[index] is None else masses[index] + m
        return run

    handles = [b.attn.qkv.register_forward_hook(hook(i, b.attn.heads)) for i, b in enumerate(model.blocks)]
    try:
        for x, t, label in batches:
            model(x, t, label)
    finally:
        for h in handles:
            h.remove()
    return masses


def _stability(model, example, batches, by_t, args) -> dict:
    """Per head: the all-timestep fit at the stability recall, and per timestep the family, the Jaccard
    overlap with the all-timestep block mask and the recall R_t of the all-timestep mask (docstring)."""
    config = _config(args.block, args.stability_recall, rewrite=False, patterns=args.patterns)
    fits = {"all": _heads(sg.compile(model, config, example_inputs=example, calibration=batches, quiet=True))}
    for t, bs in by_t.items():
        fits[t] = _heads(sg.compile(model, config, example_inputs=example, calibration=bs, quiet=True))
        print(f"stability: fitted at t = {t}", flush=True)
    mass = {t: block_mass(model, bs, args.block) for t, bs in by_t.items()}
    heads = []
    for layer, site in enumerate(fits["all"]):
        n = math.ceil(site["seq_len"] / site["block"])
        for h, ref in enumerate(site["heads"]):
            ref_mask = _mask(ref, n, n, site["block"])
            row = {"site": site["site"], "layer": layer, "head": h, "pattern": ref["pattern"],
                   "params": ref["params"], "density": ref["density"], "per_t": {}}
            for t in by_t:
                got = fits[t][layer]["heads"][h]
                entry = {"pattern": got["pattern"], "same": got["pattern"] == ref["pattern"],
                         "density": got["density"], "jaccard": None, "fixed_recall": None}
                mask = _mask(got, n, n, site["block"])
                if mask is not None and ref_mask is not None:
                    union = int((mask | ref_mask).sum())
                    entry["jaccard"] = int((mask & ref_mask).sum()) / union if union else 1.0
                if ref_mask is not None:
                    m = mass[t][layer][h]
                    entry["fixed_recall"] = float((m * ref_mask).sum() / m.sum())
                row["per_t"][str(t)] = entry
            heads.append(row)
    same = [e["same"] for row in heads for e in row["per_t"].values()]
    jac = [e["jaccard"] for row in heads for e in row["per_t"].values() if e["jaccard"] is not None]
    fixed = {str(t): [row["per_t"][str(t)]["fixed_recall"] for row in heads
                      if row["per_t"][str(t)]["fixed_recall"] is not None] for t in by_t}
    return {"recall": args.stability_recall, "heads": heads,
            "summary": {"family_same_share": sum(same) / len(same),
                        "heads_same_at_every_t": sum(all(e["same"] for e in row["per_t"].values())
                                                     for row in heads),
                        "heads": len(heads),
                        "mean_jaccard": sum(jac) / len(jac) if jac else None,
                        "fixed_recall_mean": {t: sum(v) / len(v) for t, v in fixed.items() if v},
                        "fixed_recall_min": {t: min(v) for t, v in fixed.items() if v}}}


def _concentration(mass: list[torch.Tensor], recalls) -> dict:
    """Per recall r, per layer and head: the share of blocks the fewest blocks holding r of the mass need
    (the density of an unstructured block_topk at r, with no overhead; near r itself: near-uniform)."""
    out = {}
    for r in recalls:
        rows = []
        for m in mass:
            flat = m.flatten(1)
            cum = flat.sort(1, descending=True).values.cumsum(1) / flat.sum(1, keepdim=True)
            rows.append([float(((cum < r - 1e-9).sum(1)[h] + 1) / flat.shape[1]) for h in range(len(m))])
        out[str(r)] = rows
    return out


def _compare(clip: torch.Tensor, dense: torch.Tensor) -> dict:
    mse = float(((clip - dense) / 2).pow(2).mean())  # on the pixel scale [0, 1]
    cos = torch.nn.functional.cosine_similarity(clip.flatten(1), dense.flatten(1), dim=1)
    return {"psnr": 10 * math.log10(1 / mse) if mse > 0 else None, "cosine": float(cos.mean())}  # None: equal


def _short(head: dict) -> str:
    p = head["params"]
    if "extent" in p:  # window_3d, or a pyramid's near window
        detail = "×".join(str(2 * int(a) + 1) for a in p["extent"])
    elif head["pattern"] in ("local", "sink_local") or p.get("near") == "local":
        detail = f"w{p['window']}" + (f" s{p['sinks']}" if "sinks" in p else "")
    elif head["pattern"] in ("multi_diagonal", "vertical_slash"):
        detail = f"{len(p.get('diagonals', []))}d" + (f" {len(p['columns'])}c" if "columns" in p else "")
    elif head["pattern"] == "dynamic_topk":
        detail = f"k{p['k']}"
    else:
        detail = ""
    return f"{head['pattern']} {detail} {head['density']:.2f}".replace("  ", " ")


def _markdown(res: dict, recalls, timesteps, args) -> str:
    m = res["model"]
    lines = [machine_line(res["machine"]),
             f"zoo:moving_digits_dit ({m['parameters'] / 1e6:.2f} M parameters, {m['sites']} attention "
             f"sites, "
             f"{m['tokens']} tokens), block {args.block} ({math.ceil(m['tokens'] / args.block)}² blocks per "
             f"head). Calibration: {args.calibration} batches of {args.batch} test clips at each timestep of "
             f"{timesteps}. Wall time of the run {res['seconds']:.0f} s."
             + (f" Patterns costed at the target grid {args.target_grid} (head_patterns' target_grid: "
                "densities are at that grid, the samples at the training size)" if args.target_grid else ""),
             ""]
    for r in recalls:
        sites = res["patterns"][str(r)]
        counts: dict[str, int] = {}
        for s in sites:
            for h in s["heads"]:
                counts[h["pattern"]] = counts.get(h["pattern"], 0) + 1
        lines += [f"**Patterns at recall {r}** (family, parameters, block density; mean density "
                  f"{_mean_density(sites):.3f}; heads per family: "
                  + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) + ")", "",
                  *table(["site"] + [f"h{i}" for i in range(len(sites[0]["heads"]))],
                         [[s["site"]] + [_short(h) for h in s["heads"]] for s in sites]), ""]
    lines += ["**Concentration of the attention**: per layer, the share of blocks the fewest blocks holding "
              "the recall need, over the heads (min–max; all calibration batches). Near the recall itself "
              "means near-uniform attention, where every structured pattern stays dense.", "",
              *table(["layer"] + [f"recall {r}" for r in recalls],
                     [[str(i)] + [f"{min(res['concentration'][str(r)][i]):.2f}–"
                                  f"{max(res['concentration'][str(r)][i]):.2f}" for r in recalls]
                      for i in range(len(res["concentration"][str(recalls[0])]))]), ""]
    for r in recalls:
        if not res["rewritten"][str(r)]:
            lines += [f"At recall {r} every head stayed dense: sparse_attention rewrote no site, so there is "
                      "no fidelity row for it.", ""]
    st = res["stability"]
    s = st["summary"]
    lines += [f"**Stability over timesteps** (recall {st['recall']}): the family fitted on one timestep's "
              f"batches alone equals the all-timestep one in {s['family_same_share']:.0%} of head × timestep "
              f"cases ({s['heads_same_at_every_t']} of {s['heads']} heads at every timestep); mean "
              "Jaccard of the block masks "
              + (f"{s['mean_jaccard']:.2f}" if s["mean_jaccard"] is not None else "n/a")
              + ". Recall the all-timestep pattern keeps on each timestep alone (mean / worst head): "
              + ", ".join(f"t={t}: {s['fixed_recall_mean'][t]:.3f} / {s['fixed_recall_min'][t]:.3f}"
                          for t in s["fixed_recall_mean"]) + ".", "",
              "Per head: all-timestep family and density; per timestep: family (= if the same), Jaccard J, "
              "recall R of the all-timestep pattern (a pyramid's: of its exact near blocks; it reads the "
              "rest pooled).", ""]
    ts = [str(t) for t in timesteps]

    def cell(e):
        fam = "=" if e["same"] else e["pattern"]
        jac = f"J {e['jaccard']:.2f}" if e["jaccard"] is not None else "J –"
        rec = f"R {e['fixed_recall']:.3f}" if e["fixed_recall"] is not None else "R –"
        return f"{fam} {jac} {rec}"

    lines += table(["head", "all t"] + [f"t={t}" for t in ts],
                   [[f"{row['site']} h{row['head']}", _short(row)] + [cell(row["per_t"][t]) for t in ts]
                    for row in st["heads"]])
    lines += ["", f"**Fidelity of sparse sampling**: {args.samples} clips (labels 0–9 cycling), {args.steps} "
              f"Euler steps, guidance {args.guidance}, the same seeded noise; PSNR (pixel scale [0, 1]) and "
              "cosine of the final clips vs dense; classifier accuracy (majority vote over frames = "
              "requested label; chance 0.1) and agreement with its vote on the dense clip.", "",
              *table(["attention", "mean block density", "PSNR vs dense (dB)", "cosine vs dense",
                      "classifier accuracy", "agreement with dense", "sampling s"],
                     [["dense" if r["recall"] is None else f"head_patterns recall {r['recall']}",
                       f"{r['density']:.3f}", "∞" if r["psnr"] is None else f"{r['psnr']:.1f}",
                       f"{r['cosine']:.4f}", f"{r['accuracy']:.2f}", f"{r['agreement']:.2f}",
                       f"{r['seconds']:.1f}"] for r in res["fidelity"]]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
