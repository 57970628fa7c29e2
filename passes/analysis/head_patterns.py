"""``head_patterns``: per attention head, the cheapest static block pattern that keeps its attention mass.

Runs the calibration batches through the graph and, at every attention site, measures the attention
probabilities P[b, h, i, j]: for explicit attention the softmax output is observed; for SDPA sites they
are recomputed from the observed q, k (and mask) as softmax(q kᵀ · scale + mask), streaming over
chunks of query rows so memory stays O(chunk · S), never O(L · S). Padding query rows (from an
``attention_mask`` input) are left out. Per head, the mass of each (query block, key block) pair at
the kernel's block size ``block`` is accumulated:

    M[h, I, J] = Σ_b Σ_{i ∈ I, i not padding} Σ_{j ∈ J} P[b, h, i, j]       (each query row has mass 1)

A pattern is a set of blocks A; its recall is R(A) = Σ_{(I,J) ∈ A} M[h, I, J] / Σ M[h]. Candidates
(causal sites only list blocks J ≤ I):

- ``dense``: every block (R = 1);
- ``local`` (w): |I − J| < w (causal: 0 ≤ I − J < w);
- ``sink_local`` (s, w), A-shape / StreamingLLM: J < s, or local(w);
- ``multi_diagonal`` (diagonals D), as in video / DiT models whose tokens attend to the same place in
  other frames: I − J ∈ D at fixed offsets; built greedily from nothing, each step adding the diagonal
  with the most new mass per new block;
- ``vertical_slash`` (columns C, diagonals D), MInference: J ∈ C or I − J ∈ D (0 ∈ D always); built
  greedily, each step adding the column or diagonal with the most new mass per new block;
- ``block_topk``: the fewest blocks, taken by mass, that reach the recall (static, from calibration);
- ``dynamic_topk`` (t): chosen per input at run time (``sparsegraph::dynamic_block_sparse_attention``):
  each query block lists the diagonal and the key blocks of highest block-mean score q̄_I·k̄_J, t in
  all. On calibration the same estimate is made per input and its captured mass summed,

      C(t) = Σ_b Σ_I Σ_{J ∈ top_t(est_b[I])} M_b[h, I, J]

  and t is the smallest with C(t) ≥ recall · Σ M (q and k observed at SDPA sites; at explicit chains
  kᵀ, the scale and the masks are read as the rewrite reads them). For heads whose attention moves
  with the input, where any static pattern must list the union over inputs;

- ``window_3d`` (extent a = [a_t, a_h, a_w], on the site's token grid T × H × W): video tokens see the
  keys within a box of frames × rows × columns around them (`attention_layouts.window_block_mask`).
  Fitted at the *token* level, so that it means the same at another grid: the attention mass per
  displacement (Δt, Δh, Δw) is accumulated,

      D[h, Δt, Δh, Δw] = Σ_b Σ_{i real} Σ_{j: pos(j) − pos(i) = Δ} P[b, h, i, j],

  the token recall of a box is the share of D inside it, and the extent taken is the box with the
  fewest token pairs on the grid, Π_d (N_d (2a_d + 1) − a_d (a_d + 1)), whose token recall is ≥ recall
  (ties: the shorter in time). Its block recall at the calibration grid is at least that (blocks hold
  whole boxes). Only where the grid is known: the Conv3d patch embedding upstream of the site
  (`attention_layouts.token_grid`), or the option ``grid: [T, H, W]``; the evidence records it. Why
  token level: a DiT is trained and calibrated on short clips where a 64-token block is a whole frame,
  and used on long ones; a box in grid units carries over (re-specialised by ``sparse_attention``),
  a block-level fit at the short grid would not;

- ``pyramid`` (near part ``window_3d`` where the grid is known, else ``local``): the near part's blocks
  exactly and every other block through its pooled key (mean key and value, weighted by its tokens:
  `sparsegraph.codegen.block_sparse_attention`). It changes values beyond the listed blocks, so recall
  does not judge it; its output does, in a second calibration pass. Near parts are fitted at the near
  recalls r ∈ `NEAR_RECALLS` (``fit_window`` / ``local`` as above), and for each the head's output
  error on calibration is measured,

      err(A) = Σ_b Σ_i ‖o_A,i − o_i‖² / Σ_b Σ_i ‖o_i‖²      (o: dense attention output of the head),

  against the error of ``block_topk`` at ``recall`` (the fewest exact blocks that keep the recall). A
  near part whose pyramid errs no more than that is a candidate, costed as its blocks plus the pooled
  keys (nq · nk / block blocks' worth); the cheapest is offered. The head's recall is the near part's
  exact mass, its density its cost over the dense blocks, and ``error`` / ``error_bound`` record the
  two errors. Only at non-causal SDPA sites without a mask (a pooled key would mix keys a mask tells
  apart); not a default candidate (the second pass costs a calibration run). Why the error test, not
  recall: far blocks read pooled still hold their mass, so recall would call every pyramid perfect;
  judged by output, a pyramid is taken only where it is at least as faithful as the best exact pattern
  the recall target allows. On long clips the pooled level is what keeps far context for heads whose
  attention is broad (`docs/diffusion.md`);

- ``skip``: the head computes nothing and its output is replaced by its calibrated mean ō_h. Recall
  does not judge this one; the head's output does: with o_h [E] the head's attention output per query
  row, its share of the site's output variation is

      share_h = E‖o_h − ō_h‖² / Σ_h' E‖o_h'‖²

  and a head with share_h ≤ ``skip_share`` is skipped (off by default: ``skip_share`` = 0).

**Costed at the target grid** (``target_grid: [T, H, W]``, video sites). A DiT is calibrated on the short
clips it was trained on and run on long ones, where a pattern costs something else: a window covering
most of a 4-frame clip is a few percent of a 32-frame one, so a head the short clip keeps dense can be
cheap at the long one. With a target grid, each candidate's blocks, its density and the ``min_saving``
test are counted on the target's grid of blocks (`blocks_at`); recall and a pyramid's error are still
judged on calibration, the only attention observed. Only dense and pyramid are candidates there
(`TARGET_FAMILIES`): a plain window drops every key beyond its box, and on a grid larger than
calibration's that is mass calibration never saw (a window covering the whole short clip has recall 1
and says nothing about the long one), whereas a pyramid reads those blocks pooled and drops none; the
block-offset families and ``block_topk`` are bound to the calibration grid (``sparse_attention``
refuses them at another) and ``dynamic_topk``'s block count to its length. Sites without a token grid
are costed at calibration (counter ``costed_at_calibration``); the evidence records ``cost_grid``.

Each family's parameters are grown until R ≥ ``recall`` (per site through config overrides), and the
head takes the family with the lowest cost = blocks · (1 + overhead). ``block_topk`` is the minimum
number of blocks by construction, but it is fitted to the calibration sample and tied to its length,
so it carries ``topk_overhead`` (default 0.25): a structured pattern within 25% of its block count
wins. ``dynamic_topk`` carries the same overhead (its estimate, and its layouts are gathered, never
tiled). Ties go to the simpler family (the order above). Dense is always possible; a sparse pattern
must save at least ``min_saving`` (default 0.2) of the blocks, as the sparse kernel's gathers and
per-block overhead eat small savings (a head with diffuse attention stays dense).

Written to the plan as evidence per site: the block size, calibration length, the groups of heads
with the same pattern and parameters (the same layout: the CPU kernel runs a group's shared tiles as
one call, and a plan reader sees at a glance how many distinct layouts a site has), per head the
pattern, its parameters, recall and density (listed blocks / dense blocks, causal: / lower-triangular blocks),
the block mask (as lists) and the per-head mass grid summary; the summary holds the mean density per
layer. Evidence a plan supplies instead of calibration is checked against the site (`check_evidence`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F

from sparsegraph import attention_scores, facts, ir, png, svg
from sparsegraph.attention_layouts import FAMILIES, allowed_blocks, pattern_mask, token_grid
from sparsegraph.codegen import block_sparse_attention as bsa
from sparsegraph.codegen import dynamic_block_sparse_attention as dynamic
from sparsegraph.errors import CalibrationError, ConfigError
from sparsegraph.observe import Observer
from sparsegraph.pass_contract import AnalysisPass, option
from sparsegraph.registry import register_pass
from sparsegraph.sections import Section

DEFAULT_FAMILIES = tuple(f for f in FAMILIES if f != "pyramid")
NEAR_RECALLS = (0.5, 0.6, 0.7, 0.8, 0.9)  # the near parts a pyramid is tried with (module docstring)


@register_pass("head_patterns")
@dataclass(frozen=True)
class HeadPatterns(AnalysisPass):
    """Per-head static block patterns chosen from calibration attention mass (see the module docstring)."""

    needs_calibration = True

    recall: float = option(0.95, "attention mass each head's pattern must keep (at least 1/1000: at 0 every "
                           "head would take a pattern that lists no block and outputs zeros)",
                           range=(0.001, 1.0))
    block: int = option(64, "block size of the kernel the layouts are for", range=(1, None))
    patterns: tuple[str, ...] = option(DEFAULT_FAMILIES, "candidate pattern families (all: "
                                       f"{', '.join(FAMILIES)}; pyramid is not a default: it costs a second "
                                       "calibration pass)", choices=None)
    topk_overhead: float = option(0.25, "relative cost added to block_topk (fitted to calibration)",
                                  range=(0.0, None))
    min_saving: float = option(0.2, "a sparse pattern must list at most (1 − this) of the dense blocks",
                               range=(0.0, 1.0))
    query_chunk: int = option(256, "query rows per step when recomputing SDPA probabilities", range=(1, None))
    grid: tuple[int, ...] = option((), "token grid [T, H, W] of video sites (frame-major tokens) for "
                                   "window_3d; empty: found from the Conv3d patch embedding", choices=None)
    target_grid: tuple[int, ...] = option((), "token grid [T, H, W] the compiled model will run at (a longer "
                                          "clip, a larger canvas): video sites are costed there, with the "
                                          "families that carry to it; empty: at the calibration grid",
                                          choices=None)
    skip_share: float = option(0.0, "skip a head (replace its output by its calibrated mean) when its output "
                               "varies by at most this share of the site's output energy; 0: never",
                               range=(0.0, 1.0))

    def __post_init__(self):
        super().__post_init__()
        unknown = [p for p in self.patterns if p not in FAMILIES]
        if unknown:
            raise ConfigError(f"head_patterns: unknown pattern families {unknown}; known: {list(FAMILIES)}")
        for name, why in (("grid", "to find it from a Conv3d"),
                          ("target_grid", "to cost at the calibration grid")):
            value = getattr(self, name)
            if len(value) not in (0, 3) or any(int(x) < 1 for x in value):
                raise ConfigError(f"option '{name}' of pass 'head_patterns' is {list(value)}: give [T, H, W] "
                                  f"token counts (each ≥ 1), or leave it empty {why}")
        if not self.patterns:
            raise ConfigError("option 'patterns' of pass 'head_patterns' is empty, so every head would stay "
                              f"dense; list candidate families from {list(FAMILIES)}")

    def check_evidence(self, site, evidence, gm):
        found = next((s for s in ir.attention_sites(gm) if s.id == site), None)
        if found is None:
            evidence.fail(f"names {site!r}, which is not an attention site of this graph")
        if facts.SitePatterns.from_json(evidence, found.heads).causal != found.causal:
            evidence["causal"].fail(f"is {evidence['causal'].value}, but the site's attention is "
                                    f"{'causal' if found.causal else 'not causal'}")

    @classmethod
    def report_section(cls, plan, model=None):
        """The layer × head grid of the chosen patterns (SVG, and a PNG saved beside the HTML)."""
        grid = _head_grid_png(plan)
        return Section(figures=_head_grid(plan), images={"head-grid.png": grid} if grid else {})

    def analyze(self, gm, ctx, stats):
        for site in ir.cross_attention_sites(gm):
            stats.matched += 1
            stats.refuse(site.id, "cross-attention (keys from another sequence than the queries): block "
                         "patterns are fitted to self-attention")
        sites = ir.attention_sites(gm)
        grids = {}
        for site in sites:
            grid = tuple(int(x) for x in self.grid) or token_grid(gm, site)
            q = ir.shape(site.q)
            if grid and q is not None and math.prod(grid) == q[2] and not site.causal:
                grids[site.id] = grid
            elif self.grid and q is not None:
                raise ConfigError(f"head_patterns: grid {list(self.grid)} has {math.prod(self.grid)} tokens, "
                                  f"site {site.id} has {q[2]} (and must not be causal): give the token "
                                  "grid of this model at the example's size")
        targets = self._targets(sites, grids, stats)
        observer = _Observer(gm, sites, self.block, self.query_chunk, grids)
        for batch in ctx.progress(ctx.calibration, "head_patterns"):
            observer.run_batch(batch.args, batch.kwargs)
        fits = {}  # site → (options, length, mass, shifts)
        for site in sites:
            opts = ctx.options(self, site.id, site.module_path)
            observed = observer.result(site)
            stats.matched += 1
            if observed is None:
                stats.refuse(site.id, "no attention probabilities were observed (the site did not run)")
                continue
            length, mass = observed
            if not bool(torch.isfinite(mass).all()):
                raise CalibrationError(f"the attention at site {site.id} was not finite on the calibration "
                                       "data (NaN or inf scores): check the model and the data")
            if float(mass.sum()) <= 0:
                raise CalibrationError(f"no attention was observed at site {site.id}: every query row of "
                                       "every calibration batch was padding; give batches with real tokens")
            _check_coverage(site, length, mass[0].sum(-1), self.block)
            shifts = observer.displacements.get(site.id, {}).get(length) if site.id in grids else None
            fits[site.id] = (opts, length, mass, shifts)
        pyramids = self._pyramids(gm, ctx, sites, fits, grids, targets, stats)
        per_layer = {}
        for site in sites:
            if site.id not in fits:
                continue
            opts, length, mass, shifts = fits[site.id]
            shares, means = observer.output_shares(site)
            captured = observer.captured.get(site.id, {}).get(length)
            grid = grids.get(site.id)
            windows = [None if shifts is None or "window_3d" not in opts.patterns
                       else fit_window(shifts[h], grid, opts.recall) for h in range(len(mass))]
            offered = pyramids.get(site.id, [None] * len(mass))
            heads = [choose(m, site.causal, opts.recall, opts.patterns, opts.topk_overhead, opts.min_saving,
                            captured=None if captured is None else captured[h], window=windows[h],
                            block=self.block, pyramid=offered[h], target=targets.get(site.id))
                     for h, m in enumerate(mass)]
            for h, head in enumerate(heads):
                head["output_share"] = round(float(shares[h]), 6)
                if "skip" in opts.patterns and opts.skip_share > 0 and shares[h] <= opts.skip_share:
                    head.update(pattern="skip", params={"mean": [round(float(x), 6) for x in means[h]]},
                                recall=0.0, density=0.0, blocks=0)
            groups: dict[str, list[int]] = {}
            for h, head in enumerate(heads):
                groups.setdefault(json.dumps([head["pattern"], head["params"]], sort_keys=True), []).append(h)
            ctx.plan.set_evidence(self.name, site.id, facts.SitePatterns(
                block=self.block, seq_len=length, causal=site.causal, recall_target=opts.recall,
                heads=[facts.HeadChoice(**h) for h in heads],
                groups=[{"pattern": json.loads(key)[0], "heads": hs} for key, hs in groups.items()],
                density=sum(h["density"] for h in heads) / len(heads),
                grid=list(grid) if grid else None,
                cost_grid=list(targets[site.id]) if site.id in targets else None).to_json())
            per_layer[site.id] = sum(h["density"] for h in heads) / len(heads)
        ctx.plan.set_summary(self.name, {"batches": len(ctx.calibration), "density_per_site": per_layer,
                                         "block": self.block})
        stats.counters.update(batches=len(ctx.calibration),
                              heads=sum(len(next(iter(m.values()))) for m in observer.masses.values()))

    def _targets(self, sites, grids, stats) -> dict[str, tuple[int, int, int]]:
        """Per video site, the ``target_grid`` its patterns are costed at (where it differs from the
        calibration grid); sites without a token grid are costed at calibration, and counted."""
        if not self.target_grid:
            return {}
        target = tuple(int(x) for x in self.target_grid)
        missed = [s.id for s in sites if s.id not in grids]
        if missed:
            stats.counters["costed_at_calibration"] = {
                s: "no token grid (no Conv3d patch embedding, or causal): target_grid applies to video sites"
                for s in missed}
        return {s.id: target for s in sites if s.id in grids and grids[s.id] != target}

    def _pyramids(self, gm, ctx, sites, fits, grids, targets, stats) -> dict[str, list[dict | None]]:
        """Per site, per head: the cheapest ``pyramid`` that errs no more than ``block_topk`` at the recall
        (module docstring), or None; measured in a second calibration pass over the sites that offer it."""
        offered, refused = {}, {}
        for site in sites:
            if site.id not in fits or "pyramid" not in fits[site.id][0].patterns:
                continue
            if site.causal or site.masks or site.form != "sdpa" or not site.readable:
                refused[site.id] = ("causal or masked attention (a pooled key would mix keys the mask tells "
                                    "apart)" if site.causal or site.masks else "not an SDPA call")
                continue
            opts, length, mass, shifts = fits[site.id]
            offered[site.id] = (length, [pyramid_candidates(m, opts.recall, self.block, grids.get(site.id),
                                                            None if shifts is None else shifts[h],
                                                            targets.get(site.id))
                                         for h, m in enumerate(mass)])
        if refused:
            stats.counters["pyramid_not_offered"] = refused
        if not offered:
            return {}
        errors = _OutputErrors(gm, [s for s in sites if s.id in offered], offered, self.block,
                               self.query_chunk)
        for batch in ctx.progress(ctx.calibration, "head_patterns (pyramid errors)"):
            errors.run_batch(batch.args, batch.kwargs)
        stats.counters["pyramid_error_batches"] = len(ctx.calibration)
        return {site: [best_pyramid(c, errors.relative(site)[h]) for h, c in enumerate(per_head)]
                for site, (_, per_head) in offered.items()}


def _check_coverage(site, length: int, rows: torch.Tensor, block: int) -> None:
    """Refuse to fit patterns where calibration saw no queries: every query block must have observed at
    least one block's worth of real (unpadded) query rows, summed over the batches. Otherwise patterns
    are fitted to nothing there (measured: short sentences padded to 512 tokens gave every MiniLM head
    a one-block layout, recall 1.0 on calibration and cosine 0.55 on long text)."""
    need = torch.tensor([min(block, length - i * block) for i in range(len(rows))], dtype=rows.dtype)
    thin = (rows < need - 1e-6).nonzero().view(-1).tolist()
    if thin:
        positions = f"{thin[0] * block}–{min(length, (thin[-1] + 1) * block) - 1}"
        raise CalibrationError(
            f"calibration at length {length} saw {int(rows.sum())} real query rows at site {site.id}, and "
            f"{len(thin)} of {len(rows)} query blocks (positions {positions}) saw fewer than one block of "
            f"them: patterns there would be fitted to nothing. Calibrate on sequences that fill the length "
            f"({length} tokens: longer texts, less padding)")


# --------------------------------------------------------------------------------------- patterns


def choose(mass: torch.Tensor, causal: bool, recall: float, families=FAMILIES, topk_overhead: float = 0.25,
           min_saving: float = 0.2, captured: torch.Tensor | None = None, window: dict | None = None,
           block: int | None = None, pyramid: dict | None = None, target=None) -> dict:
    """The cheapest pattern of `families` whose recall on `mass` [nq, nk] is ≥ `recall`.

    `captured` [nk]: C(t) of ``dynamic_topk`` for t = 1 … nk (None: that family is not available).
    `window`: the ``window_3d`` parameters `fit_window` chose (None: not available), laid out at the
    site's `block`. `pyramid`: the ``pyramid`` `best_pyramid` found (None: not available), judged by its
    output error rather than recall, its cost already at the cost grid (`pyramid_candidates`).
    `target`: the token grid [T, H, W] to cost at (None: the calibration grid): only the families that
    carry to it (`TARGET_FAMILIES`) are candidates, recall is still judged on calibration, and blocks,
    density and ``min_saving`` are counted on the target's grid of blocks (`blocks_at`).
    Dense is always a candidate; a sparse pattern must cost at most (1 − min_saving) of it, and one
    whose kept mass falls short of the recall is never taken, whatever its fit said.
    """
    nq, nk = mass.shape
    allowed = allowed_blocks(nq, nk, causal)
    mass = mass.double() * allowed
    total = float(mass.sum())
    if not total > 0:
        raise ValueError(f"no attention mass to choose a pattern from (total {total})")
    possible = int(allowed.sum()) if target is None else blocks_at("dense", {}, target, block)
    found = []
    for family in families:
        if target is not None and family not in TARGET_FAMILIES:
            continue
        if family == "pyramid":
            if pyramid is not None and pyramid["cost"] <= (1 - min_saving) * possible:
                found.append((pyramid["cost"], FAMILIES.index(family), family, pyramid["params"],
                              pyramid["blocks"], pyramid["kept"] * total))
            continue
        if family == "dynamic_topk":
            fitted = _fit_dynamic(captured, allowed, recall * total)
        elif family == "window_3d":
            mask = (None if window is None
                    else pattern_mask(family, window, nq, nk, causal, block=block))
            fitted = None if mask is None else (window, int(mask.sum()), float((mass * mask).sum()))
        else:
            params = _fit(family, mass, allowed, causal, recall * total)
            mask = None if params is None else pattern_mask(family, params, nq, nk, causal)
            fitted = None if params is None else (params, int(mask.sum()), float((mass * mask).sum()))
        if fitted is None:
            continue
        params, blocks, kept = fitted
        if kept < recall * total - 1e-9 * total:
            continue
        if target is not None:
            blocks = blocks_at(family, params, target, block)
        cost = blocks * (1 + (topk_overhead if family in ("block_topk", "dynamic_topk") else 0.0))
        if family != "dense" and cost > (1 - min_saving) * possible:
            continue
        found.append((cost, FAMILIES.index(family), family, params, blocks, kept))
    if not found or "dense" not in families:
        found.append((possible, 0, "dense", {}, possible, total))
    cost, _, family, params, blocks, kept = min(found, key=lambda t: (t[0], t[1]))
    if family == "pyramid":  # its density is its work: the near blocks and the pooled keys
        return {"pattern": family, "params": params, "recall": round(kept / total, 6),
                "density": round(cost / max(possible, 1), 6), "blocks": blocks,
                "error": round(pyramid["error"], 8), "error_bound": round(pyramid["error_bound"], 8)}
    return {"pattern": family, "params": params, "recall": round(kept / total, 6),
            "density": round(blocks / max(possible, 1), 6), "blocks": blocks}


TARGET_FAMILIES = ("dense", "pyramid")  # what is costed at a target grid (module docstring: why not windows)


def blocks_at(family: str, params: dict, target, block: int) -> int:
    """The blocks a ``dense`` or ``pyramid`` (its near part, a ``window_3d``) head lists on the token grid
    `target` [T, H, W] in blocks of `block` tokens: its extents are tokens, so they carry (as
    ``sparse_attention`` re-specialises them)."""
    n = -(-math.prod(target) // block)
    if family == "dense":
        return n * n
    return int(pattern_mask(family, {**params, "grid": list(target)}, n, n, False, block=block).sum())


def pyramid_candidates(mass: torch.Tensor, recall: float, block: int, grid=None,
                       shifts: torch.Tensor | None = None, target=None) -> list[dict]:
    """What a ``pyramid`` is measured against and tried as, for one head's block mass [nq, nk]: first the
    reference, ``block_topk`` at `recall` (exact: ``pooled`` False), then one pyramid per near recall in
    `NEAR_RECALLS` (distinct near parts only): ``window_3d`` fitted on the displacement mass `shifts`
    where the token `grid` is known, else ``local``. Each holds its block ``mask`` [nq, nk]; pyramids also
    their ``params``, listed ``blocks``, ``cost`` (blocks + nq · nk / block: the pooled keys) and the
    exact mass share they ``kept``; blocks and cost on the grid of token grid `target` (`blocks_at`),
    where given, else on the calibration grid."""
    nq, nk = mass.shape
    mass = mass.double()
    total = float(mass.sum())
    allowed = allowed_blocks(nq, nk, False)
    topk = _fit("block_topk", mass, allowed, False, recall * total)
    out = [{"mask": pattern_mask("block_topk", topk, nq, nk, False), "pooled": False}]
    seen = set()
    for r in NEAR_RECALLS:
        if grid is not None and shifts is not None:
            near = fit_window(shifts, grid, r)
            params = None if near is None else {"near": "window_3d", **near}
        else:
            near = _fit("local", mass, allowed, False, r * total)
            params = None if near is None else {"near": "local", **near}
        key = json.dumps(params, sort_keys=True)
        if params is None or key in seen:
            continue
        seen.add(key)
        mask = pattern_mask("pyramid", params, nq, nk, False, block=block)
        blocks, cells = int(mask.sum()), nq * nk
        if target is not None:
            blocks, cells = blocks_at("pyramid", params, target, block), blocks_at("dense", {}, target, block)
        out.append({"params": params, "mask": mask, "pooled": True, "blocks": blocks,
                    "cost": blocks + cells / block, "kept": float((mass * mask).sum()) / total})
    return out


def best_pyramid(candidates: list[dict], error: torch.Tensor) -> dict | None:
    """The cheapest pyramid of `candidates` (`pyramid_candidates`) whose relative output error (`error`
    [C], in the same order) is at most the reference's (the first), with both errors; None if none is."""
    bound = float(error[0])
    fit = [(c["cost"], i) for i, c in enumerate(candidates) if i and float(error[i]) <= bound]
    if not fit:
        return None
    i = min(fit)[1]
    return {**{k: candidates[i][k] for k in ("params", "cost", "blocks", "kept")},
            "error": float(error[i]), "error_bound": bound}


