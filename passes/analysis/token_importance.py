"""``token_importance``: how much attention each token receives, per layer, on calibration data.

For every attention site the observer computes the per-token score `token_pruning` would use at run
time (``sparsegraph::token_scores``: attention from the class token for encoders that read out token
0, mean attention received otherwise, the last query's attention for causal decoders; averaged over
heads; padding keys excluded), streaming: per batch only [B, N] scores are kept.

Per layer it records, averaged over calibration sequences:

    mass_kept[r] = Σ_{top ⌈r·n⌉ tokens} s_j / Σ_j s_j          (j over the n non-protected tokens)

for r in ``keeps``: how much of the importance a keep ratio r retains at that layer (a flat curve
means attention is spread out and pruning there is risky); and, when every calibration sequence has
the same length (images), the mean score per position (`position_mean`), the map `roi` and the report
draw on the patch grid. The plan summary holds the mass-kept table per layer (the keep schedule the
report shows). Facts a plan supplies instead of calibration are checked against this layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from sparsegraph import facts, ir, svg
from sparsegraph.attention_scores import MODES, mass_kept, score_mode, site_scores
from sparsegraph.codegen import token_scores
from sparsegraph.observe import Observer
from sparsegraph.pass_contract import AnalysisPass, Refused, option, refusals
from sparsegraph.registry import register_pass
from sparsegraph.sections import Section


@register_pass("token_importance")
@dataclass(frozen=True)
class TokenImportance(AnalysisPass):
    """Per-layer token importance from attention received (see the module docstring)."""

    needs_calibration = True

    score: str = option("auto", "cls, received, last, or auto (last if causal, cls if protect ≥ 1, else "
                        "received)", choices=MODES)
    protect: int = option(1, "leading tokens left out of the mass statistics (the class token)",
                          range=(0, None))
    keeps: tuple[float, ...] = option((0.9, 0.7, 0.5, 0.3), "keep ratios to report the mass kept at (each in "
                                      "[1/1000, 1], as token_pruning's keep)", range=(0.001, 1.0))
    chunk: int = option(256, "query rows per step for score 'received'", range=(1, None))

    @classmethod
    def report_section(cls, plan, model=None):
        return Section(figures=_mass_per_layer(plan))

    def analyze(self, gm, ctx, stats):
        sites = ir.attention_sites(gm)
        observer = _Observer(gm, {s.out: (s, score_mode(s, self.score, self.protect)) for s in sites}, self)
        for batch in ctx.progress(ctx.calibration, "token_importance"):
            observer.run_batch(batch.args, batch.kwargs)
        table = {}
        for site in sites:
            with refusals(stats, site.id):
                acc = observer.acc.get(site.id)
                if acc is None:
                    raise Refused("no attention was observed at this site (it did not run)")
                found = facts.TokenImportance(
                    score=acc["mode"], sequences=acc["count"],
                    mass_kept={f"{r:g}": round(acc["mass"][r] / acc["count"], 4) for r in self.keeps},
                    position_mean=None if acc["positions"] is None else
                    [round(v, 6) for v in (acc["positions"] / acc["count"]).tolist()])
                ctx.plan.set_evidence(self.name, site.id, found.to_json())
                table[site.layer] = found.mass_kept
        ctx.plan.set_summary(self.name, {"mass_kept_per_layer": table, "keeps": list(self.keeps)})
        stats.counters.update(batches=len(ctx.calibration), sites=len(table))


    def check_evidence(self, site, evidence, gm):
        if site not in {s.id for s in ir.attention_sites(gm)}:
            evidence.fail(f"names {site!r}, which is not an attention site of this graph")
        facts.TokenImportance.from_json(evidence, token_scores.MODES)

    def check_summary(self, summary, gm):
        summary.mapping(extra=True)
        if "mass_kept_per_layer" in summary:  # the report draws it
            for _, table in summary["mass_kept_per_layer"].items():
                facts.mass_table(table)


class _Observer(Observer):
    def __init__(self, gm, outs: dict, opts: TokenImportance):
        super().__init__(gm)
        self.outs, self.opts = outs, opts
        self.acc: dict[str, dict] = {}

    def run_node(self, n):
        result = super().run_node(n)
        if n in self.outs:
            site, mode = self.outs[n]
            self._add(site, mode, site_scores(site, self.env.__getitem__, mode, self.opts.chunk))
        return result

    def _add(self, site, mode, scores):
        if self.token_mask is not None and self.token_mask.shape == scores.shape:
            scores = scores.masked_fill(~self.token_mask, float("-inf"))
        acc = self.acc.setdefault(site.id, {"mode": mode, "count": 0,
                                            "mass": {r: 0.0 for r in self.opts.keeps},
                                            "positions": torch.zeros(scores.shape[1]),
                                            "length": scores.shape[1]})
        protect = min(self.opts.protect, scores.shape[1] - 1)
        for r in self.opts.keeps:
            acc["mass"][r] += float(mass_kept(scores, r, protect).sum())
        if acc["positions"] is not None and scores.shape[1] == acc["length"]:
            acc["positions"] += torch.where(torch.isfinite(scores), scores, 0.0).sum(0)
        else:
            acc["positions"] = None
        acc["count"] += scores.shape[0]


def _mass_per_layer(plan) -> list[tuple[str, str]]:
    """The share of attention importance the top r of the tokens hold, per layer and keep ratio r."""
    table = (plan.summary("token_importance") or {}).get("mass_kept_per_layer")
    if not table:
        return []
    keeps = sorted({k for curve in table.values() for k in curve}, key=float, reverse=True)
    return [("Token importance kept per layer", svg.bars(
        "share of attention importance held by the top r of the tokens", [f"layer {k}" for k in table],
        {f"r = {k}": [curve[k] for curve in table.values()] for k in keeps}))]
