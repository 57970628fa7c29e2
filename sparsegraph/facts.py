"""The facts analysis passes write into the plan, typed: the schema of plan evidence.

Each is a frozen dataclass with ``to_json()`` (exactly what the pass writes: the plan's JSON layout,
docs/plan.md) and ``from_json(entry, …)``, which reads it back through a `pass_contract.Entry`: every
key a reader uses is checked (type, range, length) and a bad one is a `PlanEntryError` naming the key
and the fix. Analysis passes write them; rewrite passes, other analyses and the report sections read
them with `read`, so no module reads another's dictionary by string keys, and a plan's facts are
checked by the very code that reads them.

Graph-dependent checks (does the site exist, is the width the layer's) are the passes' own
(``check_evidence``), given the graph; here every check is about the facts themselves. Records may
carry keys beyond these (a reader ignores them); a key a reader uses is required.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sparsegraph.attention_layouts import PYRAMID_NEAR
from sparsegraph.pass_contract import Entry

FIX = "restore the facts the pass wrote, or profile again (compile with a config and calibration data)"


def read(plan, pass_name: str, site: str, kind, **context):
    """The facts `pass_name` recorded for `site`, as `kind` (`kind.from_json`), or None when it recorded
    none there."""
    if plan.evidence(pass_name, site) is None:
        return None
    return kind.from_json(Entry.in_plan(plan.sites, (site, pass_name, "evidence"), FIX, pass_name, site),
                          **context)


def constant(mean, mean_square) -> bool:
    """Whether every neuron took one value over the tokens: its variance, mean_square − mean², at
    rounding level. `activation_profile` records this as ``constant``; for a profile written before it
    did, the same test runs on the recorded moments (mean, and rms² as the mean square)."""
    mean = torch.as_tensor(mean, dtype=torch.float64)
    mean_square = torch.as_tensor(mean_square, dtype=torch.float64)
    variance = mean_square - mean.square()
    return bool((variance <= 1e-12 * mean_square.clamp(min=1e-30)).all())


def _fraction_key(entry: Entry, key: str, what: str, low_open: bool = False) -> float:
    """A mapping key that names a fraction (a target sparsity, a keep ratio), as the passes write them."""
    try:
        value = float(key)
    except ValueError:
        value = float("nan")
    if not ((value > 0.0) if low_open else (value >= 0.0)) or not value <= 1.0:
        entry.fail(f"the key {key!r} is not a {what} in {'(0' if low_open else '[0'}, 1]")
    return value


# ------------------------------------------------------------------------------------- activation_profile


@dataclass(frozen=True)
class ActivationStats:
    """One observed activation [tokens, width] of a site (``activation_profile``): token count, the
    per-layer thresholds of |a| (``magnitude``) and |a − c| (``centred``) for each recorded target
    sparsity, per-neuron centre (median), mean, rms, mass (mean |a|) and firing rate, the hot neurons
    and a log10|a| histogram."""

    tokens: int
    sampled: int
    zero_fraction: float
    constant: bool
    quantiles: dict[str, float]
    thresholds: dict[str, dict[str, float]]  # method → target sparsity (as written, "0.5") → threshold
    centre: list[float]
    mean: list[float]
    rms: list[float]
    mass: list[float]
    firing: list[float]
    hot: list[int]
    histogram_range: tuple[float, float]
    histogram_counts: list[int]

    def threshold(self, method: str, target: float) -> float | None:
        """The threshold `method` recorded for sparsity `target`, or None when it was not a target."""
        table = self.thresholds[method]
        key = next((t for t in table if abs(float(t) - target) < 1e-9), None)
        return None if key is None else table[key]

    def targets(self, method: str) -> list[float]:
        return sorted(float(t) for t in self.thresholds[method])

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "sampled": self.sampled, "zero_fraction": self.zero_fraction,
                "constant": self.constant, "quantiles": self.quantiles, "thresholds": self.thresholds,
                "centre": self.centre, "mean": self.mean, "rms": self.rms,
                "mass": self.mass, "firing": self.firing,
                "hot": self.hot, "histogram": {"log10_range": list(self.histogram_range),
                                               "counts": self.histogram_counts}}

    @classmethod
    def from_json(cls, e: Entry, width: int | None) -> ActivationStats:
        """Checked for a layer of `width` neurons (None: as many as the centre lists, where the graph is
        not at hand: a saved plan's report)."""
        if width is None:
            width = len(e["centre"].elements())
        e.mapping(required=("tokens", "zero_fraction", "thresholds", "centre", "mean", "rms",
                            "mass", "hot", "histogram"), extra=True)
        thresholds = {}
        for method, table in e["thresholds"].mapping(required=("magnitude", "centred")).items():
            thresholds[method] = {}
            for target in table:
                threshold = e["thresholds"][method][target]
                _fraction_key(threshold, target, "sparsity")
                thresholds[method][target] = threshold.number(0.0)
        histogram = e["histogram"]
        histogram.mapping(required=("log10_range", "counts"))
        mean, rms = (e["mean"].numbers(width, what="one per neuron"),
                     e["rms"].numbers(width, lo=0.0, what="one per neuron"))
        return cls(tokens=e["tokens"].integer(0),
                   sampled=e["sampled"].integer(0) if "sampled" in e else 0,
                   zero_fraction=e["zero_fraction"].number(0.0, 1.0),
                   constant=e["constant"].flag() if "constant" in e
                   else constant(mean, [r * r for r in rms]),
                   quantiles={q: e["quantiles"][q].number(0.0) for q in e["quantiles"].mapping(extra=True)}
                   if "quantiles" in e else {},
                   thresholds=thresholds,
                   centre=e["centre"].numbers(width, what="one per neuron"),
                   mean=mean, rms=rms,
                   mass=e["mass"].numbers(width, lo=0.0, what="one per neuron"),
                   firing=e["firing"].numbers(width, lo=0.0, what="one per neuron") if "firing" in e else [],
                   hot=e["hot"].indices(width, what="neuron"),
                   histogram_range=tuple(histogram["log10_range"].numbers(2, what="[low, high]")),
                   histogram_counts=[c.integer(0) for c in histogram["counts"].elements(min_length=1)])


@dataclass(frozen=True)
class SiteActivations:
    """``activation_profile``'s facts at one site: `ActivationStats` per observed tensor (``down_input``,
    ``mlp_input``, ``attn_input``, ``attn_out_input``)."""

    observed: dict[str, ActivationStats] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {what: stats.to_json() for what, stats in self.observed.items()}

    @classmethod
    def from_json(cls, e: Entry, widths: dict[str, int | None]) -> SiteActivations:
        """The tensors of `widths` (name → neurons) the site's facts hold, each checked for its width
        (a reader names the ones it uses; ``check_evidence`` names every one the site can observe)."""
        e.mapping(extra=True)
        return cls({what: ActivationStats.from_json(e[what], width) for what, width in widths.items()
                    if what in e})


# ------------------------------------------------------------------------------------------ head_patterns


def _positive(e) -> None:
    e.integer(1)


def _diagonals(e) -> None:
    """Offsets from the diagonal (any integer, each once; one that misses the grid at this length lists
    nothing here and may list blocks at another length)."""
    values = [x.integer() for x in e.elements()]
    if len(set(values)) != len(values):
        e.fail("repeats a diagonal")


def _columns(e) -> None:
    """Key blocks counted from the start (≥ 0, each once)."""
    values = [x.integer(0) for x in e.elements()]
    if len(set(values)) != len(values):
        e.fail("repeats a column")


def _grid(e) -> None:
    for x in e.elements(2, what="[query blocks, key blocks]"):
        x.integer(1)


def _extent(e) -> None:
    """window_3d: [a_t, a_h, a_w], tokens each way in time, height and width (≥ 0)."""
    for x in e.elements(3, what="[a_t, a_h, a_w]"):
        x.integer(0)


def _token_grid(e) -> None:
    """window_3d: [T, H, W], the token grid the window is laid out on (frame-major tokens)."""
    for x in e.elements(3, what="[T, H, W] tokens"):
        x.integer(1)


# pattern → {parameter: check}: exactly the parameters each family has (`attention_layouts.bands` reads them;
# an extra one would be ignored, or change the family: `sinks` on a `local` head makes it `sink_local`)
PARAMS = {
    "dense": {},
    "local": {"window": _positive},
    "sink_local": {"sinks": _positive, "window": _positive},
    "multi_diagonal": {"diagonals": _diagonals},
    "vertical_slash": {"columns": _columns, "diagonals": _diagonals},
    "block_topk": {"shape": _grid, "blocks": lambda e: e.elements()},
    "dynamic_topk": {"k": _positive},
    "skip": {"mean": lambda e: e.numbers()},
    "window_3d": {"extent": _extent, "grid": _token_grid},
}
# ``pyramid``: its near part's family (``near``, one of `attention_layouts.PYRAMID_NEAR`) and that family's
# parameters (`pattern_params`)


def pattern_params(pattern: str, params: Entry) -> dict:
    """{parameter: check} of one head's `pattern`: `PARAMS`', or a pyramid's near family's and ``near``."""
    if pattern != "pyramid":
        return PARAMS[pattern]
    params.mapping(required=("near",), extra=True)
    return {"near": lambda e: e.text(PYRAMID_NEAR), **PARAMS[params["near"].text(PYRAMID_NEAR)]}


def check_head(head: Entry, width: int | None) -> None:
    """One head (an `Entry`: a decision's, or head_patterns' facts): a known pattern with exactly its
    parameters, listing blocks; `width` is the site's output channels per head (a ``skip`` head's mean;
    None: any)."""
    head.mapping(required=("pattern", "params"), extra=True)
    pattern = head["pattern"].text([*PARAMS, "pyramid"])
    params = head["params"]
    checks = pattern_params(pattern, params)
    params.mapping(required=checks)
    for name, check in checks.items():
        check(params[name])
    if pattern == "skip":
        params["mean"].numbers(width, what="one per output channel of the head")
    if pattern == "block_topk":
        nq0, nk0 = params["shape"].value
        rows = params["blocks"].elements(nq0, what="one list of key blocks per query block of 'shape'")
        for row in rows:
            row.indices(nk0, what="key block")
        if not any(row.value for row in rows):
            params["blocks"].fail("lists no block: the head would output zeros (use 'skip' to replace a head "
                                  "by its mean)")
    if pattern in ("multi_diagonal", "vertical_slash") and not any(params[k].value for k in PARAMS[pattern]):
        params.fail("lists no diagonal or column: the head would output zeros (use 'skip' to replace a head "
                    "by its mean)")


@dataclass(frozen=True)
class HeadChoice:
    """One head's pattern (``head_patterns``): family, its parameters, the recall and block density it
    reached on calibration, the blocks it lists and the head's share of the site's output variation; a
    pyramid's output error and the bound it met."""

    pattern: str
    params: dict
    recall: float
    density: float
    blocks: int | None = None
    output_share: float | None = None
    error: float | None = None  # pyramid: relative output error on calibration, and the bound it met
    error_bound: float | None = None

    def to_json(self) -> dict:
        out = {"pattern": self.pattern, "params": self.params, "recall": self.recall, "density": self.density}
        for key in ("blocks", "output_share", "error", "error_bound"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @classmethod
    def from_json(cls, e: Entry) -> HeadChoice:
        e.mapping(required=("pattern", "params", "recall", "density"), extra=True)
        check_head(e, None)
        return cls(pattern=e["pattern"].text(), params=e["params"].mapping(extra=True),
                   recall=e["recall"].number(0.0, 1.0), density=e["density"].number(0.0, 1.0),
                   blocks=e["blocks"].integer(0) if "blocks" in e else None,
                   output_share=e["output_share"].number(0.0, 1.0) if "output_share" in e else None,
                   error=e["error"].number(0.0) if "error" in e else None,
                   error_bound=e["error_bound"].number(0.0) if "error_bound" in e else None)


@dataclass(frozen=True)
class SitePatterns:
    """``head_patterns``' facts at one attention site: the block size and calibration length they were
    fitted at, causality, the recall target, a `HeadChoice` per query head, the heads grouped by
    identical pattern and parameters, and the mean block density; for a video site its token grid, and
    the grid the densities were counted at where that is another (``target_grid``)."""

    block: int
    seq_len: int
    causal: bool
    recall_target: float
    heads: list[HeadChoice]
    groups: list[dict]
    density: float
    grid: list[int] | None = None  # the (T, H, W) token grid of a video site, where it was found
    cost_grid: list[int] | None = None  # the token grid densities are counted at (None: calibration's)

    def to_json(self) -> dict:
        out = {"block": self.block, "seq_len": self.seq_len, "causal": self.causal,
               "recall_target": self.recall_target, "heads": [h.to_json() for h in self.heads],
               "groups": self.groups, "density": self.density}
        for key in ("grid", "cost_grid"):
            if getattr(self, key) is not None:
                out[key] = list(getattr(self, key))
        return out

    @classmethod
    def from_json(cls, e: Entry, heads: int | None = None) -> SitePatterns:
        """Checked (each head's pattern and parameters, `check_head`) and, given, for `heads` query heads."""
        e.mapping(required=("block", "seq_len", "causal", "heads", "density"), extra=True)
        return cls(block=e["block"].integer(1), seq_len=e["seq_len"].integer(1), causal=e["causal"].flag(),
                   recall_target=e["recall_target"].number(0.0, 1.0) if "recall_target" in e else 0.0,
                   heads=[HeadChoice.from_json(h)
                          for h in e["heads"].elements(heads, what="one per query head of the site")],
                   groups=[g.mapping(extra=True) for g in e["groups"].elements()] if "groups" in e else [],
                   density=e["density"].number(0.0, 1.0),
                   grid=_grid(e, "grid"), cost_grid=_grid(e, "cost_grid"))


def _grid(e: Entry, key: str) -> list[int] | None:
    return ([x.integer(1) for x in e[key].elements(3, what="[T, H, W] tokens")]
            if key in e and e[key].value is not None else None)


# --------------------------------------------------------------------------------------- token_importance


def mass_table(e: Entry) -> dict[str, float]:
    """{keep ratio (as written): share of the importance mass the top ratio of tokens holds}."""
    table = {}
    for keep in e.mapping(extra=True):
        _fraction_key(e[keep], keep, "keep ratio", low_open=True)
        table[keep] = e[keep].number(0.0, 1.0)
    return table


@dataclass(frozen=True)
class TokenImportance:
    """``token_importance``'s facts at one attention site: the score mode, the sequences measured, the
    mass each keep ratio retains, and (sequences of one length) the mean score per position."""

    score: str
    sequences: int
    mass_kept: dict[str, float]
    position_mean: list[float] | None = None

    def to_json(self) -> dict:
        out = {"score": self.score, "sequences": self.sequences, "mass_kept": self.mass_kept}
        if self.position_mean is not None:
            out["position_mean"] = self.position_mean
        return out

    @classmethod
    def from_json(cls, e: Entry, modes) -> TokenImportance:
        e.mapping(required=("score", "sequences", "mass_kept"), extra=True)
        return cls(score=e["score"].text(modes), sequences=e["sequences"].integer(0),
                   mass_kept=mass_table(e["mass_kept"]),
                   position_mean=e["position_mean"].numbers() if "position_mean" in e else None)


# -------------------------------------------------------------------------------------------------- roi


@dataclass(frozen=True)
class RoiSettings:
    """``roi``'s settings at the attention site it reads (what `rois` replays): the layers averaged, the
    patch grid (``grid`` cells a side after ``protect`` leading tokens) over an ``image``-pixel input
    (``patch`` pixels a cell), the threshold and box count; and from calibration the boxes of the first
    images and the mean box area."""

    site: str
    layers: list[str]
    layer: int
    grid: int
    image: int
    patch: float
    threshold: float
    max_boxes: int
    protect: int
    samples: list = field(default_factory=list)
    mean_box_area: float = 0.0

    def to_json(self) -> dict:
        return {"site": self.site, "layers": self.layers, "layer": self.layer, "grid": self.grid,
                "image": self.image, "patch": self.patch, "threshold": self.threshold,
                "max_boxes": self.max_boxes, "protect": self.protect, "samples": self.samples,
                "mean_box_area": self.mean_box_area}

    @classmethod
    def from_json(cls, e: Entry) -> RoiSettings:
        e.mapping(required=("site", "layers", "layer", "grid", "image", "patch", "threshold", "max_boxes",
                            "protect"), extra=True)
        patch = e["patch"].number(0.0)
        if patch == 0.0:
            e["patch"].fail("is 0: a grid cell covers some pixels")
        return cls(site=e["site"].text(), layers=[x.text() for x in e["layers"].elements(min_length=1)],
                   layer=e["layer"].integer(0), grid=e["grid"].integer(1), image=e["image"].integer(1),
                   patch=patch, threshold=e["threshold"].number(0.0, 1.0),
                   max_boxes=e["max_boxes"].integer(1), protect=e["protect"].integer(0),
                   samples=[s.value for s in e["samples"].elements()] if "samples" in e else [],
                   mean_box_area=e["mean_box_area"].number(0.0) if "mean_box_area" in e else 0.0)


# ------------------------------------------------------------------------------------------- conv_profile


@dataclass(frozen=True)
class ConvInput:
    """``conv_profile``'s facts at one pointwise conv site: how many pixels (images × H × W) it saw, and per
    input channel c the mean of the input over all of them and its root mean square, rms_c = ‖x_c‖ /
    √pixels (the channel norm that the activation-aware score |W_oc| · ‖x_c‖ weighs each weight with; the
    mean is what the pruned weights would have added on average)."""

    pixels: int
    mean: list[float]
    rms: list[float]

    def to_json(self) -> dict:
        return {"pixels": self.pixels, "mean": self.mean, "rms": self.rms}

    @classmethod
    def from_json(cls, e: Entry, width: int | None) -> ConvInput:
        """Checked for a conv of `width` input channels (None: as many as `rms` lists)."""
        e.mapping(required=("pixels", "mean", "rms"), extra=True)
        rms = e["rms"].numbers(width, lo=0.0, what="one per input channel")
        return cls(pixels=e["pixels"].integer(1),
                   mean=e["mean"].numbers(len(rms), what="one per input channel"), rms=rms)


@dataclass(frozen=True)
class LinearInputs:
    """``linear_profile``'s facts at one site: per linear layer (by module path) how many rows its input had
    on calibration data (real tokens: padding left out) and per input feature j its root mean square,
    rms_j = ‖x_j‖ / √rows, the feature norm the activation-aware score |W_ij| · ‖x_j‖ weighs a weight
    with (Wanda, Sun et al. 2023)."""

    layers: dict[str, tuple[int, list[float]]]

    def to_json(self) -> dict:
        return {path: {"rows": rows, "rms": rms} for path, (rows, rms) in self.layers.items()}

    @classmethod
    def from_json(cls, e: Entry, widths: dict[str, int] | None = None) -> LinearInputs:
        """Checked against `widths` (module path → input features) where given: no other layer, and one
        rms per input feature."""
        e.mapping(optional=widths or (), extra=widths is None)
        layers = {}
        for path, layer in e.items():
            layer.mapping(required=("rows", "rms"), extra=True)
            width = None if widths is None else widths[path]
            layers[path] = (layer["rows"].integer(1), layer["rms"].numbers(width, lo=0.0,
                                                                           what="one per input feature"))
        return cls(layers)