def fit_window(shifts: torch.Tensor, grid, recall: float) -> dict | None:
    """``window_3d``'s extent from one head's displacement mass `shifts` [2T−1, 2H−1, 2W−1] (index
    Δ + N − 1): the box with the fewest token pairs on `grid` whose share of the mass is ≥ `recall`
    (module docstring); None when there is no mass."""
    T, H, W = grid
    total = float(shifts.sum())
    if not total > 0:
        return None
    # box sums through a 3-D inclusive prefix sum, zero-padded in front
    c = F.pad(shifts.double().cumsum(0).cumsum(1).cumsum(2), (1, 0, 1, 0, 1, 0))
    at, ah, aw = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    lo = [T - 1 - at, H - 1 - ah, W - 1 - aw]
    hi = [T + at, H + ah, W + aw]  # exclusive, in the padded prefix-sum index
    box = torch.zeros(T, H, W, dtype=torch.float64)
    for corner in range(8):
        pick = [hi[d] if corner >> d & 1 else lo[d] for d in range(3)]
        sign = 1 if (3 - bin(corner).count("1")) % 2 == 0 else -1
        box += sign * c[pick[0], pick[1], pick[2]]
    pairs = ((T * (2 * at + 1) - at * (at + 1)) * (H * (2 * ah + 1) - ah * (ah + 1))
             * (W * (2 * aw + 1) - aw * (aw + 1))).double()
    ok = box >= recall * total - 1e-9 * total
    if not bool(ok.any()):
        return None
    key = torch.where(ok, pairs * T + at, torch.full_like(pairs, float("inf")))  # fewest pairs, then a_t
    flat = int(key.flatten().argmin())
    return {"extent": [int(at.flatten()[flat]), int(ah.flatten()[flat]), int(aw.flatten()[flat])],
            "grid": [int(T), int(H), int(W)]}


