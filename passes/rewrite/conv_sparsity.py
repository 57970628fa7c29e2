"""``conv_sparsity``: sparse weights on the pointwise (1x1) convolutions, run by ``sparse_conv1x1``.

Matches every convolution of the graph. The 1x1 ones (`ir.conv_sites`: kernel 1x1, groups 1, stride 1,
no padding) are rewritten; the others are refused with what they are (a spatial kernel, a stride,
groups: depthwise convolutions have one weight per channel and tap, nothing to skip per input). For a
1x1 conv with weight W [O, C]:

1. **The effective weight.** With the eval-mode batch norm that follows (`ConvSite.norm`) folded in,
   ``W' = W·s`` and ``b' = β + (b − μ)·s`` with ``s = γ/√(σ²+ε)`` per output channel: what the layer
   computes. Scores rank W', whether or not the rewrite folds the norm.
2. **Scores.** ``magnitude``: |W'_oc|. ``activation``: |W'_oc| · rms_c, rms_c the input channel's root
   mean square on calibration data (``conv_profile``): Wanda's score (Sun et al., 2023), which keeps
   weights that read channels carrying signal over larger ones that read near-silent channels.
3. **Blocks.** ``block`` consecutive output channels share each kept input channel (1×k blocks,
   k = ``block``; 1: unstructured): the kernel then loads that channel's pixels once for k outputs
   (Elsen et al., "Fast Sparse ConvNets", 2020). A block scores the sum of its members' scores.
4. **Keep.** ``group: layer``: the layer keeps its round((1 − target)·⌈O/k⌉·C) best blocks wherever
   they are; ``group: output``: every block row keeps its round((1 − target)·C) best input channels (the
   same share per output: Wanda's comparison group, and no output is emptied). Ties go to the lower
   channel. Scores are computed in fp64 from the fp32 weights and rms, so the ranking is the same on any
   machine.
5. **Compensate.** With ``compensate``, what the pruned weights added on average goes into the bias:
   ``δ_o = Σ_{c pruned} W_oc · μ_c`` with μ_c the input channel's calibration mean (``conv_profile``), in
   the conv's own output units (before the norm). ReLU6 outputs are far from zero-mean, so without it
   every pruned layer shifts its outputs and the shifts compound through the network.
6. **Rewrite.** conv (→ norm → act) becomes one ``sparsegraph::sparse_conv1x1`` call with new tensors:
   the pruned weight dense [O, C, 1, 1] (the reference, dense form and ONNX read it) and block-CSR (the
   kernels read it), the bias, and with ``fuse`` the norm folded in and the clamp of a ReLU / ReLU6 /
   hardtanh / clamp that follows; without, only the conv is replaced (its bias kept, the norm and act
   left in the graph). The user's weights are never written.

Refused, with the reason: a target of 0 or one that keeps every weight at the layer's width (the layer
stays dense, exactly), ``skip_first`` / ``skip_last`` (the first and the last 1x1 conv of the graph), a
weight computed in the graph, a site ``conv_profile`` has no facts for (needed by ``activation`` and
``compensate``).

The defaults are what measured best one-shot on EfficientNet-Lite0 (ImageNet weights; top-1 agreement
with dense and mean KL in nats on 128 crops of the sample photographs, calibrated on 32 others):
activation-aware scores, the layer as the comparison group, compensation. At 30% of the 1x1 weights:
magnitude alone 0.40 / 0.79, with compensation 0.59 / 0.26, activation-aware alone 0.69 / 0.18, both
0.77 / 0.14; at 50%: magnitude alone 0.02 / 3.3, the defaults 0.57 / 0.60 (per output row 0.49 / 0.52);
at 70% and 90% 0.03 / 2.6 and 0.00 / 2.8. From about 70% no one-shot choice keeps this compact network:
it needs training to recover (Fast Sparse ConvNets prune gradually while training). A ``fidelity``
floor lets the ``budget`` pass lower the target where a site costs too much.

The decision per site is the kept mask itself, so a replay needs neither calibration nor scores:
``block``, ``fuse``, ``bias_shift`` (δ per output channel, or empty without compensation) and ``kept``,
one hex string per block row (2·⌈C/8⌉ digits: the bytes of the row's kept-channel bits, channel c at
bit c mod 8 of byte c // 8): one bit per weight block whatever the sparsity (0.8 MB of JSON for
EfficientNet-Lite0's 31 rewritten layers, where lists of kept channel indices take 3.3 MB at 80%). The
evidence: the options it was decided with, the kept density and the share of the total score kept.
``milder`` (for the ``budget`` pass) offers lower targets: ¾, ½ and ¼ of the way from 0 to the target.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from sparsegraph import facts, graph_edit, ir, meta
from sparsegraph.codegen.sparse_conv1x1 import BLOCKS, OP, pack
from sparsegraph.pass_contract import Refused, RewritePass, SiteDecision, option, steps_towards
from sparsegraph.registry import register_pass


@register_pass("conv_sparsity")
@dataclass(frozen=True)
class ConvSparsity(RewritePass):
    """Sparse weights on 1x1 convolutions (see the module docstring)."""

    requires = ("conv_profile",)
    decode = True  # weights: the same for every input

    target: float = option(0.8, "fraction of each 1x1 conv's weights set to zero", range=(0.0, 0.99))
    score: str = option("activation", "how weights are ranked: magnitude times the input channel's rms "
                        "(activation) or magnitude alone (magnitude)", choices=("activation", "magnitude"))
    block: int = option(1, "consecutive output channels that share each kept input channel (1: "
                        "unstructured)", choices=BLOCKS)
    group: str = option("layer", "where the target holds: over the whole layer (layer) or in every block "
                        "row (output)", choices=("layer", "output"))
    compensate: bool = option(True, "fold the pruned weights' mean contribution (calibration channel means) "
                              "into the bias")
    skip_first: bool = option(True, "leave the graph's first 1x1 conv dense")
    skip_last: bool = option(False, "leave the graph's last 1x1 conv dense")
    fuse: bool = option(True, "fold the batch norm and clamp-like activation (ReLU, ReLU6, hardtanh) "
                        "that follow into the op")

    def sites(self, gm):
        return ir.conv_sites(gm)

    def decide(self, gm, ctx, stats):
        pointwise = {s.conv for s in ir.conv_sites(gm)}
        for node in gm.graph.nodes:
            if ir.kind(node) == "conv" and node not in pointwise:
                stats.matched += 1
                stats.refuse(_conv_name(node), _not_pointwise(node))
        return super().decide(gm, ctx, stats)

    def milder(self, site, opts, ctx):
        return [dataclasses.replace(opts, target=t) for t in steps_towards(opts.target, 0.0)]

    def decide_site(self, site, opts, ctx):
        last = site.layer == len(ir.conv_sites(site.conv.graph.owning_module)) - 1
        if opts.skip_first and site.layer == 0:
            raise Refused("skip_first: the graph's first 1x1 conv stays dense")
        if opts.skip_last and last:
            raise Refused("skip_last: the graph's last 1x1 conv stays dense")
        if site.weight is None:
            raise Refused("the weight is computed in the graph, not a stored parameter")
        rows = -(-site.out_channels // opts.block)
        per_row = round((1 - opts.target) * site.in_channels)
        count = (per_row * rows if opts.group == "output"
                 else round((1 - opts.target) * rows * site.in_channels))
        if count == rows * site.in_channels:
            raise Refused(f"target {opts.target} keeps every weight of {site.in_channels} input channels: "
                          "the layer stays dense")
        profile = facts.read(ctx.plan, "conv_profile", site.id, facts.ConvInput, width=site.in_channels)
        if profile is None:
            raise Refused("conv_profile has no statistics for this site")
        scores = _scores(site, opts, profile)
        if opts.group == "output":
            order = scores.sort(dim=1, descending=True, stable=True).indices[:, :per_row]
            kept = torch.zeros(rows, site.in_channels, dtype=torch.bool).scatter_(1, order, True)
        else:
            order = scores.flatten().sort(descending=True, stable=True).indices[:count]
            kept = torch.zeros(rows * site.in_channels, dtype=torch.bool)
            kept[order] = True
            kept = kept.view(rows, site.in_channels)
        shift = []
        if opts.compensate:
            dropped = ~kept.repeat_interleave(opts.block, 0)[: site.out_channels]
            shift = ((site.weight[:, :, 0, 0].double() * dropped) @ torch.tensor(profile.mean,
                                                                                 dtype=torch.float64)).tolist()
        return SiteDecision(
            {"block": opts.block, "fuse": opts.fuse, "bias_shift": shift, "kept": _to_hex(kept)},
            {"score": opts.score, "target": opts.target, "group": opts.group,
             "density": float(kept.double().mean()),
             "kept_score_share": float(scores[kept].sum() / scores.sum().clamp(min=1e-300))})

    def check_decision(self, site, entry, gm):
        conv = next((s for s in ir.conv_sites(gm) if s.id == site), None)
        if conv is None:
            entry.fail(f"names {site!r}, which is not a 1x1 conv site of this graph")
        if conv.weight is None:
            entry.fail("the conv's weight is computed in the graph, so it cannot be pruned")
        d = entry["decision"]
        d.mapping(required=("block", "fuse", "bias_shift", "kept"))
        block = d["block"].integer()
        if block not in BLOCKS:
            d["block"].fail(f"is not one of the block sizes the kernels take, {BLOCKS}")
        d["fuse"].flag()
        shift = d["bias_shift"].elements()
        if shift and len(shift) != conv.out_channels:
            d["bias_shift"].fail(f"has {len(shift)} values for {conv.out_channels} output channels: one per "
                                 "output channel (or none: no compensation)")
        for value in shift:
            value.number()
        digits = 2 * -(-conv.in_channels // 8)
        rows = d["kept"].elements(-(-conv.out_channels // block), what="one per block of output channels")
        for row in rows:
            text = row.text()
            if len(text) != digits:
                row.fail(f"has {len(text)} hex digits; {conv.in_channels} input channels take {digits}")
            try:
                bits = np.unpackbits(np.frombuffer(bytes.fromhex(text), np.uint8), bitorder="little")
            except ValueError:
                row.fail("is not a string of hex digits")
            if bits[conv.in_channels:].any():
                row.fail(f"keeps an input channel ≥ {conv.in_channels}, past the conv's inputs")

    def apply(self, gm, ctx, decisions, stats):
        kept_weights = total_weights = 0
        # last first: a site's input may be the output of the site before it (conv → norm → conv), which
        # a rewrite replaces; rewritten later, that replacement reaches the later site's op as its input
        for site in reversed(ir.conv_sites(gm)):
            decision = decisions.get(site.id)
            if decision is None:
                continue
            with ctx.at(site.id):
                block, fuse = decision.decision["block"], decision.decision["fuse"]
                kept = _from_hex(decision.decision["kept"], site.in_channels)
                shift = decision.decision["bias_shift"]
                shift = torch.tensor(shift, dtype=torch.float64) if shift else None
                weight, bias = _effective(site, shift) if fuse else _raw(site, shift)
                weight = weight.to(site.weight.dtype)
                mask = kept.repeat_interleave(block, 0)[: site.out_channels]
                pruned = weight * mask
                values, indices, indptr = pack(pruned, kept, block)
                lo, hi = site.bounds if fuse and site.act is not None else (None, None)
                node = site.out if fuse else site.conv
                path = site.module_path
                args = [site.x] + [
                    None if t is None else graph_edit.add_tensor(gm, f"{path}.{name}", t, node)
                    for name, t in (("sparse_weight", pruned[:, :, None, None].contiguous()),
                                    ("sparse_bias", None if bias is None else bias.to(weight.dtype)),
                                    ("csr_values", values), ("csr_indices", indices), ("csr_indptr", indptr))]
                new = graph_edit.replace_with_call(node, OP.overload, (*args, lo, hi))
                meta.copy_provenance(site.conv, new)
                stats.rewritten += 1
                kept_weights += int(mask.sum())
                total_weights += mask.numel()
        stats.counters["density"] = round(kept_weights / max(total_weights, 1), 4)


def _raw(site: ir.ConvSite, shift: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W [O, C], b + δ [O] or None)`` in fp64: the conv's own weight and bias, δ added."""
    bias = None if site.bias is None else site.bias.double()
    if shift is not None:
        bias = shift if bias is None else bias + shift
    return site.weight[:, :, 0, 0].double(), bias


