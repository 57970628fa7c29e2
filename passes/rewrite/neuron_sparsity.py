"""``neuron_sparsity``: dynamic activation sparsity, only the active neurons feed the down projection.

For each MLP site, the down projection ``y = W_down a + b`` becomes
``sparsegraph::sparse_linear(a, W_downᵀ, b + W_down c, c, t, k)``, which at run time keeps only the
inputs with ``|a_j − c_j| > t`` (or the k largest per token) and reads only their weight rows.
Methods, one option away:

- ``magnitude`` (CATS / TEAL): c = 0, t = the per-layer threshold the profile measured for `target`;
- ``centred``: c = the per-neuron calibrated median, t the per-layer threshold of |a − c| for
  `target`; ``W_down c`` is folded into the bias once. Far better fidelity on GELU models;
- ``topk`` (Deja Vu-style selection, with an exact oracle instead of a learned predictor): each token
  keeps its k = round((1 − target)·I) largest |a − c| (c = 0 unless ``rank_centred``);
- ``core`` (CoreMatching / PowerInfer "core neurons"): each *sequence* keeps the k inputs with the
  largest Σ|a − c| over its first ``core_prefix`` tokens (its prompt; 0 = all its tokens), and every
  token of the sequence uses those: ``sparsegraph::core_linear``.

The down projection's input is the same whatever makes it, so a fused gated MLP (Phi-3's one
``gate_up_proj``) and GPT-2's (Conv1D projections, canonicalised to linear layers at capture) are handled
as any other. With ``inputs=True`` the same happens to the up and gate projections' input (a fused
``gate_up_proj`` is the one linear reading it: it becomes one op whose 2I outputs split as before), and with
``attention=True`` to the inputs of the attention's q/k/v projections (one fused op: they read the same
input) and of its output projection: TEAL's input sparsity on every projection (needs
``activation_profile`` with ``inputs``/``attention`` set alike).

A target of 0 refuses the site (dense, exact). A target that the profile did not record is refused
with the list of recorded ones. Decisions hold the threshold, k and the centre; the evidence holds the
sparsity measured on the calibration sample. Counts are in sites (matched, rewritten, refused).

A decision from a plan names only projections the site has, per projection a finite threshold ≥ 0, a k
within the input width (≥ 1 in core mode), and no centre or one finite value per input: a NaN threshold
keeps every input, a NaN centre makes every output NaN, a short centre fails deep in a matmul.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from sparsegraph import facts, graph_edit, ir, meta
from sparsegraph.codegen.core_linear import OP as CORE
from sparsegraph.codegen.sparse_linear import OP
from sparsegraph.pass_contract import Refused, RewritePass, SiteDecision, option, steps_towards
from sparsegraph.registry import register_pass

METHODS = ("magnitude", "centred", "topk", "core")


@register_pass("neuron_sparsity")
@dataclass(frozen=True)
class NeuronSparsity(RewritePass):
    """Dynamic activation sparsity on MLP down projections (and optionally their inputs)."""

    requires = ("activation_profile",)
    decode = True  # thresholds per activation: right for one token as for many

    target: float = option(0.5, "fraction of activations skipped", range=(0.0, 0.99))
    method: str = option("centred", "how active neurons are chosen", choices=METHODS)
    rank_centred: bool = option(True, "in topk and core modes, rank |a − c| instead of |a|")
    core_prefix: int = option(0, "core mode: tokens of each sequence that choose its core (0: all)",
                              range=(0, None))
    inputs: bool = option(False, "also sparsify the MLP input feeding up/gate (TEAL)")
    attention: bool = option(False, "also sparsify the inputs of the attention projections q/k/v and out "
                             "(TEAL)")

    def sites(self, gm):
        return [*ir.mlp_sites(gm), *ir.attention_sites(gm), *ir.cross_attention_sites(gm)]

    def milder(self, site, opts, ctx):
        """Lower targets: for thresholds, the ones the profile recorded (for every projection the site
        sparsifies); for topk and core, any (k is computed)."""
        if opts.method in ("topk", "core"):
            return [dataclasses.replace(opts, target=t) for t in steps_towards(opts.target, 0.0)]
        groups = _groups(site, opts)
        profile = facts.read(ctx.plan, "activation_profile", site.id, facts.SiteActivations,
                             widths={what: width for what, _, width in groups})
        if profile is None or any(what not in profile.observed for what, _, _ in groups):
            return []
        method = "centred" if opts.method == "centred" else "magnitude"
        recorded = set.intersection(*(set(profile.observed[what].targets(method)) for what, _, _ in groups))
        return [dataclasses.replace(opts, target=t) for t in sorted(recorded, reverse=True)
                if 0 < t < opts.target]

    def decide_site(self, site, opts, ctx):
        groups = _groups(site, opts)
        if not groups:  # an attention site without `attention: true`: not this pass's business
            return None
        if getattr(site, "cross", False):
            raise Refused("cross-attention: q reads the token stream, k and v another sequence (the profile "
                          "has one input per site)")
        if any(ir.linear_parts(n).weight is None for _, nodes, _ in groups for n in nodes):
            raise Refused("a projection weight is computed in the graph, not a stored parameter")
        if opts.target == 0:
            raise Refused("target 0: the site stays dense")
        profile = facts.read(ctx.plan, "activation_profile", site.id, facts.SiteActivations,
                             widths={what: width for what, _, width in groups})
        missing = [what for what, _, _ in groups if profile is None or what not in profile.observed]
        if missing:
            raise Refused(f"activation_profile has no {missing} statistics for this site "
                          "(set activation_profile inputs: true / attention: true)")
        constant = [what for what, _, _ in groups if profile.observed[what].constant]
        if constant:
            raise Refused(f"the {constant} activations were constant on the calibration data: no threshold "
                          "separates active from inactive neurons")
        choice = {what: _choose(opts, profile.observed[what], width) for what, _, width in groups}
        return SiteDecision({w: d for w, (d, _) in choice.items()}, {w: e for w, (_, e) in choice.items()})

    def check_decision(self, site, entry, gm):
        found = next((s for s in [*ir.mlp_sites(gm), *ir.attention_sites(gm)] if s.id == site), None)
        if found is None:
            entry.fail(f"names {site!r}, which is not an MLP or attention site of this graph")
        d = entry["decision"]
        names = (("down_input", "mlp_input") if isinstance(found, ir.MLPSite)
                 else ("attn_input", "attn_out_input"))
        d.mapping(optional=names)
        groups = {what: (nodes, width) for what, nodes, width in _groups(found, d.value)}
        if not groups:
            d.fail(f"names no projection input to sparsify (this site has {', '.join(map(repr, names))})")
        for what in d.value:
            if what not in groups:
                d[what].fail(f"this {'MLP' if isinstance(found, ir.MLPSite) else 'attention'} site has no "
                             f"projection reading {what!r}")
            nodes, width = groups[what]
            if any(ir.linear_parts(n).weight is None for n in nodes):
                d[what].fail("the projection weight is computed in the graph, not a stored parameter")
            _check_choice(d[what], width)
        for _, e in entry["evidence"].items():  # apply reads the measured sparsity into the node's meta
            if "measured_sparsity" in e.mapping(extra=True):
                e["measured_sparsity"].number(0.0, 1.0)

    def apply(self, gm, ctx, decisions, stats):
        sites = [*ir.mlp_sites(gm), *ir.attention_sites(gm)]  # found before any node is replaced
        for site in sites:
            decision = decisions.get(site.id)
            if decision is None:
                continue
            with ctx.at(site.id):
                for what, nodes, _ in _groups(site, decision.decision):
                    density = 1.0 - decision.evidence.get(what, {}).get("measured_sparsity", 0.0)
                    _replace(gm, nodes, decision.decision[what], density)
                stats.rewritten += 1


def _groups(site, wants) -> list[tuple[str, list[torch.fx.Node], int]]:
    """(observed tensor, linear nodes reading it, its width) for the parts of `site` to sparsify.

    `wants` is the pass (options) when deciding, or a decision dict when applying: the groups are the
    ones it names. Linear layers reading the same input are one group (one fused op).
    """
    def wanted(what: str, option: str | None) -> bool:
        if isinstance(wants, dict):
            return what in wants
        return option is None or getattr(wants, option)

    if isinstance(site, ir.MLPSite):
        groups = [("down_input", [site.down], site.intermediate)] if wanted("down_input", None) else []
        if wanted("mlp_input", "inputs"):  # gate and up read the same input (one linear when fused)
            groups.append(("mlp_input", list(dict.fromkeys(n for n in (site.gate, site.up) if n is not None)),
                           site.hidden))
        return groups
    groups = []
    qkv = list(dict.fromkeys(n for n in (site.q_proj, site.k_proj, site.v_proj) if n is not None))
    if qkv and wanted("attn_input", "attention"):
        groups.append(("attn_input", qkv, ir.linear_parts(qkv[0]).in_features))
    if site.o_proj is not None and wanted("attn_out_input", "attention"):
        groups.append(("attn_out_input", [site.o_proj], ir.linear_parts(site.o_proj).in_features))
    return groups


def _choose(opts: NeuronSparsity, stats: facts.ActivationStats, width: int) -> tuple[dict, dict]:
    """(decision, evidence) for one observed tensor; `Refused` when the profile lacks the target."""
    centred = opts.method == "centred" or (opts.method in ("topk", "core") and opts.rank_centred)
    centre = stats.centre if centred else None
    if opts.method in ("topk", "core"):
        k = max(1, round((1 - opts.target) * width))
        decision = {"threshold": 0.0, "k": k, "centre": centre}
        if opts.method == "core":
            decision.update(core=True, prefix=opts.core_prefix)
        return decision, {"measured_sparsity": 1 - k / width}
    method = "centred" if centred else "magnitude"
    threshold = stats.threshold(method, opts.target)
    if threshold is None:
        raise Refused(f"activation_profile recorded targets {stats.targets(method)}, not {opts.target}; add "
                      "it to activation_profile's targets")
    return {"threshold": threshold, "k": 0, "centre": centre}, {"measured_sparsity": opts.target}


def _check_choice(g, width: int) -> None:
    """One projection's decision (an `Entry`): the op's threshold, k, centre (and core prefix) as `_choose`
    writes them, for an input of `width`."""
    core = "core" in g
    g.mapping(required=("threshold", "k", "centre"), optional=("core", "prefix") if core else ())
    g["threshold"].number(0.0)
    g["k"].integer(1 if core else 0, width)
    if core:
        if g["core"].flag() is not True:
            g["core"].fail("is false; leave 'core' and 'prefix' out for per-token selection")
        g["prefix"].integer(0)
    if g["centre"].value is not None:
        g["centre"].numbers(width, what="one per input of the projection, or null: no centre")


def _replace(gm, nodes: list[torch.fx.Node], d: dict, density: float) -> None:
    """Replace linear `nodes` that share one input by one sparse op over their stacked weights.

    With several nodes (gate and up) the op's output is sliced back into each one's columns, so the
    input is tested once and the kept rows of both weights are read in one pass.
    """
    parts = [ir.linear_parts(n) for n in nodes]
    weight = torch.cat([p.weight.detach() for p in parts])
    bias = torch.cat([p.bias.detach() if p.bias is not None
                      else torch.zeros(p.out_features, dtype=weight.dtype)
                      for p in parts])
    centre = torch.tensor(d["centre"], dtype=weight.dtype) if d["centre"] is not None else None
    if centre is not None:
        bias = bias + weight @ centre  # W x = W (x − c) + W c
    first = nodes[0]
    path = "+".join(p.module_path for p in parts)
    w_t = graph_edit.add_tensor(gm, f"{path}.weight_t", weight.t().contiguous(), first)
    b = graph_edit.add_tensor(gm, f"{path}.sparse_bias", bias, first)
    c = graph_edit.add_tensor(gm, f"{path}.centre", centre, first) if centre is not None else None
    if d.get("core"):
        target, args = CORE.overload, (parts[0].x, w_t, b, c, int(d["k"]), int(d["prefix"]))
    else:
        target, args = OP.overload, (parts[0].x, w_t, b, c, float(d["threshold"]), int(d["k"]))
    with gm.graph.inserting_before(first):
        fused = gm.graph.call_function(target, args)
    meta.copy_provenance(first, fused)
    info = meta.get(first)
    if info is not None:
        meta.set_info(fused, meta.NodeInfo(info.site, info.role, info.layer, info.module_path,
                                           density=density))
    outs, start = [], 0
    for node, p in zip(nodes, parts):  # every slice is placed before anything is erased
        if len(nodes) == 1:
            outs.append(fused)
            continue
        with gm.graph.inserting_before(first):
            out = gm.graph.call_function(torch.ops.aten.slice.Tensor,
                                         (fused, -1, start, start + p.out_features))
        meta.copy_provenance(node, out)
        outs.append(out)
        start += p.out_features
    for node, out in zip(nodes, outs):
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
