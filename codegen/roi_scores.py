"""``sparsegraph::roi_scores``: token scores restricted to the regions of interest of each image.

Inputs: ``scores`` [B, N] (class-token attention per token, from `token_scores`), the patch grid side
``grid`` (N = protect + grid²), ``protect`` leading tokens, and the RoI settings ``threshold`` and
``max_boxes`` (see ``passes/analysis/roi.py``). Per image the patch scores are laid on the grid, the
boxes are found (cells ≥ threshold · max, 8-connected components, the ``max_boxes`` with the largest
attention share), and

    out[b, j] = scores[b, j]   if token j is protected or its patch lies inside one of the boxes
              = −inf           otherwise

so ``token_select`` with ``keep = 0`` (every finite score) keeps exactly the RoI tokens. The boxes are
a graph algorithm per image (networkx), so this op has a CPU path only and no ONNX translation:
RoI-only pruning is for eager PyTorch; ONNX export of such a model fails with a message naming this op.
"""

from __future__ import annotations

import torch

from sparsegraph.codegen.op import SparseOp


def reference(scores: torch.Tensor, grid: int, protect: int, threshold: float, max_boxes: int) -> torch.Tensor:
    from sparsegraph.passes.analysis.roi import boxes_from_map

    if scores.shape[1] != protect + grid * grid:
        raise ValueError(f"roi_scores: {scores.shape[1]} tokens are not {protect} + {grid}² patches")
    inside = torch.zeros(scores.shape[0], grid, grid, dtype=torch.bool)
    maps = scores[:, protect:].reshape(-1, grid, grid)
    for b, m in enumerate(maps):
        for box in boxes_from_map(torch.where(torch.isfinite(m), m, 0.0), threshold, 1.0, max_boxes):
            inside[b, box.y0:box.y1, box.x0:box.x1] = True
    keep = torch.cat([torch.ones(scores.shape[0], protect, dtype=torch.bool), inside.flatten(1)], 1)
    return scores.masked_fill(~keep.to(scores.device), float("-inf"))


def fake(scores, grid, protect, threshold, max_boxes):
    return torch.empty_like(scores)


OP = SparseOp("roi_scores", reference, fake=fake)
