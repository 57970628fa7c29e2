"""``roi``: regions of interest in an image from a middle layer's class-token attention (SD-RPN style).

A ViT's class token attends to the patches that carry the object well before the last layer. The
per-patch importance map is the class-token attention averaged over heads (``token_scores`` mode
``cls``), laid out on the patch grid (``side × side``, the tokens after the ``protect`` leading ones),
at attention site ``layer`` (default: the middle one) or, with ``accumulate`` (default), averaged over
layers 0 … ``layer`` after normalising each layer's map to sum 1 (a cheap attention rollout: one
layer's class token looks at a few decisive patches, the layers together cover the object). Then

    cells      = { (r, c) : m[r, c] ≥ threshold · max m }
    components = 8-connected components of `cells` (networkx)
    box        = (c_min · patch, r_min · patch, (c_max + 1) · patch, (r_max + 1) · patch)   in input pixels
    score      = Σ_{cells in the component} m / Σ m                                      (share of attention)

and the ``max_boxes`` components with the highest score are kept. ``patch`` (pixels per grid cell) is
read from the image input's size / grid side. Boxes are patch-aligned: a box cannot be finer than
the patch grid.

On calibration images the pass records the settings (what `rois` replays on a compiled model's new
inputs), the boxes of the first ``samples`` images, and the mean box area; the report draws the boxes
`rois` finds on the example images. `detect` is the same computation for any input batch of a graph.
Settings a plan supplies instead of calibration are checked against the graph (sites at or before the
read layer, a grid that is the token count there).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from sparsegraph import attention_scores, facts, ir, svg
from sparsegraph.boxes import Box, boxes_from_map, normalised
from sparsegraph.observe import Observer
from sparsegraph.pass_contract import AnalysisPass, Entry, Refused, option
from sparsegraph.registry import register_pass
from sparsegraph.sections import Section


@register_pass("roi")
@dataclass(frozen=True)
class RegionsOfInterest(AnalysisPass):
    """Boxes around what the class token attends to at a middle layer (see the module docstring)."""

    needs_calibration = True

    layer: int = option(-1, "attention-site layer whose class-token attention is read (−1: the middle one)",
                        range=(-1, None))
    threshold: float = option(0.2, "grid cells at or above this fraction of the map's maximum are in",
                              range=(0.0, 1.0))
    accumulate: bool = option(True, "average the (normalised) class-token maps of layers 0 … layer, not "
                              "that layer alone")
    max_boxes: int = option(1, "boxes kept per image, by attention share", range=(1, None))
    protect: int = option(1, "leading (class) tokens before the patch tokens", range=(0, None))
    samples: int = option(8, "calibration images whose boxes are written to the plan", range=(0, None))

    @classmethod
    def report_section(cls, plan, model=None):
        """The example images with the boxes `rois` finds on them (a compiled model's report only)."""
        return Section(figures=_figures(model)) if model is not None and plan.summary("roi") else None

    def analyze(self, gm, ctx, stats):
        stats.matched = len(ir.attention_sites(gm))
        try:
            settings = self.settings(gm, ctx.example.args)
        except Refused as refused:
            stats.refuse("roi", str(refused))
            return
        samples, areas = [], []
        for batch in ctx.progress(ctx.calibration, "roi"):
            for boxes in detect(gm, batch.args, batch.kwargs, settings):
                if len(samples) < self.samples:
                    samples.append([b.to_json() for b in boxes])
                areas.extend((b.x1 - b.x0) * (b.y1 - b.y0) / settings.image ** 2 for b in boxes)
        settings = dataclasses.replace(settings, samples=samples,
                                       mean_box_area=sum(areas) / max(len(areas), 1))
        ctx.plan.set_evidence(self.name, settings.site, settings.to_json())
        ctx.plan.set_summary(self.name, {"site": settings.site, "boxes": len(areas)})
        stats.counters.update(boxes=len(areas))

    def settings(self, gm, example_args) -> facts.RoiSettings:
        """What `detect` needs (`Refused`: the reason the model has no RoI to offer)."""
        sites = ir.attention_sites(gm)
        image = next((x for x in example_args if isinstance(x, torch.Tensor) and x.dim() == 4), None)
        if not sites or image is None:
            raise Refused("needs a vision transformer: an image input [B, C, H, W] and attention sites")
        layer = self.layer if self.layer >= 0 else len(sites) // 2
        site = next((s for s in sites if s.layer == layer), None)
        if site is None:
            raise Refused(f"no attention site at layer {layer} (the model has {len(sites)})")
        tokens = ir.shape(site.q)[2]
        side = math.isqrt(tokens - self.protect)
        if side * side != tokens - self.protect or image.shape[-1] != image.shape[-2]:
            raise Refused(f"{tokens} tokens minus {self.protect} protected are not a square patch grid of a "
                          "square image")
        layers = [s.id for s in sites if s.layer <= layer] if self.accumulate else [site.id]
        return facts.RoiSettings(site=site.id, layers=layers, layer=layer, grid=side,
                                 image=int(image.shape[-1]), patch=image.shape[-1] / side,
                                 threshold=self.threshold, max_boxes=self.max_boxes, protect=self.protect)


    def check_facts(self, gm, plan):
        super().check_facts(gm, plan)
        summary = plan.summary(self.name)
        if summary is not None and plan.evidence(self.name, summary["site"]) is None:
            Entry.in_plan(plan.passes, (self.name, "summary", "site"), "restore the facts 'roi' wrote, or "
                          "profile again (compile with calibration data)", self.name, None,
                          root="passes").fail(
                f"names {summary['site']!r}, for which the plan holds no roi evidence (the settings to "
                "replay)")

    def check_summary(self, summary, gm):
        summary.mapping(required=("site", "boxes"), extra=True)
        summary["site"].text()
        summary["boxes"].integer(0)

    def check_evidence(self, site, evidence, gm):
        sites = {s.id: s for s in ir.attention_sites(gm)}
        if site not in sites:
            evidence.fail(f"names {site!r}, which is not an attention site of this graph")
        settings = facts.RoiSettings.from_json(evidence)
        if settings.site != site:
            evidence["site"].fail(f"must be the site it is filed under, {site!r}")
        if settings.layer != sites[site].layer:
            evidence["layer"].fail(f"must be the layer of {site!r}, {sites[site].layer}")
        for e in evidence["layers"].elements():
            if e.value not in sites or sites[e.value].layer > sites[site].layer:
                e.fail(f"must be an attention site at or before {site!r}")
        tokens = ir.shape(sites[site].q)[2]
        if settings.protect + settings.grid ** 2 != tokens:
            evidence["grid"].fail(f"{settings.protect} protected + {settings.grid}² patches are not the "
                                  f"{tokens} tokens at {site!r}")


def rois(cm, *args, **kwargs) -> list[list[Box]]:
    """Regions of interest for each input of a batch of a compiled model `cm` (the ``roi`` pass settings
    from its plan): lists of `Box` (pixel coordinates, attention share), best first."""
    summary = cm.plan.summary("roi")
    if summary is None:
        raise ValueError("this model was compiled without the 'roi' pass (or it found no RoI layer); "
                         "add {'roi': {}} to the config")
    return detect(cm.graph_module, args, kwargs,
                  facts.read(cm.plan, "roi", summary["site"], facts.RoiSettings))


def detect(gm, args: tuple, kwargs: dict, settings: facts.RoiSettings) -> list[list[Box]]:
    """Boxes for every input of a batch, per `settings` (from `RegionsOfInterest.settings` or a plan)."""
    return [boxes_from_map(m, settings.threshold, settings.patch, settings.max_boxes)
            for m in importance_maps(gm, args, kwargs, settings)]


def importance_maps(gm, args: tuple, kwargs: dict, settings: facts.RoiSettings) -> torch.Tensor:
    """[B, side, side] class-token attention maps (averaged over the settings' layers) that `detect` reads."""
    by_id = {s.id: s for s in ir.attention_sites(gm)}
    missing = [i for i in settings.layers if i not in by_id]
    if missing:
        raise ValueError(f"roi: attention sites {missing} are not in this graph (were they rewritten?)")
    observer = _Capture(gm, [by_id[i] for i in settings.layers])
    observer.run_batch(args, kwargs or {})
    side, p = settings.grid, settings.protect
    maps = []
    for scores in observer.scores.values():
        if scores.shape[1] != p + side * side:
            raise ValueError(f"roi: {scores.shape[1]} tokens where {p + side * side} were expected: tokens "
                             "were pruned before the RoI layers; read RoIs at or before the first pruned "
                             "block")
        maps.append(normalised(scores, p))
    return (sum(maps) / len(maps)).reshape(-1, side, side)


class _Capture(Observer):
    def __init__(self, gm, sites):
        super().__init__(gm)
        self.sites = {s.out: s for s in sites}
        self.scores: dict[str, torch.Tensor] = {}

    def run_node(self, n):
        result = super().run_node(n)
        if n in self.sites:
            self.scores[self.sites[n].id] = attention_scores.site_scores(self.sites[n], self.env.__getitem__,
                                                                         "cls", chunk=256)
        return result


def _figures(cm, limit: int = 4) -> list[tuple[str, str]]:
    """The example images (at most `limit`) with the RoI boxes `rois` finds on them."""
    images = next((x for x in cm.example.args if isinstance(x, torch.Tensor) and x.dim() == 4), None)
    if images is None:
        return []
    images = images[:limit]
    boxes = rois(cm, images, *cm.example.args[1:], **cm.example.kwargs)
    size = images.shape[-1]
    factor = max(1, size // 64)  # draw at most 64 × 64 cells per image
    gray = torch.nn.functional.avg_pool2d(images.float().mean(1, keepdim=True), factor)[:, 0]
    gray = (gray - gray.amin((1, 2), keepdim=True)) / (gray.amax((1, 2), keepdim=True)
                                                       - gray.amin((1, 2), keepdim=True)).clamp_min(1e-12)
    scale = 160 / gray.shape[-1]
    charts = [svg.image(f"image {i}", gray[i].tolist(),
                        [(b.x0 / factor, b.y0 / factor, b.x1 / factor, b.y1 / factor, f"{b.score:.2f}")
                         for b in bs],
                        scale) for i, bs in enumerate(boxes)]
    return [("Regions of interest on the example images (box: share of class-token attention)",
             "".join(charts))]
