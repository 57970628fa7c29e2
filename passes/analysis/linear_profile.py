"""``linear_profile``: the per-feature size of each attention and MLP linear layer's input, on calibration.

Runs every calibration batch through the traced graph and, at each linear node with a role in
`ir.LINEAR_ROLES` (q, k, v, qkv, out, up, gate, down), accumulates Σ x_j² per input feature j over every
real token of every batch (fp64; padding tokens, where the model takes an ``attention_mask``, are left
out) and the row count. Written to the plan per site and layer (`facts.LinearInputs`):
``rms_j = √(Σ x_j² / rows)``.

What reads it: ``nm_weights`` with ``score: activation`` ranks each weight by |W_ij| · rms_j (Wanda, Sun et
al. 2023) instead of |W_ij|: inside a group of m inputs, a large weight on a feature that is usually near
zero adds less to the output than a smaller one on a feature that carries signal. On MiniLM's MLPs at 2:4,
one-shot, that lifts the mean cosine of unseen sentence embeddings to dense from 0.78 to 0.85 (docs/
findings.md).

Why not ``conv_profile`` or ``activation_profile``: the first watches 1x1 conv inputs (channels on axis
1, per site one input), the second keeps per-token histograms of MLP activations for thresholds; here a
site has several layers with different inputs (an MLP's up reads the hidden state, its down the
activation), and the rewrite needs one number per feature. Both profiles share the summing observer
(`observe.ChannelSums`); calibration shards over processes as theirs do (the sums add).
"""

from __future__ import annotations

from dataclasses import dataclass

from sparsegraph import facts, ir
from sparsegraph.observe import ChannelSums
from sparsegraph.pass_contract import AnalysisPass
from sparsegraph.registry import register_pass


@register_pass("linear_profile")
@dataclass(frozen=True)
class LinearProfile(AnalysisPass):
    """Per-feature rms of each attention and MLP linear layer's input on calibration data (see the module
    docstring)."""

    needs_calibration = True

    def analyze(self, gm, ctx, stats):
        layers = _layers(gm)
        watched: dict = {}
        for (site, path), parts in layers.items():
            watched.setdefault(parts.x, (-1, []))[1].append((site, path))
        sums = ChannelSums.over_calibration(gm, watched, ctx, self.name)
        per_site: dict[str, dict] = {}
        for key in layers:
            _, square, rows = sums[key]
            per_site.setdefault(key[0], {})[key[1]] = (rows, (square / rows).sqrt().tolist())
        for site, found in per_site.items():
            stats.matched += 1
            ctx.plan.set_evidence(self.name, site, facts.LinearInputs(found).to_json())
        ctx.plan.set_summary(self.name, {"batches": len(ctx.calibration), "layers": len(layers)})

    def check_evidence(self, site, evidence, gm):
        widths = {path: parts.in_features for (s, path), parts in _layers(gm).items() if s == site}
        if not widths:
            evidence.fail(f"names {site!r}, which has no linear layer with a role in {ir.LINEAR_ROLES} in "
                          "this graph")
        facts.LinearInputs.from_json(evidence, widths)


def _layers(gm) -> dict[tuple[str, str], ir.LinearParts]:
    """``(site, module path) → linear_parts`` of every role linear of `gm`."""
    out = {}
    for node, info in ir.role_linears(gm):
        parts = ir.linear_parts(node)
        out[(info.site, parts.module_path)] = parts
    return out
