"""``budget``: keep the rewrites that the config's fidelity floor allows, the best gain per loss first.

Runs last (the config appends it when it has a ``fidelity`` section), after every rewrite and after
``speed_check``. It looks at every site an earlier rewrite pass decided on, and measures on the held-out
calibration batches (`sparsegraph.fidelity`: batches no analysis saw) against the dense graph:

- **sensitivity**: the metric with only that site rewritten (every earlier decision at the site, none
  elsewhere), and its *loss*, the distance from exact (1 − cosine, 1 − top-1 agreement, or the KL);
- **gain**: the cost the site saves, total cost of the dense graph minus that of the graph with only the
  site rewritten, each as max(MACs, bytes / 4) (`cost_model.roofline`): deterministic, and it counts
  what a site saves downstream (fewer tokens after token pruning). A site that saves nothing (one
  ``speed_check`` put back) is reverted without a trial.

**Search.** When every rewrite together meets the floor, all are kept. Otherwise, sites in order of
gain / loss (ties in graph order), from the dense graph: each is added at
full strength and kept if the whole model's held-out metric still meets the floor; if not, its passes
back off through their milder levels (`RewritePass.milder`: a lower target sparsity, a smaller pruned
fraction, more cache blocks) and the first that meets the floor is kept ("lowered"); if none does, the
site is reverted. Every step evaluates the whole model, so the final set is verified end to end as it
is built: N + (levels tried) evaluations for N sites, each a replay of the plan on a copy of the dense
graph and a run over the held-out batches. Greedy by gain per loss is the knapsack heuristic with the
sum of single-site losses as the weight; checking the whole model at each step removes its blind spot
(losses that add up worse than their sum).

**The plan says what runs.** The earlier passes' decisions become the final ones (a reverted site's are
removed and its passes count it refused, naming the budget; a lowered site's are recomputed at the milder
level), so replaying the plan applies them without measuring. This pass records per site its action
(keep, lower, revert), sensitivity, loss, gain and why, and in its summary the floor and the whole
model's metric before and after; replayed, it checks those records and changes nothing. (It overrides
`RewritePass.run` instead of implementing ``apply``: its result is a graph rebuilt from the dense one,
not an edit of the graph it is given.)

Everything here is deterministic for the same data, threads and plan: two compiles give the same plan
bit for bit, unless an earlier pass measured time (``speed_check`` with ``measure: true`` says so in the
plan), whose decisions then differ from run to run and the budget keeps the floor on what they leave.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from sparsegraph import graph_edit, ir, svg
from sparsegraph.codegen import use_backend
from sparsegraph.context import PassContext
from sparsegraph.cost_model import roofline, total_cost
from sparsegraph.errors import PassError
from sparsegraph.manager import PassManager
from sparsegraph.pass_contract import (
    PassResult,
    PassStats,
    Refusal,
    Refused,
    RewritePass,
    SiteDecision,
    option,
)
from sparsegraph.plan import SparsityPlan
from sparsegraph.registry import register_pass
from sparsegraph.sections import Section, Table

ACTIONS = ("keep", "lower", "revert")


@register_pass("budget")
@dataclass(frozen=True)
class Budget(RewritePass):
    """Keep the rewrites whose held-out fidelity meets the config's floor (see the module docstring)."""

    decode = True  # it changes no graph of its own: the decisions it leaves are the earlier passes'

    lower: bool = option(True, "back off through a site's milder levels before reverting it")

    def run(self, gm, ctx):
        if ctx.replay:
            decisions, stats = ctx.plan.decisions(self.name)
            self.check_decisions(gm, decisions, "")
            return PassResult(gm, False, stats)
        if ctx.dense is None or not ctx.holdout:
            raise PassError(self.name, "needs the config's fidelity section and held-out calibration data "
                                       "(sparsegraph.compile sets both up when the config has 'fidelity')")
        search = _Search(self, ctx)
        gm = search.run()
        return PassResult(gm, True, search.stats)

    def check_decision(self, site, entry, gm):
        d = entry["decision"]
        d.mapping(required=("action",), optional=("level",))
        d["action"].text(ACTIONS)
        entry["evidence"].mapping(required=("why",), optional=("sensitivity", "loss", "gain"))

    @classmethod
    def report_section(cls, plan, model=None):
        rows = [(site, e["budget"]) for site, e in plan.sites.items() if "budget" in e]
        summary = plan.summary("budget") or {}
        if not rows:
            return None
        table = Table(f"Fidelity budget: {summary.get('metric')} floor {summary.get('bound')}, held-out "
                      f"{summary.get('full', float('nan')):.4f} with every rewrite, "
                      f"{summary.get('final', float('nan')):.4f} as compiled",
                      ["site", "action", "gain (share of dense cost)", "loss alone", "why"])
        points = []
        for site, e in rows:
            ev, action = e.get("evidence", {}), e["decision"]["action"]
            gain, loss = ev.get("gain"), ev.get("loss")
            table.rows.append([site, action, _fmt(gain), _fmt(loss), ev.get("why", "")])
            if gain is not None and loss is not None:
                points.append((loss, gain, site, action))
        figure = svg.scatter("Sensitivity (loss with the site alone) vs gain", points,
                             "loss alone (distance from dense)", "gain (share of dense cost)", ACTIONS)
        return Section(tables=[table], figures=[("budget", figure)] if points else [])


