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

from sparsegraph import graph_edit, ir
from sparsegraph.codegen import token_scores
from sparsegraph.observe import Observer
from sparsegraph.pass_contract import AnalysisPass, option
from sparsegraph.registry import register_pass

MODES = ("auto", *token_scores.MODES)


def score_mode(site: ir.AttentionSite, requested: str = "auto", protect: int = 1) -> str:
    """The token score for `site`: `requested`, or for ``auto``: ``last`` for causal attention, ``cls``
    when a leading token is protected (it is the class / summary token whose attention says what
    matters), else ``received``.

    Why cls over received where both apply: on MiniLM (real weights, 120 held-out sentences of ≥ 32
    tokens, keep 0.7) the [CLS] row gives cosine 0.985 from layer 4 and 0.960 from layer 2, mean
    attention received 0.967 and 0.921: received favours tokens every query glances at ([SEP],
    punctuation), not the ones the summary reads.
    """
    if requested != "auto":
        return requested
    if site.causal:
        return "last"
    return "cls" if protect >= 1 else "received"


def mass_kept(scores: torch.Tensor, keep: float, protect: int) -> torch.Tensor:
    """[B] fraction of the (finite, non-protected) score mass the top ⌈keep·n⌉ tokens hold."""
    s = scores[:, protect:].float()
    finite = torch.isfinite(s)
    s = torch.where(finite, s.clamp_min(0), torch.zeros_like(s))
    n = finite.sum(1)
    ranked = s.sort(1, descending=True).values.cumsum(1)
    k = (n.float() * keep).ceil().long().clamp(1, s.shape[1]) - 1
    return ranked.gather(1, k[:, None])[:, 0] / ranked[:, -1].clamp_min(1e-12)


@register_pass("token_importance")
@dataclass(frozen=True)
class TokenImportance(AnalysisPass):
    """Per-layer token importance from attention received (see the module docstring)."""

    needs_calibration = True

    score: str = option("auto", "cls, received, last, or auto (last if causal, cls if protect ≥ 1, else "
                        "received)", choices=MODES)
    protect: int = option(1, "leading tokens left out of the mass statistics (the class token)", range=(0, None))
    keeps: tuple[float, ...] = option((0.9, 0.7, 0.5, 0.3), "keep ratios to report the mass kept at (each in "
                                      "[1/1000, 1], as token_pruning's keep)", range=(0.001, 1.0))
    chunk: int = option(256, "query rows per step for score 'received'", range=(1, None))

    def analyze(self, gm, ctx, stats):
        sites = ir.attention_sites(gm)
        observer = _Observer(gm, {s.out: (s, score_mode(s, self.score, self.protect)) for s in sites}, self)
        for batch in ctx.progress(ctx.calibration, "token_importance"):
            observer.run_batch(batch.args, batch.kwargs)
        table = {}
        for site in sites:
            stats.matched += 1
            acc = observer.acc.get(site.id)
            if acc is None:
                stats.refuse(site.id, "no attention was observed at this site (it did not run)")
                continue
            evidence = {"score": acc["mode"], "sequences": acc["count"],
                        "mass_kept": {f"{r:g}": round(acc["mass"][r] / acc["count"], 4) for r in self.keeps}}
            if acc["positions"] is not None:
                evidence["position_mean"] = [round(v, 6) for v in (acc["positions"] / acc["count"]).tolist()]
            ctx.plan.set_evidence(self.name, site.id, evidence)
            table[site.layer] = evidence["mass_kept"]
        ctx.plan.set_summary(self.name, {"mass_kept_per_layer": table, "keeps": list(self.keeps)})
        stats.counters.update(batches=len(ctx.calibration), sites=len(table))


    def check_evidence(self, site, evidence, gm):
        if site not in {s.id for s in ir.attention_sites(gm)}:
            evidence.fail(f"names {site!r}, which is not an attention site of this graph")
        evidence.mapping(required=("score", "sequences", "mass_kept"), extra=True)
        evidence["score"].text(token_scores.MODES)
        evidence["sequences"].integer(0)
        _check_mass_table(evidence["mass_kept"])
        if "position_mean" in evidence:
            evidence["position_mean"].numbers()

    def check_summary(self, summary, gm):
        summary.mapping(extra=True)
        if "mass_kept_per_layer" in summary:  # the report draws it
            for _, table in summary["mass_kept_per_layer"].items():
                _check_mass_table(table)


def _check_mass_table(table) -> None:
    """{keep ratio: share of the importance mass kept} (an `Entry`), as `analyze` writes it."""
    for keep, mass in table.items():
        try:
            ratio = float(keep)
        except ValueError:
            ratio = float("nan")
        if not 0.0 < ratio <= 1.0:
            mass.fail(f"the key {keep!r} is not a keep ratio in (0, 1]")
        mass.number(0.0, 1.0)


class _Observer(Observer):
    def __init__(self, gm, outs: dict, opts: TokenImportance):
        super().__init__(gm)
        self.outs, self.opts = outs, opts
        self.acc: dict[str, dict] = {}

    def run_node(self, n):
        result = super().run_node(n)
        if n in self.outs:
            site, mode = self.outs[n]
            self._add(site, mode, attention_scores(self, site, n, mode, self.opts.chunk))
        return result

    def _add(self, site, mode, scores):
        if self.token_mask is not None and self.token_mask.shape == scores.shape:
            scores = scores.masked_fill(~self.token_mask, float("-inf"))
        acc = self.acc.setdefault(site.id, {"mode": mode, "count": 0, "mass": {r: 0.0 for r in self.opts.keeps},
                                            "positions": torch.zeros(scores.shape[1]), "length": scores.shape[1]})
        protect = min(self.opts.protect, scores.shape[1] - 1)
        for r in self.opts.keeps:
            acc["mass"][r] += float(mass_kept(scores, r, protect).sum())
        if acc["positions"] is not None and scores.shape[1] == acc["length"]:
            acc["positions"] += torch.where(torch.isfinite(scores), scores, 0.0).sum(0)
        else:
            acc["positions"] = None
        acc["count"] += scores.shape[0]


def attention_scores(observer: Observer, site: ir.AttentionSite, out: torch.fx.Node, mode: str,
                     chunk: int) -> torch.Tensor:
    """[B, S] token scores at an attention site an `Observer` has just run (its ``env`` holds the
    operands): from q, k and the mask for SDPA, from the observed probabilities for explicit chains."""
    if site.form == "sdpa":
        q, k = observer.env[out.args[0]], observer.env[out.args[1]]
        mask = ir._arg(out, 3, "attn_mask")
        mask = graph_edit.additive_value(observer.env[mask], "sdpa") if isinstance(mask, torch.fx.Node) else None
        if mask is not None and mask.dim() < 4:
            mask = mask.reshape(*([1] * (4 - mask.dim())), *mask.shape)
        scale = ir._arg(out, 6, "scale") or q.shape[-1] ** -0.5
        if site.causal and mask is None:
            L, S = q.shape[2], k.shape[2]
            mask = torch.zeros(L, S).masked_fill(torch.ones(L, S, dtype=torch.bool).triu(1), float("-inf"))
            mask = mask[None, None]
        return token_scores.cpu(q, k, mask, float(scale), mode, chunk)
    softmax = next(c for c in site.core if ir.kind(c) == "softmax")
    p = observer.env[softmax].float()  # [B, H, L, S]
    if mode == "received":
        return p.mean((1, 2))
    return p[:, :, 0 if mode == "cls" else -1].mean(1)

