"""``sparsegraph::nm_linear``: a linear layer whose weight is N:M structured sparse.

In every group of ``m`` consecutive input features, at most ``n`` weights of an output row are nonzero
(2:4 is what sparse tensor cores execute at twice the dense rate). The weight is stored compressed:

- ``values``  [out, in/m·n]: the kept weights, group by group, in input order;
- ``offsets`` [out, in/m·n] (uint8): each kept weight's position inside its group, in ``[0, m)``.

So kept entry ``j`` of row ``o`` sits at column ``(j // n)·m + offsets[o, j]`` and

    y = x Wᵀ + b,   W[o, (j // n)·m + offsets[o, j]] = values[o, j],   W zero elsewhere.

Backends: the reference builds W with one-hot masks; the CPU path scatters W and calls one GEMM (CPUs
have no N:M hardware, so this op saves weight memory there, not time); the Triton kernel decompresses
weight tiles in registers and feeds ``tl.dot``; ONNX scatters W with ``ScatterElements`` from the
constant values and offsets (folded once by the runtime) and multiplies.

Autograd (`backward`): the positions are fixed, so only the kept values learn. With the output gradient
``g`` and ``W`` unpacked:

    ∂x = g W      ∂values[o, j] = (gᵀ x)[o, (j // n)·m + offsets[o, j]]      ∂bias = Σ_rows g

(the gradient of the dense weight read at the kept positions; the pruned ones stay zero). A schedule that
moves positions during training (progressive N:M) would repack between steps; this op does not.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from onnxscript import opset18 as op

from sparsegraph import ir
from sparsegraph.codegen.op import SparseOp


def nm_pack(weight: torch.Tensor, n: int, m: int, scale=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the `n` best-scoring weights of every group of `m` inputs: ``(values, offsets)``, the mask
    `tighten` picks from every weight, packed (`pack_mask`). The score is |W_ij|, or |W_ij| · scale_j with
    a per-input `scale` (a tensor or list: an input feature's rms, Wanda's score), computed in fp64 so that
    the ranking is the same on any machine.

    Ties go to the lower position (stable sort), so packing is deterministic.
    """
    in_f = weight.shape[1]
    if in_f % m:
        raise ValueError(f"in_features {in_f} is not a multiple of m={m}")
    return _pack(weight, tighten(weight, torch.ones_like(weight, dtype=torch.bool), n, m, scale), n, m)


def positions_digest(offsets: torch.Tensor) -> str:
    """The sha256 of the kept positions (uint8 offsets) that the plan records as evidence."""
    return hashlib.sha256(offsets.contiguous().numpy().tobytes()).hexdigest()


def stages(n: int, m: int, ramp: float, steps: int) -> list[tuple[int, int]]:
    """The progressive schedule over `steps` training steps: ``(first step, kept per group)`` for each level
    n_k = m−1, …, n (module docstring), the first from step 0, the last at the latest on the last step.
    No dense level: distilled toward the dense model, the dense layer's loss and gradient are 0."""
    levels = list(range(m - 1, n - 1, -1))
    last = max(len(levels) - 1, 1)
    return [(min(round(k / last * ramp * steps), steps - 1), level) for k, level in enumerate(levels)]


def tighten(weight: torch.Tensor, mask: torch.Tensor, n: int, m: int, scale=None) -> torch.Tensor:
    """The mask keeping the `n` best-scoring weights of every group of `m` inputs among those `mask` keeps
    (bool, the shape of `weight`, at least `n` kept per group), scored as `nm_pack` scores them (|W|, or
    |W| · `scale` per input); ties go to the lower position, as `nm_pack`'s."""
    out_f, in_f = weight.shape
    score = weight.detach().abs().double()
    if scale is not None:
        score = score * torch.as_tensor(scale, dtype=torch.float64, device=score.device)
    score = score.masked_fill(~mask, -1.0).reshape(out_f, in_f // m, m)
    order = torch.sort(-score, dim=-1, stable=True).indices[..., :n]
    new = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, order, True)
    return new.reshape(out_f, in_f)