def _fmt(value) -> str:
    return "" if value is None else f"{value:.4g}"


class _Search:
    """One budget search: the held-out reference, the candidate builds and the greedy walk."""

    def __init__(self, owner: Budget, ctx: PassContext):
        self.owner, self.ctx, self.fidelity = owner, ctx, ctx.config.fidelity
        self.stats = PassStats()
        self.before = _before(ctx.config.passes, owner.name)  # replayed for every candidate
        self.upstream = [p for p in self.before if isinstance(p, RewritePass)]
        self.base = copy.deepcopy(ctx.plan.to_json())  # the decisions as the rewrites made them
        self.decided = {p.name: dict(ctx.plan.decisions(p.name)[0]) for p in self.upstream
                        if p.name in ctx.plan.passes}
        self.reference = self._outputs(ctx.dense)
        self.dense_cost = roofline(total_cost(ctx.dense))
        self.evaluations = 0

    # -- candidates -----------------------------------------------------------------------------------------

    def _plan(self, chosen: dict[str, dict[str, SiteDecision | None]]) -> SparsityPlan:
        """The plan with only `chosen` sites' decisions ({site: {pass: decision or None}}), at their
        chosen levels; every other decision of the earlier rewrite passes removed."""
        plan = SparsityPlan.from_json(copy.deepcopy(self.base))
        for name, decisions in self.decided.items():
            for site in decisions:
                del plan.sites[site][name]
            for site, per_pass in chosen.items():
                d = per_pass.get(name)
                if d is not None:
                    plan.sites.setdefault(site, {})[name] = {"decision": d.decision, "evidence": d.evidence}
        return plan

    def _build(self, plan: SparsityPlan, verify: bool = True) -> torch.fx.GraphModule:
        """The dense graph with `plan` replayed; unverified trials skip shape propagation (a fake run of the
        model per pass), which only the cost model needs."""
        gm = graph_edit.sharing_copy(self.ctx.dense)
        ctx = PassContext(plan=plan, config=self.ctx.config, example=self.ctx.example, replay=True,
                          quiet=True)
        return PassManager(self.before, verify=verify).run(gm, ctx)

    def _outputs(self, gm) -> list:
        backend = self.ctx.config.backend if self.ctx.config.backend != "onnx" else "auto"
        with torch.no_grad(), use_backend(backend):
            return [gm(*b.args, **b.kwargs) for b in self.ctx.holdout]

    def _score(self, chosen, verify: bool = False) -> tuple[float, torch.fx.GraphModule]:
        self.evaluations += 1
        gm = self._build(self._plan(chosen), verify)
        return self.fidelity.score(self.reference, self._outputs(gm), self.ctx.holdout), gm

    # -- the walk -------------------------------------------------------------------------------------------

    def run(self) -> torch.fx.GraphModule:
        order = [s.id for s in ir.sites(self.ctx.dense)]
        full = {site: {} for site in order}
        for name, decisions in self.decided.items():
            for site, d in decisions.items():
                full.setdefault(site, {})[name] = d
        full = {site: per_pass for site, per_pass in full.items() if per_pass}
        full_score, _ = self._score(full)
        records: dict[str, dict] = {}
        for site, per_pass in full.items():
            self.stats.matched += 1
            score, gm = self._score({site: per_pass}, verify=True)  # its cost needs the shapes
            gain = (self.dense_cost - roofline(total_cost(gm))) / self.dense_cost
            records[site] = {"sensitivity": score, "loss": max(0.0, self.fidelity.loss(score)), "gain": gain}
        if self.fidelity.meets(full_score):
            why = f"every rewrite together: {self.fidelity.describe(full_score)}"
            return self._finish(full, full, {s: ("keep", {}, why) for s in full}, records, full_score,
                                full_score)
        ranked = sorted(records, key=lambda s: (-_ratio(records[s]), list(full).index(s)))
        chosen: dict[str, dict] = {}
        actions: dict[str, tuple[str, dict, str]] = {}
        score = self.fidelity.exact
        for site in ranked:
            r = records[site]
            if r["gain"] <= 0:
                actions[site] = ("revert", {}, "saves nothing by the cost model")
                continue
            tried = [("keep", full[site], {})]
            if self.owner.lower:
                tried += [("lower", d, level) for d, level in self._milder(site, full[site])]
            for action, per_pass, level in tried:
                candidate, _ = self._score({**chosen, site: per_pass})
                if self.fidelity.meets(candidate):
                    chosen[site], score = per_pass, candidate
                    actions[site] = (action, level, f"whole model {self.fidelity.describe(candidate)}")
                    break
            else:
                actions[site] = ("revert", {}, f"whole model {self.fidelity.describe(candidate)} even at "
                                               "its mildest level" if len(tried) > 1 else
                                               f"whole model {self.fidelity.describe(candidate)}")
        return self._finish(full, chosen, actions, records, full_score, score)

    def _milder(self, site: str, per_pass: dict) -> list[tuple[dict, dict]]:
        """The site's decisions at each milder level its passes offer ({pass: decision or None}, with the
        levels' options), strongest first; a pass without levels keeps its decision at every level."""
        found = next((s for s in ir.sites(self.ctx.dense) if s.id == site), None)
        options = {}
        for p in self.upstream:
            if p.name in per_pass and found is not None:
                opts = self.ctx.options(p, found.id, found.module_path)
                options[p.name] = (opts, p.milder(found, opts, self.ctx))
        depth = max((len(m) for _, m in options.values()), default=0)
        levels = []
        for j in range(depth):
            decisions, level = dict(per_pass), {}
            for name, (opts, milder) in options.items():
                if not milder:
                    continue
                mild = milder[min(j, len(milder) - 1)]
                level[name] = {k: v for k, v in mild.options().items() if v != opts.options()[k]}
                try:
                    decisions[name] = mild.decide_site(found, mild, self.ctx)
                except Refused:
                    decisions[name] = None  # dense for this pass at this level
            levels.append((decisions, level))
        return levels

    def _finish(self, full, chosen, actions, records, full_score, score) -> torch.fx.GraphModule:
        plan, ctx = self.ctx.plan, self.ctx
        final = self._plan(chosen)
        decisions = {}
        for site in full:
            action, level, why = actions[site]
            record = {k: round(v, 6) for k, v in records[site].items()}
            decisions[site] = SiteDecision({"action": action, **({"level": level} if level else {})},
                                           {**record, "why": why})
            self.stats.counters[action] = self.stats.counters.get(action, 0) + 1
            if action == "revert":
                for name in self.decided:
                    if site in self.decided[name]:
                        final.passes[name]["decided"]["refused"].append(
                            {"site": site, "reason": f"budget: reverted ({why})"})
        gm = self._build(final)
        for name in self.decided:  # the earlier passes' entries become what runs
            plan.passes[name]["decided"] = final.passes[name]["decided"]
            plan.passes[name]["stats"] = final.passes[name]["stats"]
            for site in self.decided[name]:
                entry = final.sites.get(site, {}).get(name)
                if entry is None:
                    del plan.sites[site][name]
                else:
                    plan.sites[site][name] = entry
        self.stats.rewritten = 0  # the graph it returns is the earlier passes' replayed: they count rewrites
        self.stats.counters.update(evaluations=self.evaluations)
        self.stats.refused = [Refusal(s, f"reverted: {actions[s][2]}") for s in full
                              if actions[s][0] == "revert"]
        plan.record_decisions(self.owner.name, decisions, self.stats)
        plan.set_summary(self.owner.name, {
            "metric": self.fidelity.name, "bound": self.fidelity.bound, "full": round(full_score, 6),
            "final": round(score, 6), "holdout_batches": len(ctx.holdout), "evaluations": self.evaluations})
        return gm


def _ratio(record: dict) -> float:
    return record["gain"] / max(record["loss"], 1e-9)


def _before(passes, name: str) -> list:
    """The passes before `name` in the pipeline."""
    names = [p.name for p in passes]
    return list(passes[: names.index(name)])

