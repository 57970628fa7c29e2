"""``near_zero_rows``: find linear layers whose weight is mostly made of near-zero rows.

A row of W (one output feature) is near zero when max_j |W[o, j]| ≤ ``atol``: the output is then
(almost) the bias alone, and the row could be removed with no loss. Layers where more than
``fraction`` of the rows are near zero are flagged; they are candidates for structured pruning, or
signs of a broken checkpoint.

An analysis pass: it reads the graph and writes evidence (per layer: rows, near-zero rows, share) into
the plan, keyed by the layer's site when it has one and by its module path otherwise, and a table of
them to the report (`report_section`). It never changes the graph. Counts: matched = linear layers
with a stored weight examined; ``flagged`` lists the flagged layers; layers whose weight is computed
in the graph are refused with that reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from sparsegraph import AnalysisPass, ir, meta, option
from sparsegraph.sections import Section, Table


@dataclass(frozen=True)
class NearZeroRows(AnalysisPass):
    """Flag linear layers with more than `fraction` near-zero weight rows."""

    fraction: float = option(0.5, "share of near-zero rows above which a layer is flagged", range=(0.0, 1.0))
    atol: float = option(1e-6, "a row is near zero when its largest |weight| is at most this",
                         range=(0.0, None))

    @classmethod
    def report_section(cls, plan, model=None):
        """A table of the layers it looked at, flagged ones first (the report shows it like a built-in's)."""
        rows = [[site, path, layer["rows"], layer["near_zero_rows"], f"{layer['share']:.3f}"]
                for site, per_pass in plan.sites.items() for path, layer in
                per_pass.get(cls.name, {}).get("evidence", {}).items()]
        flagged = set((plan.summary(cls.name) or {}).get("flagged", []))
        rows.sort(key=lambda r: (r[1] not in flagged, r[1]))
        return Section(tables=[Table("Near-zero weight rows per linear layer",
                                     ["site", "layer", "rows", "near-zero rows", "share"], rows)])

    def analyze(self, gm, ctx, stats):
        flagged, evidence = [], {}
        for node in gm.graph.nodes:
            if ir.kind(node) != "linear":
                continue
            parts = ir.linear_parts(node)
            if parts.weight is None:
                stats.refuse(parts.module_path or node.name, "weight is computed in the graph")
                continue
            stats.matched += 1
            near_zero = int((parts.weight.abs().amax(dim=1) <= self.atol).sum())
            share = near_zero / parts.out_features
            info = meta.get(node)
            key = info.site if info is not None else parts.module_path
            evidence.setdefault(key, {})[parts.module_path] = {
                "rows": parts.out_features, "near_zero_rows": near_zero, "share": share}
            if share > self.fraction:
                flagged.append(parts.module_path)
        for key, layers in evidence.items():
            ctx.plan.set_evidence(self.name, key, layers)
        stats.counters["flagged"] = flagged
        ctx.plan.set_summary(self.name, {"flagged": flagged, "fraction": self.fraction, "atol": self.atol})
