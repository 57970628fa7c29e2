"""``sparsegraph::token_scores``: how much attention each token receives, from a layer's q and k.

Inputs: q [B, H, L, E], k [B, Hkv, S, E] (GQA: query head h reads kv head h // (H / Hkv)), an
optional *additive* mask broadcastable to [B, H, L, S] (padding keys at −inf or a large negative),
``scale`` (1/√E in SDPA) and ``mode``. With P = softmax(q kᵀ · scale + mask) per head,

    cls       s[b, j] = mean_h P[b, h, 0, j]               attention from the class token (ViT, BERT)
    received  s[b, j] = mean_h mean_{i real} P[b, h, i, j] mean attention received (no class token)
    last      s[b, j] = mean_h P[b, h, L−1, j]             the last query (decoders)

"Real" query rows are those whose own key is not masked (when L = S and a mask is given), so padding
rows do not vote. ``cls`` and ``last`` cost one query row per head (B·H·S·E MACs: nothing next to
the layer); ``received`` needs every row and streams over chunks of ``chunk`` query rows, so memory
stays O(chunk · S). Masked keys get −inf, so `token_select` never keeps padding over a real token.

Backends: reference (dense softmax over all rows); CPU (one row, or chunked rows); ONNX (``MatMul``,
``Softmax``, ``ReduceMean``; ``received`` materialises [B, H, L, S]: fine at encoder lengths).
"""

from __future__ import annotations

import torch
from onnxscript import opset18 as op

from sparsegraph import ir
from sparsegraph.codegen.block_sparse_attention import onnx_repeat_kv, repeat_kv
from sparsegraph.codegen.op import SparseOp

MODES = ("cls", "received", "last")
_MASKED = -1e4  # additive mask values at or below this mean "padding" (HF uses finfo.min; SDPA −inf)


def _key_mask(mask, B, S):
    """bool [B, S]: keys that are padding, read off the additive mask's first query row."""
    if mask is None:
        return None
    if mask.dim() != 4:
        raise ValueError(f"token_scores: the mask must be 4-D (broadcastable to [B, H, L, S]), got "
                         f"{tuple(mask.shape)}")
    return mask.expand(B, -1, -1, S)[:, 0, 0] <= _MASKED


def _probs(q, k, mask, scale):
    s = (q.float() @ repeat_kv(k, q.shape[1]).float().transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask.float()
    return s.softmax(-1)


def _rows(mode):
    return slice(0, 1) if mode == "cls" else slice(-1, None)


def _finish(scores, padding):
    return scores if padding is None else scores.masked_fill(padding, float("-inf"))


def _mask_rows(mask, rows):
    if mask is None or mask.dim() < 2 or mask.shape[-2] == 1:
        return mask
    return mask[..., rows, :]


def reference(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float, mode: str,
              chunk: int) -> torch.Tensor:
    if mode not in MODES:
        raise ValueError(f"token_scores: mode {mode!r} is not one of {MODES}")
    B, L, S = q.shape[0], q.shape[2], k.shape[2]
    padding = _key_mask(mask, B, S)
    p = _probs(q, k, mask, scale)  # [B, H, L, S]
    if mode != "received":
        return _finish(p[:, :, _rows(mode)].mean((1, 2)), padding)
    real = torch.ones(B, L, dtype=torch.bool) if padding is None or L != S else ~padding
    w = real.float()[:, None, :, None]
    return _finish((p * w).sum((1, 2)) / (w.sum((1, 2)) * q.shape[1]), padding)


def cpu(q, k, mask, scale, mode, chunk):
    if mode not in MODES:
        raise ValueError(f"token_scores: mode {mode!r} is not one of {MODES}")
    B, H, L = q.shape[:3]
    S = k.shape[2]
    padding = _key_mask(mask, B, S)
    if mode != "received":
        rows = _rows(mode)
        return _finish(_probs(q[:, :, rows], k, _mask_rows(mask, rows), scale).mean((1, 2)), padding)
    real = torch.ones(B, L, dtype=torch.bool) if padding is None or L != S else ~padding
    total = q.new_zeros(B, S, dtype=torch.float32)
    for start in range(0, L, chunk):
        rows = slice(start, min(start + chunk, L))
        p = _probs(q[:, :, rows], k, _mask_rows(mask, rows), scale)
        total += (p * real[:, None, rows, None]).sum((1, 2))
    return _finish(total / (real.sum(1, keepdim=True) * H), padding)


def fake(q, k, mask, scale, mode, chunk):
    return q.new_empty(q.shape[0], k.shape[2], dtype=torch.float32)


def onnx(q, k, mask, scale: float, mode: str, chunk: int):
    def ints(*xs):
        return op.Constant(value_ints=list(xs))

    q, k = op.Cast(q, to=1), op.Cast(onnx_repeat_kv(k, q), to=1)
    if mode == "cls":
        q = op.Slice(q, ints(0), ints(1), ints(2))
    elif mode == "last":
        q = op.Slice(q, ints(-1), ints(2**62), ints(2))
    s = op.Mul(op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2])), op.Constant(value_float=scale))
    if mask is not None:
        m = op.Cast(mask, to=1)
        if mode != "received":  # the mask row of the chosen query (a one-row mask is its own row)
            m = op.Slice(m, ints(0 if mode == "cls" else -1), ints(1 if mode == "cls" else 2**62), ints(-2))
        s = op.Add(s, m)
    p = op.Softmax(s, axis=-1)  # [B, H, l, S]
    B_S = op.Concat(op.Shape(q, start=0, end=1), op.Shape(k, start=2, end=3), axis=0)
    padding = None if mask is None else onnx_key_padding(mask, B_S)
    if mode != "received" or padding is None:
        scores = op.ReduceMean(p, ints(1, 2), keepdims=0)
    else:
        real = op.Cast(op.Not(padding), to=1)  # [B, S] = [B, L]: query i is real iff key i is
        w = op.Unsqueeze(real, ints(1, 3))
        heads = op.Cast(op.Shape(q, start=1, end=2), to=1)
        scores = op.Div(op.ReduceSum(op.Mul(p, w), ints(1, 2), keepdims=0),
                        op.Mul(op.ReduceSum(real, ints(1), keepdims=1), heads))
    if padding is not None:
        scores = op.Where(padding, op.Constant(value_float=float("-inf")), scores)
    return scores


def onnx_key_padding(mask, shape):
    """`_key_mask` in onnxscript: bool [B, S] (expanded to `shape`), the keys the additive mask's first
    head and query row mark as padding."""
    def ints(*xs):
        return op.Constant(value_ints=list(xs))

    first = op.Slice(op.Cast(mask, to=1), ints(0, 0), ints(1, 1), ints(1, 2))  # [b, 1, 1, S]
    padding = op.LessOrEqual(first, op.Constant(value_float=_MASKED))
    return op.Expand(op.Reshape(padding, op.Concat(op.Shape(first, start=0, end=1), ints(-1), axis=0)), shape)


def cost(node: torch.fx.Node) -> tuple[int, int]:
    """One query row per head (cls, last) or all of them (received), times S keys and E dims."""
    q, k, mode = ir.val(node.args[0]), ir.val(node.args[1]), node.args[4]
    B, H, L, E = q.shape
    rows = L if mode == "received" else 1
    return (B * H * rows * k.shape[2] * E,
            (q.numel() // (L // rows)) * q.element_size() + k.numel() * k.element_size())


OP = SparseOp("token_scores", reference, fake=fake, cpu=cpu, onnx=onnx, cost=cost)
