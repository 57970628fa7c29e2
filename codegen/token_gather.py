"""``sparsegraph::token_gather``: make a token-aligned tensor follow the tokens `token_select` kept.

Inputs: ``t`` any tensor whose batch axis is 0 (size B, or 1 to broadcast) and whose listed ``dims``
run over the old tokens (an attention mask [B, 1, 1, N] has dims (3,), a [B, 1, N, N] one (2, 3),
pooling weights [B, N, 1] (1,)); ``index`` int64 [B, k] from `token_select`. For every listed dim d,

    out[…, i_d, …] = t[…, index[b, i_d], …]

so the kept tokens' mask entries, pooling weights, … line up with the shortened stream. A size-1
batch axis is broadcast to B. Backends: reference (advanced indexing per batch row), CPU (one
``gather`` per dim on an expanded index), ONNX (``GatherElements``). It moves ``k/N`` of the tensor.
"""

from __future__ import annotations

import torch
from onnxscript import opset18 as op

from sparsegraph import ir
from sparsegraph.codegen.op import SparseOp


def _check(t, index, dims):
    if index.dim() != 2 or t.shape[0] not in (1, index.shape[0]):
        raise ValueError(f"token_gather: index {tuple(index.shape)} must be [B, k] and t {tuple(t.shape)} "
                         "must have batch B or 1")
    if not dims or any(not 0 < d < t.dim() for d in dims):
        raise ValueError(f"token_gather: dims {list(dims)} must be non-batch axes of a {t.dim()}-D tensor")


def reference(t: torch.Tensor, index: torch.Tensor, dims: list[int]) -> torch.Tensor:
    _check(t, index, dims)
    rows = []
    for b in range(index.shape[0]):
        row = t[min(b, t.shape[0] - 1)]
        for d in dims:
            row = row.index_select(d - 1, index[b])
        rows.append(row)
    return torch.stack(rows)


def cpu(t, index, dims):
    _check(t, index, dims)
    B, k = index.shape
    t = t.expand(B, *t.shape[1:])
    for d in dims:
        view = [1] * t.dim()
        view[0], view[d] = B, k
        sizes = list(t.shape)
        sizes[d] = k
        t = t.gather(d, index.view(view).expand(sizes))
    return t


def fake(t, index, dims):
    sizes = [index.shape[0], *t.shape[1:]]
    for d in dims:
        sizes[d] = index.shape[1]
    return t.new_empty(sizes)


def onnx(t, index, dims: list[int]):
    def ints(*xs):
        return op.Constant(value_ints=list(xs))

    rank = len(t.shape) if t.shape is not None else None
    batch = op.Shape(index, start=0, end=1)
    t = op.Expand(t, op.Concat(batch, op.Shape(t, start=1), axis=0))
    for d in dims:
        shape = [ints(1)] * rank
        shape[0], shape[d] = batch, op.Shape(index, start=1, end=2)
        sizes = [op.Shape(t, start=i, end=i + 1) for i in range(rank)]
        sizes[d] = op.Shape(index, start=1, end=2)
        idx = op.Expand(op.Reshape(index, op.Concat(*shape, axis=0)), op.Concat(*sizes, axis=0))
        t = op.GatherElements(t, idx, axis=d)
    return t


def cost(node: torch.fx.Node) -> tuple[int, int]:
    out = ir.val(node)
    return 0, 2 * out.numel() * out.element_size()


OP = SparseOp("token_gather", reference, fake=fake, cpu=cpu, onnx=onnx, cost=cost)
