"""``nm_weights``: N:M structured weight sparsity on the linear layers of attention and MLP sites.

Matches every linear node whose role (``attn.q``, ``mlp.down``, …) is in ``roles``. For each, keeps the
``n`` best-scoring weights of every group of ``m`` consecutive inputs and replaces ``linear(x, W, b)`` by
``sparsegraph::nm_linear(x, values, offsets, b, n, m)``. The score (``score``) is the magnitude |W_ij|, or
with ``activation`` |W_ij| · rms_j, rms_j the layer's input feature j's root mean square on calibration
data (``linear_profile``): Wanda's score (Sun et al., 2023), which keeps the weights on features that carry
signal. One-shot, with no fine-tuning, fidelity drops on dense pretrained models (MiniLM's MLPs at 2:4:
mean cosine 0.78 to dense by magnitude, 0.85 activation-aware, on unseen sentences), which is why no
default pipeline uses it and `sparsegraph.recover` exists.

Refuses, with the reason recorded: a weight computed in the graph rather than stored; ``in_features``
not a multiple of ``m``; ``n == m`` (nothing would be pruned: the layer stays dense, exactly); a fused
gated MLP's one ``gate_up_proj`` (annotated ``mlp.up``: it computes gate and up) when ``roles`` names only
one of ``mlp.gate`` and ``mlp.up`` (N:M groups run along each output's inputs, so with both named it is
packed like any linear).

Counts are in linear layers: matched, rewritten, refused (with the reason); ``counters["sites"]`` is the
number of sites touched.

Progressive N:M (``schedule: progressive``, after Progressive Gradient Flow and gradual magnitude pruning: a
pretrained weight loses less when the mask tightens while it trains than when it is cut in one shot). The
compile is the one-shot 2:4 model as above; the decision records the schedule, and `sparsegraph.recover` runs
it: it trains the layer's dense weight W (a copy of the model's) under a mask M that tightens from the dense
weight through milder levels of the same group size, n_k = m−1, …, n (2:4: dense → 3:4 from the first step →
2:4), the level k taking over at step round(k/(m−n−1) · ramp · steps) (the last at the latest on the last
step; no dense level: distilled toward the dense model, a dense layer has loss and gradient 0, its steps would
be lost), each new mask the n_k best-scoring weights (the layer's score, of the trained W) of every group
*among those the previous mask kept* (`tighten`: nested masks, so a pruned weight never returns and the last
mask is a valid n:m mask of the trained weights). The forward computes ``x (W ⊙ M)ᵀ``; pruned weights get no
gradient. At the end the layer's values and offsets are W at the final mask (`pack_mask`), and the plan's
``positions_sha256`` is rewritten to that mask's: plan and weights agree, and replaying the plan is refused as
for any recovery (the trained weights, and with them the positions, are in the saved model). Levels share the
group size m because masks of a coarser group (4:8) need not contain any 2:4 mask.

The plan records, per site and layer, ``n`` and ``m`` (the decision), with ``schedule`` and ``ramp`` when
progressive and ``input_rms`` (the rms_j the score used, so a replay needs no calibration) when
activation-aware, and the share of weight magnitude
kept plus a sha256 of the kept positions (the evidence). Replaying a plan repacks the weights and checks
the hash, so a plan applied to changed weights is refused instead of silently pruning differently. A
decision from a plan may name only linear layers of its site with stored weights, each with integers
1 ≤ n < m and m dividing the layer's inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

from sparsegraph import facts, graph_edit, ir
from sparsegraph.codegen.nm_linear import OP, nm_pack, positions_digest
from sparsegraph.errors import ConfigError, PlanError
from sparsegraph.ir import LINEAR_ROLES, role_linears
from sparsegraph.pass_contract import Refused, RewritePass, SiteDecision, option, refusals
from sparsegraph.registry import register_pass

_FUSED_ROLES = frozenset({"mlp.up", "mlp.gate"})  # what a fused gate_up linear (role mlp.up) computes


@register_pass("nm_weights")
@dataclass(frozen=True)
class NMWeights(RewritePass):
    """N:M structured weights (2:4 by default) on the linear layers of attention and MLP sites."""

    decode = True  # weights: the same for every token

    n: int = option(2, "weights kept in every group of m inputs", range=(1, None))
    m: int = option(4, "group size along the input dimension", range=(1, None))
    roles: tuple[str, ...] = option(LINEAR_ROLES, "roles of the linear layers to sparsify")
    schedule: str = option("one-shot", "one-shot: the n:m mask of the model's weights; progressive: the "
                           "same at compile, and sparsegraph.recover tightens the mask from dense while it "
                           "trains (module docstring)", choices=("one-shot", "progressive"))
    ramp: float = option(0.5, "progressive: share of recover's steps over which the mask tightens to n:m",
                         range=(0.0, 1.0))
    score: str = option("magnitude", "how weights are ranked in a group: magnitude |W|, or activation: |W| "
                        "times the input feature's rms (Wanda; needs linear_profile earlier)",
                        choices=("magnitude", "activation"))

    @property
    def requires(self) -> tuple[str, ...]:  # what the pipeline must run earlier, by the options
        return ("linear_profile",) if self.score == "activation" else ()

    def __post_init__(self):
        super().__post_init__()
        if self.n > self.m:
            raise ConfigError(f"pass 'nm_weights': n={self.n} must not exceed m={self.m}")
        unknown = set(self.roles) - set(LINEAR_ROLES)
        if unknown:
            raise ConfigError(f"pass 'nm_weights': roles {sorted(unknown)} are not linear roles "
                              f"{LINEAR_ROLES}")

    def decide(self, gm, ctx, stats):
        decisions: dict[str, dict] = {}
        fused = {s.up for s in ir.mlp_sites(gm) if s.fused}
        for node, info in role_linears(gm):
            opts = ctx.options(self, info.site, info.module_path)
            computes = _FUSED_ROLES if node in fused else {info.role}
            named = computes & set(opts.roles)
            if not named:
                continue
            parts = ir.linear_parts(node)
            with refusals(stats, f"{info.site} [{parts.module_path}]"):
                if named != computes:
                    raise Refused(f"one fused linear computes gate and up (the halves of its output) and "
                                  f"roles name only {min(named)}: name mlp.gate and mlp.up to sparsify it")
                if parts.weight is None:
                    raise Refused("weight is computed in the graph, not a stored parameter")
                if parts.in_features % opts.m:
                    raise Refused(f"in_features {parts.in_features} is not a multiple of m={opts.m}")
                if opts.n == opts.m:
                    raise Refused(f"n == m == {opts.m} keeps every weight (dense)")
                rms = _input_rms(ctx, info.site, parts) if opts.score == "activation" else None
                values, offsets = nm_pack(parts.weight, opts.n, opts.m, rms)
                entry = decisions.setdefault(info.site, {"decision": {}, "evidence": {}})
                entry["decision"][parts.module_path] = {
                    "n": opts.n, "m": opts.m,
                    **({"schedule": opts.schedule, "ramp": opts.ramp} if opts.schedule == "progressive"
                       else {}),
                    **({"input_rms": rms} if rms is not None else {})}
                entry["evidence"][parts.module_path] = {
                    "kept_magnitude": float(values.abs().sum() / parts.weight.abs().sum().clamp(min=1e-30)),
                    "positions_sha256": positions_digest(offsets)}
        return {site: SiteDecision(e["decision"], e["evidence"]) for site, e in decisions.items()}

    def check_decision(self, site, entry, gm):
        layers = {ir.linear_parts(node).module_path: node for node, info in role_linears(gm)
                  if info.site == site}
        if not layers:
            entry.fail(f"names {site!r}, which has no linear layer with a role in {LINEAR_ROLES} in this "
                       "graph")
        d = entry["decision"]
        d.mapping(optional=layers)
        if not d.value:
            d.fail("names no layer; leave the site out of the plan to keep it dense")
        for path, layer in d.items():
            parts = ir.linear_parts(layers[path])
            layer.mapping(required=("n", "m"), optional=("schedule", "ramp", "input_rms"))
            m = layer["m"].integer(2)
            layer["n"].integer(1, m - 1)
            if "schedule" in layer.value:
                layer["schedule"].text(("one-shot", "progressive"))
                layer.mapping(required=("n", "m", "schedule", "ramp"), optional=("input_rms",))
                layer["ramp"].number(0.0, 1.0)
            if "input_rms" in layer.value:
                layer["input_rms"].numbers(parts.in_features, lo=0.0, what="one per input feature")
            if parts.weight is None:
                layer.fail("the layer's weight is computed in the graph, not a stored parameter")
            if parts.in_features % m:
                layer["m"].fail(f"does not divide the layer's {parts.in_features} inputs")
        for _, e in entry["evidence"].items():  # apply compares the kept positions with the recorded hash
            if "positions_sha256" in e.mapping(extra=True) and e["positions_sha256"].value is not None:
                e["positions_sha256"].text()

    def apply(self, gm, ctx, decisions, stats):
        done: set[str] = set()
        for node, info in role_linears(gm):
            layer = decisions.get(info.site)
            parts = ir.linear_parts(node)
            if layer is None or parts.module_path not in layer.decision:
                continue
            with ctx.at(info.site):
                d = layer.decision[parts.module_path]
                n, m = d["n"], d["m"]
                values, offsets = nm_pack(parts.weight, n, m, d.get("input_rms"))
                expected = layer.evidence.get(parts.module_path, {}).get("positions_sha256")
                if expected is not None and expected != positions_digest(offsets):
                    raise PlanError(f"the weights of {parts.module_path} differ from those the plan was made "
                                    "with (kept positions changed); make a new plan for these weights")
                bias = graph_edit.linear_bias_node(node)
                v = graph_edit.add_tensor(gm, f"{parts.module_path}.nm_values", values, node)
                o = graph_edit.add_tensor(gm, f"{parts.module_path}.nm_offsets", offsets, node)
                graph_edit.replace_with_call(node, OP.overload, (parts.x, v, o, bias, n, m))
                done.add(info.site)
                stats.rewritten += 1
        stats.counters["sites"] = len(done)


def _input_rms(ctx, site: str, parts: ir.LinearParts) -> list[float]:
    """The rms per input feature ``linear_profile`` recorded for the layer; a `ConfigError` naming the fix
    when it recorded none."""
    profile = facts.read(ctx.plan, "linear_profile", site, facts.LinearInputs)
    if profile is None or parts.module_path not in profile.layers:
        raise ConfigError(f"pass 'nm_weights': score: activation ranks weights by the input's rms, and "
                          f"linear_profile recorded none for {parts.module_path!r}: add `- linear_profile` "
                          "before nm_weights (it needs calibration data), or use score: magnitude")
    return profile.layers[parts.module_path][1]

