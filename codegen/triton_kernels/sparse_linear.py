"""Triton kernel for ``sparsegraph::sparse_linear``: only the weight rows of active inputs are read.

Each program computes a [BLOCK_M, BLOCK_N] tile of y. Walking the input dimension in BLOCK_K steps,
it loads the inputs, centres and tests them against the row's threshold, and loads a weight row only
if some row of the tile keeps that input (a masked load issues no memory traffic for masked lanes):
at batch 1 and 50% sparsity half the weight bytes are never read, which is what bounds decoding.
``DOT`` picks ``tl.dot`` for batches (≥ 16 rows per tile) or a broadcast multiply-sum for decode.
Accumulation is fp32 whatever the input dtype (fp16, bf16, fp32).

Top-k is turned into a per-row threshold (the k-th largest |a|, compared with ≥) before the launch,
so one kernel serves both modes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _kernel(x_ptr, c_ptr, w_ptr, b_ptr, thr_ptr, y_ptr, M, K, N, stride_xm, stride_wk, stride_ym,
            HAS_CENTRE: tl.constexpr, HAS_BIAS: tl.constexpr, INCLUSIVE: tl.constexpr, DOT: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    thr = tl.load(thr_ptr + rm, mask=rm < M, other=float("inf"))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :],
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0).to(tl.float32)
        if HAS_CENTRE:
            a = a - tl.load(c_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)[None, :]
        if INCLUSIVE:
            keep = tl.abs(a) >= thr[:, None]
        else:
            keep = tl.abs(a) > thr[:, None]
        keep = (keep | (a != a)) & (rk[None, :] < K) & (rm[:, None] < M)  # NaN kept: it reaches the output
        a = tl.where(keep, a, 0.0)
        row_used = tl.max(keep.to(tl.int32), axis=0) > 0
        w = tl.load(w_ptr + rk[:, None] * stride_wk + rn[None, :],
                    mask=row_used[:, None] & (rn[None, :] < N), other=0.0).to(tl.float32)
        if DOT:
            acc += tl.dot(a, w, input_precision="ieee")
        else:
            acc += tl.sum(a[:, :, None] * w[None, :, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def sparse_linear(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None,
                  centre: torch.Tensor | None, threshold: float, k: int) -> torch.Tensor:
    in_f, out_f = weight_t.shape
    x2 = x.reshape(-1, in_f).contiguous()
    rows = x2.shape[0]
    if k > 0:
        a = x2.float() if centre is None else x2.float() - centre.float()
        thr = a.abs().topk(k, dim=-1).values[:, -1].contiguous()
    else:
        thr = torch.full((rows,), float(threshold), device=x.device, dtype=torch.float32)
    y = torch.empty(rows, out_f, device=x.device, dtype=x.dtype)
    dot = rows > 4
    block_m = 16 if dot else 1
    block_n, block_k = (64, 32) if dot else (128, 32)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(out_f, block_n))
    w = weight_t.contiguous()
    _kernel[grid](x2, centre if centre is not None else x2, w, bias if bias is not None else x2, thr, y,
                  rows, in_f, out_f, x2.stride(0), w.stride(0), y.stride(0),
                  HAS_CENTRE=centre is not None, HAS_BIAS=bias is not None, INCLUSIVE=k > 0, DOT=dot,
                  BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y.reshape(*x.shape[:-1], out_f)
