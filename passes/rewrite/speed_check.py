"""``speed_check``: keep a sparse op only where it is faster than its dense form, here and now.

Runs after the rewrite passes. The graph is run once on the example inputs and the arguments of every
sparse-op node are captured (real activations, so data-dependent ops skip what they will skip in use).
Each node is then timed against its op's ``dense`` form (same arguments, nothing skipped) on the
compile's kernel backend: warm-up, then the median of ``repeats`` interleaved calls. With
``measure: false`` the cost model decides instead: the op's MACs and bytes against the dense form's.

A site whose sparse ops are together slower than ``min_speedup`` × dense is reverted: each of its
sparse nodes is replaced by a call to the dense form, which computes the dense result (for activation
sparsity: the original layer). The decision per site records both timings (or costs), so a replayed
plan reverts the same sites without measuring again: the decision is part of the reproducible plan,
the timing is evidence, and the pass's counters say whether time or the cost model decided (two
compiles that measure may decide differently; two that do not give the same plan). Ops without a dense
form are refused with that reason. A replayed decision must name a site that has sparse ops with a
dense form when this pass runs (else it would revert nothing).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from sparsegraph import graph_edit, ir, meta
from sparsegraph.codegen import op_of, use_backend
from sparsegraph.cost_model import NodeCost, dense_form_cost, roofline
from sparsegraph.pass_contract import RewritePass, SiteDecision, option
from sparsegraph.registry import register_pass


@register_pass("speed_check")
@dataclass(frozen=True)
class SpeedCheck(RewritePass):
    """Revert the sparse rewrites that do not pay on this machine (see the module docstring)."""

    decode = True  # reverts per op, as timed at the compile's example shapes

    min_speedup: float = option(1.0, "keep a site only if dense time / sparse time is at least this",
                                range=(0.0, None))
    measure: bool = option(True, "time the ops (else compare cost-model MACs and bytes)")
    repeats: int = option(20, "timed calls per op and form", range=(1, None))
    warmup: int = option(3, "untimed calls first", range=(0, None))

    def decide(self, gm, ctx, stats):
        nodes = _sparse_nodes(gm)
        captured = _capture(gm, ctx, set(nodes)) if self.measure else {}
        per_site: dict[str, dict] = {}
        for node in nodes:
            op, info = op_of(node), meta.get(node)
            site = info.site if info is not None else node.name
            if op.dense is None:
                stats.refuse(site, f"{op.name} has no dense form to compare with")
                continue
            with ctx.at(site):
                sparse, dense = (_time(op, captured[node], self, ctx) if self.measure else _cost(node))
            entry = per_site.setdefault(site, {"sparse": 0.0, "dense": 0.0, "nodes": []})
            entry["sparse"] += sparse
            entry["dense"] += dense
            entry["nodes"].append(node.name)
        decisions = {}
        unit = "seconds" if self.measure else "cost"
        # timings differ from run to run: a plan made by measuring is reproduced by replaying it
        stats.counters["decided_by"] = ("time measured on this machine (replay the plan to reproduce)"
                                        if self.measure else "cost model (deterministic)")
        for site, e in per_site.items():
            stats.matched += 1
            speedup = e["dense"] / e["sparse"] if e["sparse"] > 0 else float("inf")
            keep = speedup >= self.min_speedup
            if keep:
                stats.refuse(site, f"kept sparse: {speedup:.2f}x faster than dense")
            decisions[site] = SiteDecision({"revert": not keep}, {
                "unit": unit, "sparse": e["sparse"], "dense": e["dense"],
                # no cost left: JSON has no ∞
                "speedup": round(speedup, 4) if speedup != float("inf") else None})
        return decisions

    def check_decision(self, site, entry, gm):
        timed = {_site_of(n) for n in _sparse_nodes(gm) if op_of(n).dense is not None}
        if site not in timed:
            entry.fail(f"names {site!r}, which has no sparse op with a dense form after the rewrites before "
                       f"this pass (sites with one: {sorted(timed)})")
        entry["decision"].mapping(required=("revert",))
        entry["decision"]["revert"].flag()

    def apply(self, gm, ctx, decisions, stats):
        reverted = []
        for node in _sparse_nodes(gm):
            info = meta.get(node)
            site = info.site if info is not None else node.name
            decision = decisions.get(site)
            if decision is None or not decision.decision["revert"] or op_of(node).dense is None:
                continue  # ops without a dense form (token selection at the same site) were never timed
            with ctx.at(site):
                graph_edit.replace_with_call(node, op_of(node).dense, node.args, node.kwargs)
            reverted.append(site)
        stats.rewritten = len(set(reverted))
        stats.counters["reverted"] = sorted(set(reverted))


def _site_of(node: torch.fx.Node) -> str:
    info = meta.get(node)
    return info.site if info is not None else node.name


def _sparse_nodes(gm) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if op_of(n) is not None]


def _capture(gm, ctx, nodes: set) -> dict:
    """The concrete arguments each sparse node receives on the example inputs."""
    captured = {}

    class Capture(torch.fx.Interpreter):
        def run_node(self, n):
            if n in nodes:
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                captured[n] = (args, kwargs)
            return super().run_node(n)

    with torch.no_grad():
        Capture(gm).run(*ir.flatten_inputs(gm, ctx.example.args, ctx.example.kwargs))
    return captured


def _time(op, call, opts: SpeedCheck, ctx) -> tuple[float, float]:
    args, kwargs = call
    backend = {"auto": "auto", "eager": "eager", "triton": "triton"}.get(ctx.config.backend, "auto")
    forms = {"sparse": op.overload, "dense": op.dense}
    times: dict[str, list[float]] = {k: [] for k in forms}
    with torch.no_grad(), use_backend(backend):
        for i in range(opts.warmup + opts.repeats):
            for name, fn in forms.items():
                start = time.perf_counter()
                fn(*args, **kwargs)
                if i >= opts.warmup:
                    times[name].append(time.perf_counter() - start)
    return statistics.median(times["sparse"]), statistics.median(times["dense"])


def _cost(node: torch.fx.Node) -> tuple[float, float]:
    """(sparse, dense) cost, each `cost_model.roofline`.

    The sparse side is the op's own cost rule; the dense side is our cost model summed over the dense
    form traced at the node's shapes, so any op with a dense form is covered.
    """
    op = op_of(node)
    return roofline(NodeCost(*op.cost(node))), roofline(dense_form_cost(node, op.dense))
