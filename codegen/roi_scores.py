"""``sparsegraph::roi_scores``: token scores restricted to the regions of interest of each image.

Inputs: ``scores``, a list of [B, N] class-token attention scores (from `token_scores`, one per layer
the RoI map averages), the patch grid side ``grid`` (N = protect + grid²), ``protect`` leading tokens,
and the RoI settings ``threshold`` and ``max_boxes`` (see ``passes/analysis/roi.py``). Per image the
map m = mean over the list of the patch scores normalised to sum 1 is laid on the grid, the boxes are
found (cells ≥ threshold · max, 8-connected components, the ``max_boxes`` with the largest attention
share), and

    out[b, j] = 1           if token j is protected
              = m[b, j]     if its patch lies inside one of the boxes
              = −inf        otherwise

so ``token_select`` with ``keep = 0`` (every finite score) keeps exactly the RoI tokens. The boxes are
a graph algorithm per image (networkx), so this op has a CPU path only and no ONNX translation:
RoI-only pruning is for eager PyTorch; ONNX export of such a model fails with a message naming this op.
"""

from __future__ import annotations

import torch

from sparsegraph.boxes import boxes_from_map, normalised
from sparsegraph.codegen.op import SparseOp


def reference(scores: list[torch.Tensor], grid: int, protect: int, threshold: float,
              max_boxes: int) -> torch.Tensor:
    batch, tokens = scores[0].shape
    if tokens != protect + grid * grid:
        raise ValueError(f"roi_scores: {tokens} tokens are not {protect} + {grid}² patches")
    m = sum(normalised(s, protect) for s in scores) / len(scores)  # [B, grid²]
    inside = torch.zeros(batch, grid, grid, dtype=torch.bool)
    for b, grid_map in enumerate(m.reshape(-1, grid, grid)):
        for box in boxes_from_map(grid_map, threshold, 1.0, max_boxes):
            inside[b, box.y0:box.y1, box.x0:box.x1] = True
    patches = m.masked_fill(~inside.flatten(1).to(m.device), float("-inf"))
    return torch.cat([m.new_ones(batch, protect), patches], 1)


def fake(scores, grid, protect, threshold, max_boxes):
    return scores[0].new_empty(scores[0].shape, dtype=torch.float32)


OP = SparseOp("roi_scores", reference, fake=fake)
