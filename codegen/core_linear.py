"""``sparsegraph::core_linear``: a linear layer that reads only each sequence's *core* inputs.

CoreMatching / PowerInfer observe that the neurons a sequence uses are largely fixed by its prompt:
the "core" neurons active on the first tokens stay the active ones for the tokens that follow. For
``x`` [batch, tokens, in] (2-D inputs are one sequence), centre ``c`` (or none) and ``a = x − c``:

    score[b, j] = Σ_{t < prefix} |a[b, t, j]|        (prefix ≤ 0: all tokens of the sequence)
    core[b]     = the k inputs j with the largest score[b, j]
    y[b, t]     = Σ_{j ∈ core[b]} a[b, t, j] · weight_t[j, :] + bias

Unlike `sparse_linear`, the kept set is chosen once per sequence, not per token, so the weight rows
of the core can be gathered once and reused by every token of the sequence (a dense GEMM on k/in of
the weight).

Backends: reference (mask + matmul); CPU (per sequence: gather the core rows once, one GEMM);
ONNX (``ReduceSum`` over the prefix, ``TopK``, a mask built with ``ScatterElements``, ``Where``,
``MatMul``). No Triton kernel yet: on CUDA the CPU path's gather + GEMM runs on the GPU.
"""

from __future__ import annotations

import math

import torch
from onnxscript import opset18 as op

from sparsegraph import ir
from sparsegraph.codegen.op import SparseOp


def _sequences(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() >= 3 else x[None]


def _core(a: torch.Tensor, k: int, prefix: int) -> torch.Tensor:
    """Indices [sequences, k] of each sequence's core inputs."""
    head = a[:, :prefix] if prefix > 0 else a
    return head.abs().sum(1).topk(k, dim=-1).indices


def reference(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, centre: torch.Tensor | None,
              k: int, prefix: int) -> torch.Tensor:
    a = _sequences(x if centre is None else x - centre)
    mask = torch.zeros(a.shape[0], a.shape[-1], dtype=torch.bool, device=x.device)
    mask.scatter_(1, _core(a, k, prefix), True)
    y = torch.where(mask[:, None, :], a, torch.zeros_like(a)) @ weight_t
    y = y if bias is None else y + bias
    return y.reshape(*x.shape[:-1], weight_t.shape[1])


def cpu(x, weight_t, bias, centre, k, prefix):
    a = _sequences(x if centre is None else x - centre)
    core = _core(a, k, prefix)
    y = torch.stack([a[s][:, core[s]] @ weight_t.index_select(0, core[s]) for s in range(a.shape[0])])
    y = y if bias is None else y + bias
    return y.reshape(*x.shape[:-1], weight_t.shape[1])


def dense(x, weight_t, bias, centre, k, prefix):
    """Nothing skipped: (x − c) Wᵀ + b, the original dense layer."""
    a = x if centre is None else x - centre
    y = torch.matmul(a, weight_t)
    return y if bias is None else y + bias


def fake(x, weight_t, bias, centre, k, prefix):
    return x.new_empty(*x.shape[:-1], weight_t.shape[1])


def onnx(x, weight_t, bias, centre, k: int, prefix: int):
    a = x if centre is None else op.Sub(x, centre)
    magnitude = op.Abs(a)
    if prefix > 0:
        magnitude = op.Slice(magnitude, op.Constant(value_ints=[0]), op.Constant(value_ints=[prefix]),
                             op.Constant(value_ints=[-2]))
    score = op.ReduceSum(magnitude, op.Constant(value_ints=[-2]), keepdims=1)  # [..., 1, in]
    _, core = op.TopK(score, op.Constant(value_ints=[k]), axis=-1, largest=1, sorted=1)
    zeros = op.CastLike(op.Mul(score, op.Constant(value_float=0.0)), a)
    ones = op.Add(op.Slice(zeros, op.Constant(value_ints=[0]), op.Constant(value_ints=[k]),
                           op.Constant(value_ints=[-1])), op.CastLike(op.Constant(value_float=1.0), a))
    mask = op.Cast(op.ScatterElements(zeros, core, ones, axis=-1), to=9)  # BOOL, [..., 1, in]
    y = op.MatMul(op.Where(mask, a, op.CastLike(op.Constant(value_float=0.0), a)), weight_t)
    return y if bias is None else op.Add(y, bias)


def cost(node: torch.fx.Node) -> tuple[int, int]:
    """k/in of the dense MACs; the core rows of the weight read once per sequence."""
    x, weight_t, k = ir.val(node.args[0]), ir.val(node.args[1]), node.args[4]
    out_f = weight_t.shape[1]
    rows = math.prod(x.shape[:-1])
    sequences = math.prod(x.shape[:-2]) if x.dim() >= 3 else 1
    out = ir.val(node)
    moved = (x.numel() * x.element_size() + out.numel() * out.element_size()
             + sequences * k * out_f * weight_t.element_size())
    return rows * k * out_f, moved


OP = SparseOp("core_linear", reference, fake=fake, cpu=cpu, onnx=onnx, cost=cost, dense=dense)