def pack_mask(weight: torch.Tensor, mask: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, offsets)`` as `nm_pack` gives them, of `weight` at `mask` (exactly `n` kept in every group
    of `m`): the kept positions are the mask's, whatever the values (a kept weight trained to 0 stays)."""
    out_f, in_f = weight.shape
    if not bool((mask.reshape(out_f, in_f // m, m).sum(-1) == n).all()):
        raise ValueError(f"the mask does not keep exactly {n} of every {m}")
    return _pack(weight, mask, n, m)


def _pack(weight: torch.Tensor, mask: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`pack_mask` without its check, for a mask `tighten` made (exactly `n` of every `m` by construction)."""
    out_f, in_f = weight.shape
    groups = mask.reshape(out_f, in_f // m, m)
    offsets = torch.sort((~groups).to(torch.int8), dim=-1, stable=True).indices[..., :n]
    values = torch.gather(weight.detach().reshape(out_f, in_f // m, m), -1, offsets)
    return values.reshape(out_f, -1).contiguous(), offsets.reshape(out_f, -1).to(torch.uint8).contiguous()


def nm_unpack(values: torch.Tensor, offsets: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The dense weight [out, in] (zeros where pruned), by scatter."""
    out_f, kept = values.shape
    dense = values.new_zeros(out_f, kept // n, m)
    dense.scatter_(-1, offsets.reshape(out_f, -1, n).long(), values.reshape(out_f, -1, n))
    return dense.reshape(out_f, -1)


def reference(x: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, bias: torch.Tensor | None,
              n: int, m: int) -> torch.Tensor:
    out_f, kept = values.shape
    one_hot = F.one_hot(offsets.long(), m).to(values.dtype)  # [out, kept, m]
    weight = (one_hot * values[..., None]).reshape(out_f, kept // n, n, m).sum(2).reshape(out_f, -1)
    return F.linear(x, weight, bias)


def cpu(x, values, offsets, bias, n, m):
    return F.linear(x, nm_unpack(values, offsets, n, m), bias)


def fake(x, values, offsets, bias, n, m):
    return x.new_empty(*x.shape[:-1], values.shape[0])


def onnx(x, values, offsets, bias, n: int, m: int):
    out_f = op.Shape(values, start=0, end=1)
    kept = op.Shape(values, start=1, end=2)
    position = op.Range(op.Constant(value_int=0), op.Squeeze(kept), op.Constant(value_int=1))
    column = op.Add(op.Mul(op.Div(position, op.Constant(value_int=n)), op.Constant(value_int=m)),
                    op.Cast(offsets, to=7))  # INT64
    in_f = op.Mul(op.Div(kept, op.Constant(value_ints=[n])), op.Constant(value_ints=[m]))
    zeros = op.ConstantOfShape(op.Concat(out_f, in_f, axis=0))
    weight = op.ScatterElements(zeros, column, values, axis=1)
    y = op.MatMul(x, op.Transpose(op.CastLike(weight, x), perm=[1, 0]))
    return y if bias is None else op.Add(y, bias)


def cost(node: torch.fx.Node) -> tuple[int, int]:
    """MACs the N:M hardware executes (n/m of dense) and bytes read and written."""
    x, values, offsets, bias = (ir.val(a) if isinstance(a, torch.fx.Node) else None for a in node.args[:4])
    out = ir.val(node)
    rows = math.prod(x.shape[:-1])
    macs = rows * values.shape[0] * values.shape[1]
    moved = sum(t.numel() * t.element_size() for t in (x, values, offsets, bias, out) if t is not None)
    return macs, moved


def setup_context(ctx, inputs, output):
    x, values, offsets, bias, n, m = inputs
    ctx.save_for_backward(x, values, offsets)
    ctx.n, ctx.m, ctx.has_bias = n, m, bias is not None


def backward(ctx, grad):
    """The gradients of the module docstring: the input's and the kept values' (offsets fixed)."""
    x, values, offsets = ctx.saved_tensors
    n, m = ctx.n, ctx.m
    out_f, kept = values.shape
    g = grad.reshape(-1, out_f)
    dx = d_values = d_bias = None
    if ctx.needs_input_grad[0]:
        dx = grad @ nm_unpack(values, offsets, n, m).to(grad.dtype)
    if ctx.needs_input_grad[1]:
        d_weight = (g.t() @ x.reshape(g.shape[0], -1).to(g.dtype)).reshape(out_f, kept // n, m)
        d_values = d_weight.gather(-1, offsets.reshape(out_f, -1, n).long()).reshape(out_f, kept)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        d_bias = g.sum(0)
    return dx, d_values, None, d_bias, None, None


OP = SparseOp("nm_linear", reference, fake=fake, cpu=cpu, onnx=onnx, cost=cost,
              triton="sparsegraph.codegen.triton_kernels.nm_linear:nm_linear",
              backward=backward, setup_context=setup_context)