def _fit_dynamic(captured, allowed, need) -> tuple[dict, int, float] | None:
    """``dynamic_topk``: the smallest t whose captured mass C(t) meets `need` (None if not observed or
    none does), with the blocks it lists (a causal row lists at most the blocks it sees) and C(t)."""
    if captured is None:
        return None
    reached = (captured.double() >= need - 1e-9).nonzero()
    if not len(reached):
        return None
    t = int(reached[0]) + 1
    return {"k": t}, int(allowed.sum(1).clamp(max=t).sum()), float(captured[t - 1])


def _recall_ok(mass, mask, need):
    return float((mass * mask).sum()) >= need - 1e-9


def _fit(family, mass, allowed, causal, need) -> dict | None:
    nq, nk = mass.shape
    if family == "dense":
        return {}
    if family == "skip":
        return None  # decided from the head's output share, not from recall (see HeadPatterns.analyze)
    if family == "local":
        for w in range(1, max(nq, nk) + 1):
            if _recall_ok(mass, pattern_mask("local", {"window": w}, nq, nk, causal), need):
                return {"window": w}
        return None
    if family == "sink_local":
        best = None
        for s in range(1, nk + 1):
            for w in range(1, max(nq, nk) + 1):
                p = {"sinks": s, "window": w}
                mask = pattern_mask("sink_local", p, nq, nk, causal)
                if best is not None and int(mask.sum()) >= best[0]:
                    break
                if _recall_ok(mass, mask, need):
                    best = (int(mask.sum()), p)
                    break
        return best[1] if best else None
    if family == "vertical_slash":
        return _fit_greedy(mass, allowed, need, columns=True)
    if family == "multi_diagonal":
        return _fit_greedy(mass, allowed, need, columns=False)
    if family == "block_topk":
        order = mass.flatten().argsort(descending=True)
        cum = mass.flatten()[order].cumsum(0)
        count = int((cum < need - 1e-9).sum()) + 1
        chosen = torch.zeros(nq * nk, dtype=torch.bool)
        chosen[order[:min(count, nq * nk)]] = True
        chosen = chosen.view(nq, nk) & allowed
        return {"shape": [nq, nk], "blocks": [row.nonzero().view(-1).tolist() for row in chosen]}
    raise ValueError(family)


