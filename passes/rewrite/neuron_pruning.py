"""``neuron_pruning``: static removal of the coldest MLP neurons, by slicing the weights.

For each MLP site with intermediate size I, the ``round(fraction·I)`` neurons with the lowest score
are removed: rows of W_up (and W_gate) and their biases, columns of W_down; at a fused gated site
(Phi-3's ``gate_up_proj``: gate and up are the two halves of one linear's output) rows j and I + j of the
fused weight, both halves alike. The kept weights are new tensors of the compiled model (the user's model
is untouched). Every backend runs the smaller dense matmuls, ONNX on CPU included: this is the speed-up
that needs no sparse kernel.

Scores come from the ``activation_profile`` evidence of the site (never from the neuron index):

- ``energy`` (default): ‖W_down[:, j]‖ · rms(a_j), the size of neuron j's contribution to the output;
- ``mass``: mean |a_j| on calibration data.

With ``compensate`` (default) the removed neurons' mean activation is folded into the down bias,
``b' = b + W_down[:, removed] · mean(a_removed)``, so the layer's output keeps its average (GELU
neurons sit at a nonzero mean; dropping them outright shifts every token).

A fraction of 0 refuses the site (dense, exact). Decisions hold the kept neuron indices and the
removed neurons' means; replay slices the same neurons without calibration. A decision from a plan
must split the site's neurons into ``keep`` and ``removed`` (each once, none out of range: torch would
wrap a negative index and count a repeated one twice) with no or one finite mean per removed neuron.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.fx

from sparsegraph import facts, graph_edit, ir, meta
from sparsegraph.pass_contract import Refused, RewritePass, SiteDecision, option, steps_towards
from sparsegraph.registry import register_pass


@register_pass("neuron_pruning")
@dataclass(frozen=True)
class NeuronPruning(RewritePass):
    """Remove the coldest MLP neurons (static; see the module docstring)."""

    requires = ("activation_profile",)
    decode = True  # weights: the same for every token

    fraction: float = option(0.5, "fraction of each MLP's intermediate neurons removed", range=(0.0, 0.95))
    score: str = option("energy", "how neurons are ranked", choices=("energy", "mass"))
    compensate: bool = option(True, "fold the removed neurons' mean activation into the down bias")

    def sites(self, gm):
        return ir.mlp_sites(gm)

    def milder(self, site, opts, ctx):
        return [dataclasses.replace(opts, fraction=f) for f in steps_towards(opts.fraction, 0.0)]

    def decide_site(self, site, opts, ctx):
        removed = round(opts.fraction * site.intermediate)
        if removed == 0:
            raise Refused(f"fraction {opts.fraction} removes no neuron: the site stays dense")
        if any(ir.linear_parts(n).weight is None for n in (site.up, site.gate, site.down) if n is not None):
            raise Refused("a projection weight is computed in the graph, not a stored parameter")
        profile = facts.read(ctx.plan, "activation_profile", site.id, facts.SiteActivations,
                             widths={"down_input": site.intermediate})
        stats = profile.observed.get("down_input") if profile is not None else None
        if stats is None:
            raise Refused("activation_profile has no statistics for this site")
        down = ir.linear_parts(site.down).weight
        if opts.score == "energy":
            score = down.norm(dim=0) * torch.tensor(stats.rms, dtype=down.dtype)
        else:
            score = torch.tensor(stats.mass)
        order = score.argsort(descending=True)
        keep = sorted(order[: site.intermediate - removed].tolist())
        gone = sorted(order[site.intermediate - removed:].tolist())
        means = [stats.mean[j] for j in gone] if opts.compensate else []
        return SiteDecision({"keep": keep, "removed": gone, "removed_mean": means},
                            {"score": opts.score, "kept_score_share": float(score[keep].sum() / score.sum())})

    def check_decision(self, site, entry, gm):
        mlp = next((s for s in ir.mlp_sites(gm) if s.id == site), None)
        if mlp is None:
            entry.fail(f"names {site!r}, which is not an MLP site of this graph")
        if any(ir.linear_parts(n).weight is None for n in (mlp.up, mlp.gate, mlp.down) if n is not None):
            entry.fail("the site's projection weights are computed in the graph, so they cannot be sliced")
        d = entry["decision"]
        d.mapping(required=("keep", "removed", "removed_mean"))
        width = mlp.intermediate
        keep = d["keep"].indices(width, min_length=1, what="neuron")
        removed = d["removed"].indices(width, min_length=1, what="neuron")
        both = set(keep) & set(removed)
        if both:
            d["removed"].fail(f"neuron {min(both)} is also in 'keep'")
        if len(keep) + len(removed) != width:
            d["removed"].fail(f"'keep' ({len(keep)}) and 'removed' ({len(removed)}) must split the site's "
                              f"{width} neurons; {width - len(keep) - len(removed)} are in neither")
        means = d["removed_mean"].elements()
        if means and len(means) != len(removed):
            d["removed_mean"].fail(f"has {len(means)} values for {len(removed)} removed neurons: one mean "
                                   "per removed neuron (or none: no compensation)")
        for m in means:
            m.number()

    def apply(self, gm, ctx, decisions, stats):
        for site in ir.mlp_sites(gm):
            decision = decisions.get(site.id)
            if decision is None:
                continue
            with ctx.at(site.id):
                keep = torch.tensor(decision.decision["keep"], dtype=torch.long)
                if site.fused:
                    _slice_fused(gm, site, keep)
                else:
                    for node in (site.up, site.gate):
                        if node is not None:
                            _slice_rows(gm, node, keep)
                parts = ir.linear_parts(site.down)
                bias = parts.bias.clone() if parts.bias is not None else torch.zeros(parts.out_features,
                                                                                     dtype=parts.weight.dtype)
                if decision.decision["removed_mean"]:
                    gone = torch.tensor(decision.decision["removed"], dtype=torch.long)
                    bias += parts.weight[:, gone] @ torch.tensor(decision.decision["removed_mean"],
                                                                 dtype=parts.weight.dtype)
                graph_edit.replace_linear(gm, site.down, parts.weight[:, keep], bias)
                stats.rewritten += 1
        stats.counters["neurons_removed"] = sum(len(d.decision["removed"]) for d in decisions.values())


def _slice_rows(gm, node: torch.fx.Node, rows: torch.Tensor) -> torch.fx.Node:
    """Replace linear `node` by one computing only its outputs `rows` (new, sliced weight and bias)."""
    parts = ir.linear_parts(node)
    bias = parts.bias[rows] if parts.bias is not None else None
    return graph_edit.replace_linear(gm, node, parts.weight[rows], bias)


def _slice_fused(gm, site: ir.MLPSite, keep: torch.Tensor) -> None:
    """Keep neurons `keep` (k of I) of a fused gated site: rows ``keep`` and ``I + keep`` of the fused
    weight, so that the new linear's output is [h₀[keep], h₁[keep]]. The nodes that held the halves h₀, h₁
    become the slices ``[..., :k]`` and ``[..., k:]`` of it (a split written for the old width, ``split(h,
    I)``, would cut in the wrong place), and the split they came from goes when nothing reads it."""
    fused = _slice_rows(gm, site.up, torch.cat([keep, keep + site.intermediate]))
    k = len(keep)
    for index, half in enumerate(site.halves):
        split = half.args[0]
        with gm.graph.inserting_before(half):
            part = gm.graph.call_function(torch.ops.aten.slice.Tensor, (fused, -1, index * k, index * k + k))
        meta.copy_provenance(half, part)
        half.replace_all_uses_with(part)
        gm.graph.erase_node(half)
        if split is not fused and not split.users:
            gm.graph.erase_node(split)
