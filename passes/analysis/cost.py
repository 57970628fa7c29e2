"""``cost``: the cost model's figures (`sparsegraph.cost_model`) written into the plan: MACs and bytes per
site at the example shapes, and a model summary (totals, MACs by op kind, the heaviest nodes)."""

from __future__ import annotations

from dataclasses import dataclass

from sparsegraph import codegen, ir, meta
from sparsegraph.cost_model import NodeCost, graph_costs, site_costs
from sparsegraph.pass_contract import AnalysisPass, option
from sparsegraph.registry import register_pass


@register_pass("cost")
@dataclass(frozen=True)
class Cost(AnalysisPass):
    """MACs and bytes moved per site and per model at the example shapes (see the module docstring)."""

    top: int = option(10, "how many of the most expensive nodes the summary lists", range=(0, None))

    def analyze(self, gm, ctx, stats):
        costs = graph_costs(gm)
        for site, c in site_costs(gm).items():
            ctx.plan.set_evidence(self.name, site, {"macs": c.macs, "bytes": c.bytes})
            stats.matched += 1
        by_kind: dict[str, int] = {}
        for node, c in costs.items():
            if c.macs:
                label = "sparse" if codegen.op_of(node) else ir.kind(node) or str(node.target)
                by_kind[label] = by_kind.get(label, 0) + c.macs
        heavy = sorted(costs.items(), key=lambda kv: -kv[1].macs)[: self.top]
        total = NodeCost(sum(c.macs for c in costs.values()), sum(c.bytes for c in costs.values()))
        in_sites = sum(costs[n].macs for n in costs if meta.get(n) is not None)
        ctx.plan.set_summary(self.name, {
            "macs": total.macs, "bytes": total.bytes, "macs_in_sites": in_sites, "macs_by_kind": by_kind,
            "heaviest": [{"node": n.name, "kind": ir.kind(n), "macs": c.macs, "bytes": c.bytes}
                         for n, c in heavy],
        })
        stats.counters.update(nodes=len(costs), gmacs=round(total.macs / 1e9, 4))
