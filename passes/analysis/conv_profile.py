"""``conv_profile``: the per-channel size of every pointwise convolution's input on calibration data.

Runs every calibration batch through the traced graph and, at each 1x1 conv site (`ir.conv_sites`),
accumulates Σ x and Σ x² per input channel over every pixel of every image (fp64) and the pixel count.
Written to the plan per site (`facts.ConvInput`): the channel mean ``μ_c = Σ x_c / pixels`` and
``rms_c = √(Σ x_c² / pixels)``. ``conv_sparsity`` weighs weights with rms_c in its activation-aware score
|W_oc| · ‖x_c‖ (Wanda, Sun et al. 2023: a weight on a channel that is usually near zero matters less than
its magnitude says) and folds Σ_pruned W_oc μ_c into the bias (what the pruned weights added on average).

Why its own pass and not ``activation_profile``: that pass keeps per-token statistics over a tensor's
last axis (histograms, reservoir samples for medians and thresholds) for activation sparsity; a conv
input has its channels on axis 1 and a "token" per pixel (12,544 per image at 112×112), and the rewrite
needs two numbers per channel. Here the cost is a sum and a square-and-sum per input, and memory
O(channels).

Calibration shards over processes as ``activation_profile``'s does (`sparsegraph.distributed`): the sums
add. A plan that supplies these facts instead is held to one finite mean and non-negative rms per input
channel.
"""

from __future__ import annotations

from dataclasses import dataclass

from sparsegraph import facts, ir
from sparsegraph.observe import ChannelSums
from sparsegraph.pass_contract import AnalysisPass
from sparsegraph.registry import register_pass


@register_pass("conv_profile")
@dataclass(frozen=True)
class ConvProfile(AnalysisPass):
    """Per-channel rms of each 1x1 convolution's input on calibration data (see the module docstring)."""

    needs_calibration = True

    def analyze(self, gm, ctx, stats):
        sites = ir.conv_sites(gm)
        watched = {s.x: (1, [t.id for t in sites if t.x is s.x]) for s in sites}
        sums = ChannelSums.over_calibration(gm, watched, ctx, self.name)
        for site in sites:
            stats.matched += 1
            total, square, pixels = sums[site.id]
            ctx.plan.set_evidence(self.name, site.id, facts.ConvInput(
                pixels, (total / pixels).tolist(), (square / pixels).sqrt().tolist()).to_json())
        ctx.plan.set_summary(self.name, {"batches": len(ctx.calibration),
                                         "pixels": {s.id: sums[s.id][2] for s in sites}})

    def check_evidence(self, site, evidence, gm):
        conv = next((s for s in ir.conv_sites(gm) if s.id == site), None)
        if conv is None:
            evidence.fail(f"names {site!r}, which is not a 1x1 conv site of this graph")
        facts.ConvInput.from_json(evidence, conv.in_channels)

