"""``activation_profile``: how the MLP activations of a model behave on calibration data.

Runs every calibration batch through the traced graph and observes, at each MLP site, the
intermediate activation that feeds the down projection (``act(up(x))``, or ``act(gate(x)) * up(x)``
for gated MLPs) and, with ``inputs=True``, the site's input ``x`` (what TEAL sparsifies before the up
and gate projections); with ``attention=True``, at each attention site, the input of the q/k/v
projections (``attn_input``) and of the output projection (``attn_out_input``). Padding tokens are
left out when the model takes an ``attention_mask``.

Statistics stream, in bounded memory, per site and per observed tensor (``I`` neurons):

- token count, exact-zero fraction, a 64-bin histogram of log10|a|;
- per neuron: mean, rms, mean |a| (its activation mass);
- a uniform reservoir sample of ``reservoir`` tokens (each token draws a random key; the tokens with
  the smallest keys are kept, so two samples merge by concatenating and keeping the smallest keys
  again). Quantiles, per-neuron medians and thresholds are computed on it.

Calibration shards over processes when ``torch.distributed`` is initialised (``sparsegraph profile
--nproc N``): each rank streams every N-th batch, then the streams are merged (sums and histograms
add, reservoirs keep the smallest keys of the union). Reservoir keys are drawn per batch index, so
the merged profile is the one a single process computes on the same data.

Written to the plan as evidence per site and observed tensor (``"down_input"``, ``"mlp_input"``,
``"attn_input"``, ``"attn_out_input"``):

- ``centre``: per-neuron median c_j. GELU/SiLU outputs of one neuron cluster around a small negative
  value rather than zero, so sparsifying ``a − c`` and folding ``W c`` into the bias loses far less
  than zeroing small ``a`` (see ``../shared/FINDINGS.md``);
- ``thresholds``: for each sparsity in ``targets``, the per-layer threshold t with
  P(|a| ≤ t) = target (``magnitude``) and P(|a − c| ≤ t) = target (``centred``);
- ``firing``: per-neuron fraction of tokens with |a| above the ``magnitude`` threshold at 50%;
- ``hot``: the fewest neurons that carry ``hot_mass`` of the total activation mass (core neurons);
- ``quantiles`` of |a|, the histogram, ``mass`` and ``rms`` per neuron.

When a plan supplies these facts instead of calibration, `check_evidence` holds them to this layout at
the graph's widths (what `neuron_sparsity`, `neuron_pruning`, `token_pruning` and the report read).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx

from sparsegraph import distributed, facts, ir, svg
from sparsegraph.errors import CalibrationError
from sparsegraph.observe import Observer
from sparsegraph.pass_contract import AnalysisPass, option
from sparsegraph.registry import register_pass
from sparsegraph.sections import Section

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
HIST_RANGE = (-6.0, 2.0)  # log10|a|
HIST_BINS = 64


@register_pass("activation_profile")
@dataclass(frozen=True)
class ActivationProfile(AnalysisPass):
    """Per-site activation statistics of the MLPs on calibration data (see the module docstring)."""

    needs_calibration = True

    targets: tuple[float, ...] = option((0.3, 0.5, 0.6, 0.7, 0.9),
                                        "sparsities whose per-layer thresholds are recorded (each in [0, 1])",
                                        range=(0.0, 1.0))
    hot_mass: float = option(0.8, "share of activation mass the hot (core) neuron set covers",
                             range=(0.0, 1.0))
    reservoir: int = option(4096, "tokens kept per site for quantiles and medians (bounded memory)",
                            range=(16, None))
    inputs: bool = option(False, "also profile each MLP's input (for input sparsity on up/gate)")
    attention: bool = option(False, "also profile the inputs of the attention projections (q/k/v and out)")
    seed: int = option(0, "seed of the reservoir sampling")
    min_tokens: int = option(16, "fewest tokens a site must see: per-neuron medians and thresholds need a "
                             "sample", range=(1, None))

    def analyze(self, gm, ctx, stats):
        observed = list(_observed(gm, self.inputs, self.attention))
        watched: dict[torch.fx.Node, list[tuple[str, str]]] = {}
        for node, key in observed:
            watched.setdefault(node, []).append(key)
        streams: dict[tuple[str, str], Stream] = {}
        observer = _Observer(gm, watched, streams, self.reservoir)
        rank, world = distributed.rank_and_world()
        mine = list(enumerate(ctx.calibration))[rank::world]  # each process profiles its shard
        for index, batch in ctx.progress(mine, "activation_profile"):
            # keys drawn per batch index: the reservoir is the same however the batches are sharded
            observer.generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
            observer.batch = index
            observer.run_batch(batch.args, batch.kwargs)
        if world > 1:
            streams = distributed.merge(streams, Stream.merged)
        self._check(streams)
        for site_id in dict.fromkeys(site for _, (site, _) in observed):
            stats.matched += 1
            profile = facts.SiteActivations({what: streams[(site, what)].summary(self.targets, self.hot_mass)
                                             for _, (site, what) in observed
                                             if site == site_id and (site, what) in streams})
            ctx.plan.set_evidence(self.name, site_id, profile.to_json())
        tokens = {site: st.tokens for (site, what), st in streams.items() if what == "down_input"}
        ctx.plan.set_summary(self.name, {"batches": len(ctx.calibration), "tokens_per_site": tokens,
                                         "targets": list(self.targets)})
        stats.counters.update(batches=len(ctx.calibration), tokens=max(tokens.values(), default=0))

    @classmethod
    def report_section(cls, plan, model=None):
        """One histogram of log10|a| per MLP site, the thresholds of every recorded target marked."""
        return Section(figures=_histograms(plan))

    def _check(self, streams: dict) -> None:
        """Refuse a profile too thin to hold its statistics, or one that saw only constant activations."""
        for (site, what), stream in streams.items():
            if stream.tokens < self.min_tokens:
                raise CalibrationError(f"saw {stream.tokens} token(s) at site {site} ({what}), "
                                       f"fewer than min_tokens={self.min_tokens}: per-neuron medians and "
                                       "thresholds need more calibration data (more or longer batches, fewer "
                                       "padding tokens)")
        if streams and all(s.constant() for s in streams.values()):
            raise CalibrationError("every profiled activation was the same for every calibration token: is "
                                   "the calibration data constant (all zeros, one repeated input)? Calibrate "
                                   "on real inputs")


    def check_evidence(self, site, evidence, gm):
        widths = {what: ir.shape(node)[-1] for node, (s, what) in _observed(gm, True, True) if s == site}
        if not widths:
            evidence.fail(f"names {site!r}, which is not an MLP or attention site of this graph")
        evidence.mapping(optional=widths)  # no tensor the site cannot observe
        facts.SiteActivations.from_json(evidence, widths)


def _observed(gm, inputs: bool, attention: bool):
    """(node, (site id, what)) for every tensor to profile, in graph order of the sites."""
    for s in ir.mlp_sites(gm):
        yield s.intermediate_node, (s.id, "down_input")
        if inputs:
            yield ir.linear_parts(s.up).x, (s.id, "mlp_input")
    if attention:
        for a in ir.attention_sites(gm):
            qkv = [p for p in (a.q_proj, a.k_proj, a.v_proj) if p is not None]
            if qkv:
                yield ir.linear_parts(qkv[0]).x, (a.id, "attn_input")
            if a.o_proj is not None:
                yield ir.linear_parts(a.o_proj).x, (a.id, "attn_out_input")


class Stream:
    """Streaming statistics of one observed activation [tokens, I] (see the module docstring)."""

    def __init__(self, width: int, reservoir: int):
        self.tokens = 0
        self.zeros = 0
        self.sum = torch.zeros(width, dtype=torch.float64)
        self.sum_sq = torch.zeros(width, dtype=torch.float64)
        self.sum_abs = torch.zeros(width, dtype=torch.float64)
        self.hist = torch.zeros(HIST_BINS + 2, dtype=torch.int64)  # underflow, bins, overflow
        self.capacity = reservoir
        self.sample = torch.empty(0, width)
        self.keys = torch.empty(0)

    def add(self, rows: torch.Tensor, generator: torch.Generator) -> None:
        rows = rows.detach().float()
        self.tokens += rows.shape[0]
        self.zeros += int((rows == 0).sum())
        self.sum += rows.sum(0, dtype=torch.float64)
        self.sum_sq += rows.double().square().sum(0)
        self.sum_abs += rows.abs().sum(0, dtype=torch.float64)
        logs = rows.abs().clamp(min=1e-30).log10().flatten()
        lo, hi = HIST_RANGE
        index = ((logs - lo) / (hi - lo) * HIST_BINS).floor().clamp(-1, HIST_BINS).long() + 1
        self.hist += torch.bincount(index, minlength=HIST_BINS + 2)
        keys = torch.rand(rows.shape[0], generator=generator)
        self.merge(rows, keys)

    @staticmethod
    def merged(parts: list[Stream]) -> Stream:
        """One stream equal to having streamed every part's tokens (the parts come from other processes)."""
        out = Stream(len(parts[0].sum), parts[0].capacity)
        for p in parts:
            out.tokens += p.tokens
            out.zeros += p.zeros
            out.sum += p.sum
            out.sum_sq += p.sum_sq
            out.sum_abs += p.sum_abs
            out.hist += p.hist
            out.merge(p.sample, p.keys)
        return out

    def constant(self) -> bool:
        """Whether every neuron took one value over all tokens (variance at rounding level)."""
        n = max(self.tokens, 1)
        return facts.constant(self.sum / n, self.sum_sq / n)

    def merge(self, rows: torch.Tensor, keys: torch.Tensor) -> None:
        """Add sampled rows with their keys, keeping the `capacity` smallest keys."""
        self.sample = torch.cat([self.sample, rows])
        self.keys = torch.cat([self.keys, keys])
        if self.keys.numel() > self.capacity:
            keep = self.keys.topk(self.capacity, largest=False).indices.sort().values
            self.sample, self.keys = self.sample[keep], self.keys[keep]

    def summary(self, targets: tuple[float, ...], hot_mass: float) -> facts.ActivationStats:
        n = max(self.tokens, 1)
        mean, mass = self.sum / n, self.sum_abs / n
        rms = (self.sum_sq / n).sqrt()
        centre = self.sample.median(0).values if len(self.sample) else torch.zeros_like(mean).float()
        magnitude = self.sample.abs().flatten()
        centred = (self.sample - centre).abs().flatten()
        thresholds = {
            "magnitude": {str(t): _quantile(magnitude, t) for t in targets},
            "centred": {str(t): _quantile(centred, t) for t in targets},
        }
        t50 = _quantile(magnitude, 0.5)
        firing = (self.sample.abs() > t50).float().mean(0) if len(self.sample) else torch.zeros_like(centre)
        order = mass.argsort(descending=True)
        cumulative = mass[order].cumsum(0) / mass.sum().clamp(min=1e-30)
        hot_count = int((cumulative < hot_mass).sum()) + 1
        lo, hi = HIST_RANGE
        return facts.ActivationStats(
            tokens=self.tokens, sampled=len(self.sample), zero_fraction=self.zeros / (n * len(mean)),
            constant=self.constant(), quantiles={str(q): _quantile(magnitude, q) for q in QUANTILES},
            thresholds=thresholds, centre=_floats(centre), mean=_floats(mean), rms=_floats(rms),
            mass=_floats(mass), firing=_floats(firing),
            hot=sorted(order[:min(hot_count, len(order))].tolist()),
            histogram_range=(lo, hi), histogram_counts=self.hist.tolist())


