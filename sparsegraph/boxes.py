"""Regions of interest on a patch grid: boxes around the connected cells that hold a map's mass.

`normalised` turns per-token scores into a patch map summing to 1 per input; `boxes_from_map` thresholds
a [side, side] map at a fraction of its maximum, joins the cells that touch (8-neighbourhood, networkx
connected components) and returns each region's bounding box in input pixels with the share of the map's
mass it holds, best first. The ``roi`` pass and the ``roi_scores`` op both read regions this way.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch


@dataclass(frozen=True)
class Box:
    x0: int
    y0: int
    x1: int
    y1: int
    score: float

    def to_json(self) -> dict:
        return {"box": [self.x0, self.y0, self.x1, self.y1], "score": round(self.score, 4)}

    def iou(self, other: tuple[int, int, int, int]) -> float:
        ox0, oy0, ox1, oy1 = other
        w = max(0, min(self.x1, ox1) - max(self.x0, ox0))
        h = max(0, min(self.y1, oy1) - max(self.y0, oy0))
        inter = w * h
        union = (self.x1 - self.x0) * (self.y1 - self.y0) + (ox1 - ox0) * (oy1 - oy0) - inter
        return inter / union if union > 0 else 0.0


def boxes_from_map(m: torch.Tensor, threshold: float, patch: float, max_boxes: int) -> list[Box]:
    """Boxes (input pixels) of the connected regions of grid map `m` [side, side] at ≥ threshold · max."""
    m = m.float().clamp_min(0)
    total = float(m.sum())
    if total <= 0:
        return []
    on = (m >= threshold * m.max()).nonzero().tolist()
    grid = nx.Graph()
    grid.add_nodes_from(map(tuple, on))
    cells = set(grid.nodes)
    for r, c in cells:
        for dr, dc in ((0, 1), (1, -1), (1, 0), (1, 1)):
            if (r + dr, c + dc) in cells:
                grid.add_edge((r, c), (r + dr, c + dc))
    found = []
    for component in nx.connected_components(grid):
        rows, cols = [r for r, _ in component], [c for _, c in component]
        score = min(1.0, sum(float(m[r, c]) for r, c in component) / total)
        found.append(Box(round(min(cols) * patch), round(min(rows) * patch), round((max(cols) + 1) * patch),
                         round((max(rows) + 1) * patch), score))
    return sorted(found, key=lambda b: -b.score)[:max_boxes]


def normalised(scores: torch.Tensor, protect: int) -> torch.Tensor:
    """[B, n] patch scores (after `protect` tokens), each row scaled to sum 1 (padding / −inf → 0)."""
    patches = scores[:, protect:].float()
    patches = torch.where(torch.isfinite(patches), patches, torch.zeros_like(patches))
    return patches / patches.sum(1, keepdim=True).clamp_min(1e-12)