def _fit_greedy(mass, allowed, need, columns: bool) -> dict | None:
    """Columns and diagonals (vertical_slash: the main diagonal first) or diagonals only (multi_diagonal,
    from nothing), added greedily by new mass per new block until the recall is met."""
    nq, nk = mass.shape
    rel = torch.arange(nq)[:, None] + (nk - nq) - torch.arange(nk)[None, :]
    offsets = sorted(set(rel[allowed].tolist()))
    items = ([("column", c, (torch.arange(nk)[None, :] == c).expand(nq, nk)) for c in range(nk)]
             if columns else [])
    items += [("diagonal", d, rel == d) for d in offsets if d != 0 or not columns]
    stacked = torch.stack([m & allowed for _, _, m in items])  # [items, nq, nk]
    chosen = {"columns": [], "diagonals": [0]} if columns else {"diagonals": []}
    mask = (rel == 0) & allowed if columns else torch.zeros(nq, nk, dtype=torch.bool)
    while not _recall_ok(mass, mask, need):
        new = stacked & ~mask
        gain = (new * mass).sum((1, 2))
        count = new.sum((1, 2)).clamp(min=1)
        score = torch.where(new.any(2).any(1), gain / count, torch.full_like(gain, -1.0))
        best = int(score.argmax())
        if score[best] < 0:
            return None if not columns else {k: sorted(v) for k, v in chosen.items()}
        kind, value, _ = items[best]
        chosen["columns" if kind == "column" else "diagonals"].append(value)
        mask = mask | stacked[best]
    return {k: sorted(v) for k, v in chosen.items()}