def _effective(site: ir.ConvSite,
               shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W' [O, C], b' [O] or None)`` in fp64: the conv (its bias shifted by δ) with its batch norm folded
    in (module docstring)."""
    weight, bias = _raw(site, shift)
    if site.norm is None:
        return weight, bias
    gamma, beta, mean, var, eps = ir.norm_parts(site.norm)
    scale = (var.double() + eps).rsqrt() * (1.0 if gamma is None else gamma.double())
    centred = (0.0 if bias is None else bias) - mean.double()
    shift = (0.0 if beta is None else beta.double()) + centred * scale
    return weight * scale[:, None], shift


def _scores(site: ir.ConvSite, opts: ConvSparsity, profile: facts.ConvInput) -> torch.Tensor:
    """Block scores [⌈O/block⌉, C] in fp64 (module docstring, steps 1–3)."""
    score = _effective(site)[0].abs()
    if opts.score == "activation":
        score = score * torch.tensor(profile.rms, dtype=torch.float64)
    rows = -(-site.out_channels // opts.block)
    padded = torch.zeros(rows * opts.block, site.in_channels, dtype=torch.float64)
    padded[: site.out_channels] = score
    blocks = padded.view(rows, opts.block, site.in_channels)
    total = blocks[:, 0]
    for r in range(1, opts.block):  # in a fixed order: the same sum on every machine
        total = total + blocks[:, r]
    return total


def _to_hex(kept: torch.Tensor) -> list[str]:
    """One hex string per row of a bool [rows, C] mask (channel c at bit c mod 8 of byte c // 8)."""
    packed = np.packbits(kept.numpy(), axis=1, bitorder="little")
    return [row.tobytes().hex() for row in packed]


def _from_hex(rows: list[str], channels: int) -> torch.Tensor:
    """The bool [rows, C] mask `_to_hex` wrote."""
    packed = np.stack([np.frombuffer(bytes.fromhex(row), np.uint8) for row in rows])
    return torch.from_numpy(np.unpackbits(packed, axis=1, bitorder="little")[:, :channels].astype(bool))


def _conv_name(node) -> str:
    """``conv:PATH`` of a convolution that is not a site (its weight's module), for a refusal."""
    if node.op == "call_module":
        return f"conv:{node.target}"
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    if isinstance(weight, torch.fx.Node) and weight.op == "get_attr":
        return f"conv:{weight.target.rsplit('.', 1)[0]}"
    return f"conv:{ir.module_path(node) or node.name}"


def _not_pointwise(node) -> str:
    """Why a convolution is not a 1x1 site, as the user would say it."""
    return (f"not a pointwise convolution ({', '.join(ir.conv_geometry(node).mismatches())}): only 1x1 "
            "convolutions with stride 1, no padding and groups 1 are rewritten")