class _Observer(Observer):
    """Runs the graph and streams the watched nodes' outputs (padding tokens dropped)."""

    def __init__(self, gm, watched, streams, reservoir):
        super().__init__(gm)
        self.watched, self.streams = watched, streams
        self.reservoir = reservoir
        self.generator = torch.Generator()
        self.batch = 0

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.watched and isinstance(out, torch.Tensor):
            if not bool(torch.isfinite(out).all()):
                site, what = self.watched[n][0]
                raise CalibrationError(f"calibration batch {self.batch}: the activations at site {site} "
                                       f"({what}) are NaN or infinite; the model overflows on this data "
                                       "(check the inputs, or calibrate in float32)")
            rows = out
            if self.token_mask is not None and tuple(out.shape[:2]) == tuple(self.token_mask.shape):
                rows = out[self.token_mask]
            rows = rows.reshape(-1, out.shape[-1])
            for key in self.watched[n]:
                if key not in self.streams:
                    self.streams[key] = Stream(out.shape[-1], self.reservoir)
                self.streams[key].add(rows, self.generator)
        return out


def _quantile(values: torch.Tensor, q: float) -> float:
    if values.numel() == 0:
        return 0.0
    k = min(values.numel(), max(1, math.ceil(q * values.numel())))
    return _float(values.kthvalue(k).values)


def _float(x) -> float:
    return float(f"{float(x):.7g}")


def _floats(t: torch.Tensor) -> list[float]:
    return [float(f"{v:.7g}") for v in t.tolist()]


# --------------------------------------------------------------------------------------- report


def _histograms(plan) -> list[tuple[str, str]]:
    """One histogram of log10|a| per MLP site from the activation profile, thresholds marked."""
    charts = []
    for site in plan.sites:
        profile = facts.read(plan, "activation_profile", site, facts.SiteActivations,
                             widths={"down_input": None})
        stats = profile.observed.get("down_input") if profile is not None else None
        if stats is None:
            continue
        lo, hi = stats.histogram_range
        markers = {f"t{round(float(t) * 100)}%": math.log10(v)
                   for t, v in stats.thresholds["magnitude"].items() if v > 0}
        charts.append(svg.histogram(f"{site}: log10|a|", stats.histogram_counts[1:-1],  # no under/overflow
                                    lo, hi, markers, f"zero fraction {stats.zero_fraction:.3f}"))
    return ([("Activation magnitudes per MLP (thresholds for each target sparsity)", "".join(charts))]
            if charts else [])