# --------------------------------------------------------------------------------------- observer


class _Observer(Observer):
    """Runs the graph and accumulates per-site block attention mass M [H, nq, nk] (padding rows dropped)."""

    def __init__(self, gm, sites, block, chunk, grids=None):
        super().__init__(gm)
        self.grids = grids or {}  # site → (T, H, W): displacement mass for window_3d
        self.displacements: dict[str, dict[int, torch.Tensor]] = {}  # site → length → D [H, 2T−1, 2H−1, 2W−1]
        self.block, self.chunk = block, max(block, chunk // block * block)
        self.at: dict[torch.fx.Node, ir.AttentionSite] = {}
        # explicit chains' q, kᵀ, v and masks: the interpreter frees them before the softmax runs, so
        # they are kept here until the site's capture
        self.kept: dict[torch.fx.Node, torch.Tensor | None] = {}
        for s in sites:
            if s.form == "sdpa":
                self.at[s.out] = s
                continue
            self.at[next(n for n in s.core if ir.kind(n) == "softmax")] = s
            if s.readable:
                self.kept.update({n: None for n in (s.q, s.k, s.v, *(m for m, _ in s.masks))})
        self.masses: dict[str, dict[int, torch.Tensor]] = {}
        self.outs = {s.out: s for s in sites}
        self.moments: dict[str, list] = {}  # site → [rows, Σ o [H, E], Σ ‖o‖² [H]]
        self.captured: dict[str, dict[int, torch.Tensor]] = {}  # site → length → C(t) [H, nk] (dynamic_topk)

    def run_node(self, n):
        site = self.at.get(n)
        if site is not None and site.form == "sdpa":
            self._sdpa(site, n)
        out = super().run_node(n)
        if n in self.kept:
            self.kept[n] = out
        if site is not None and site.form == "explicit" and isinstance(out, torch.Tensor) and out.dim() == 4:
            self._explicit(site, self._add(site, out.float(), 0, out.shape[2]))
        if n in self.outs and isinstance(out, torch.Tensor) and out.dim() == 4:
            self._moments(self.outs[n], out.float())
        return out

    def _moments(self, site, o):
        """Accumulate the per-head output moments of o [B, H, L, E] over real query rows."""
        B, H, L, E = o.shape
        tm = self.token_mask
        w = tm[:, None, :, None].float() if tm is not None and tm.shape == (B, L) else torch.ones(B, 1, L, 1)
        acc = self.moments.setdefault(site.id, [0.0, torch.zeros(H, E, dtype=torch.float64),
                                                torch.zeros(H, dtype=torch.float64)])
        acc[0] += float(w.sum())
        acc[1] += (o * w).sum((0, 2)).double()
        acc[2] += (o.pow(2) * w).sum((0, 2, 3)).double()

    def output_shares(self, site) -> tuple[torch.Tensor, torch.Tensor]:
        """Per head: the share of the site's output energy in the head's variation, and its mean ō [H, E]."""
        rows, total, sq = self.moments[site.id]
        mean = total / max(rows, 1.0)
        variation = (sq / max(rows, 1.0) - mean.pow(2).sum(-1)).clamp_min(0)
        return variation / (sq / max(rows, 1.0)).sum().clamp_min(1e-30), mean

    def _sdpa(self, site, node):
        ops = attention_scores.operands(site, self.env.__getitem__)
        B, H, L, S = ops.q.shape[0], ops.q.shape[1], ops.q.shape[2], ops.k.shape[2]
        per_input = torch.zeros(B, H, math.ceil(L / self.block), math.ceil(S / self.block),
                                dtype=torch.float64)
        for c0 in range(0, L, self.chunk):
            per_input += self._add(site, ops.probabilities(slice(c0, c0 + self.chunk)), c0, L)
        self._capture(site, ops, per_input, L)

    def _explicit(self, site, per_input):
        """`_capture` at an explicit chain, from its operands as the rewrite reads them (chains it cannot
        read are refused by the rewrite, so nothing is captured there)."""
        if not site.readable:
            return
        ops = attention_scores.operands(site, self.kept.__getitem__)
        # masks may be shared with later sites
        self.kept[site.q] = self.kept[site.k] = self.kept[site.v] = None
        self._capture(site, ops, per_input, ops.q.shape[2])

    def _capture(self, site, ops, per_input, L):
        """C(t) of ``dynamic_topk``: the mass its run-time estimate would keep, per input, for every t
        (the op's own estimate, causal as the rewrite makes it)."""
        est = dynamic.estimate(ops.q, ops.k, ops.mask, self.block, site.causal, ops.scale)
        order = est.argsort(-1, descending=True)
        kept = per_input.gather(-1, order).cumsum(-1).sum((0, 2))  # [H, nk]
        by_length = self.captured.setdefault(site.id, {})
        by_length[L] = by_length[L] + kept if L in by_length else kept

    def _add(self, site, p, row0, L):
        """Add probabilities p [B, H, rows, S] of query rows row0… (of L) to the site's block mass; returns
        this chunk's mass per input [B, H, nq, nk]."""
        B, H, rows, S = p.shape
        tm = self.token_mask
        if tm is not None and tm.shape[0] == B and tm.shape[1] == L:
            p = p * tm[:, None, row0:row0 + rows, None]
        nq, nk = math.ceil(L / self.block), math.ceil(S / self.block)
        per_key = (F.pad(p, (0, nk * self.block - S))
                   .view(B, H, rows, nk, self.block).sum(-1))  # [B, H, rows, nk]
        chunk = torch.zeros(B, H, nq, nk, dtype=torch.float64)
        chunk.index_add_(2, torch.arange(row0, row0 + rows) // self.block, per_key.double())
        by_length = self.masses.setdefault(site.id, {})
        if L not in by_length:
            by_length[L] = torch.zeros(H, nq, nk, dtype=torch.float64)
        by_length[L] += chunk.sum(0)
        grid = self.grids.get(site.id)
        if grid is not None and math.prod(grid) == L == S:
            self._shifts(site, p, row0, grid)
        return chunk

    def _shifts(self, site, p, row0, grid):
        """Add p [B, H, rows, S]'s mass per token displacement (Δt, Δh, Δw) to the site's D."""
        T, Hg, W = grid
        H, rows = p.shape[1], p.shape[2]
        n = torch.arange(T * Hg * W)
        pos = torch.stack([n // (Hg * W), n // W % Hg, n % W])  # [3, L]
        d = pos[:, None, :] - pos[:, row0:row0 + rows, None]  # [3, rows, S]
        index = ((d[0] + T - 1) * (2 * Hg - 1) + d[1] + Hg - 1) * (2 * W - 1) + d[2] + W - 1
        size = (2 * T - 1) * (2 * Hg - 1) * (2 * W - 1)
        acc = torch.zeros(H, size, dtype=torch.float64)
        acc.index_add_(1, index.reshape(-1), p.sum(0).reshape(H, -1).double())
        by_length = self.displacements.setdefault(site.id, {})
        L = p.shape[3]
        shaped = acc.view(H, 2 * T - 1, 2 * Hg - 1, 2 * W - 1)
        by_length[L] = by_length[L] + shaped if L in by_length else shaped

    def result(self, site) -> tuple[int, torch.Tensor] | None:
        """(length, mass) at the traced length if calibrated there, else at the longest calibrated one."""
        by_length = self.masses.get(site.id)
        if not by_length:
            return None
        traced = ir.shape(site.q)[2] if ir.shape(site.q) is not None else None
        length = traced if traced in by_length else max(by_length)
        return length, by_length[length]


class _OutputErrors(Observer):
    """The second pass of ``pyramid``: at each offered site (SDPA, no mask, not causal), per head and
    candidate (`pyramid_candidates`), Σ ‖o_c − o‖² over the calibration rows, and Σ ‖o‖², o being the
    dense attention output; `query_chunk` rows at a time."""

    def __init__(self, gm, sites, offered, block, chunk):
        super().__init__(gm)
        self.at = {s.out: s for s in sites}
        self.offered = offered  # site → (length, per head [candidates])
        self.block, self.chunk = block, max(block, chunk // block * block)
        self.sums: dict[str, list[torch.Tensor]] = {}  # site → [error [H, C], energy [H]]

    def run_node(self, n):
        site = self.at.get(n)
        if site is not None:
            self._measure(site, attention_scores.operands(site, self.env.__getitem__))
        return super().run_node(n)

    def _measure(self, site, ops):
        length, per_head = self.offered[site.id]
        H, L = ops.q.shape[1], ops.q.shape[2]
        if length != L:
            return
        block, count = self.block, max(len(c) for c in per_head)
        S = ops.k.shape[2]
        pick = [[c[min(i, len(c) - 1)] for c in per_head] for i in range(count)]  # [C][H]
        masks = torch.stack([torch.stack([c["mask"] for c in row]) for row in pick])  # [C, H, nq, nk]
        pooled = torch.tensor([[c["pooled"] for c in row] for row in pick])  # [C, H]
        kbar, vbar, logn = bsa.pooled_keys(ops.k, ops.v, block)  # per kv head, then repeated as k and v
        k, v, kbar, vbar = (bsa.repeat_kv(x, H).float() for x in (ops.k, ops.v, kbar, vbar))
        error = torch.zeros(H, count, dtype=torch.float64)
        energy = torch.zeros(H, dtype=torch.float64)
        for r0 in range(0, L, self.chunk):
            q = ops.q[:, :, r0:r0 + self.chunk].float() * ops.scale
            rows = q.shape[2]
            s = q @ k.transpose(-1, -2)
            o = torch.softmax(s, -1) @ v
            s_far = q @ kbar.transpose(-1, -2) + logn
            energy += o.double().pow(2).sum((0, 2, 3))
            listed = masks[:, :, r0 // block:math.ceil((r0 + rows) / block)].repeat_interleave(block, 2)
            listed = listed[:, :, :rows]  # [C, H, rows, nk]
            for c in range(count):
                keys = listed[c].repeat_interleave(block, -1)[..., :S]
                exact = s.masked_fill(~keys, float("-inf"))
                approx = bsa.attend_with_pooled(exact, v, s_far, vbar, listed[c], pooled[c])
                error[:, c] += (approx - o).double().pow(2).sum((0, 2, 3))
        acc = self.sums.setdefault(site.id, [torch.zeros_like(error), torch.zeros_like(energy)])
        acc[0] += error
        acc[1] += energy

    def relative(self, site: str) -> torch.Tensor:
        """[H, C]: each candidate's error energy over the head's output energy."""
        error, energy = self.sums[site]
        return error / energy.clamp_min(1e-30)[:, None]


# --------------------------------------------------------------------------------------- report


PATTERN_COLOURS = {"dense": "#bbbbbb", "local": "#4878d0", "sink_local": "#6acc64",
                   "vertical_slash": "#ee854a", "block_topk": "#956cb4", "multi_diagonal": "#d65f5f",
                   "dynamic_topk": "#8c613c", "skip": "#ffffff", "window_3d": "#82c6e2", "pyramid": "#d5bb67"}
OTHER_COLOUR = "#888888"  # a pattern family without a colour of its own (a plugin's)


def _head_grid(plan) -> list[tuple[str, str]]:
    """Layer × head grid of the patterns head_patterns chose, each cell with its block density."""
    rows, cells = [], []
    for site, heads in _chosen_heads(plan):
        rows.append(site.split(".")[-2] if "." in site else site)
        cells.append([(PATTERN_COLOURS.get(h.pattern, OTHER_COLOUR), f"{h.density:.2f}",
                       f"{site} head {i}: {h.pattern} {h.params}, density {h.density:.3f}, "
                       f"recall {h.recall:.3f}")
                      for i, h in enumerate(heads)])
    if not rows:
        return []
    used = {h for row in cells for h, _, _ in row}
    legend = {name: colour for name, colour in PATTERN_COLOURS.items() if colour in used}
    cols = [f"h{i}" for i in range(max(len(r) for r in cells))]
    return [("Attention pattern per layer and head (block density in the cell)",
             svg.grid("pattern per head (colour) and listed-block density", rows, cols, cells, legend))]


def _head_grid_png(plan) -> bytes | None:
    """The pattern grid as a PNG: a row per attention site, a cell per head in its pattern's colour,
    filled from the bottom to its block density (colours as in the HTML grid's legend)."""
    rows = [[(PATTERN_COLOURS.get(h.pattern, OTHER_COLOUR), h.density) for h in heads]
            for _, heads in _chosen_heads(plan)]
    return png.grid(rows) if rows else None


def _chosen_heads(plan) -> list[tuple[str, list[facts.HeadChoice]]]:
    """(site, per-head choices) of every site head_patterns measured, in plan order."""
    return [(site, found.heads) for site in plan.sites
            if (found := facts.read(plan, "head_patterns", site, facts.SitePatterns)) is not None
            and found.heads]
