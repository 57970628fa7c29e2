"""Triton kernel for ``sparsegraph::nm_linear``: ``y = x Wᵀ + b`` with W stored N:M-compressed.

Each program computes a [BLOCK_M, BLOCK_N] tile of y. Along the input dimension it loads a [BLOCK_M,
BLOCK_K] tile of x and the matching [BLOCK_N, BLOCK_K·n/m] compressed weights and offsets, rebuilds the
dense [BLOCK_N, BLOCK_K] weight tile in registers (kept entry j lands on column (j // n)·m + offset_j;
the one-hot sum over j is a select, no memory traffic), and accumulates ``tl.dot`` in fp32. Only the
compressed weights are read from memory: n/m of the dense weight bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsegraph.codegen.nm_linear import cpu as _torch_path


@triton.jit
def _kernel(x_ptr, v_ptr, o_ptr, b_ptr, y_ptr, M, N, K, KC,
            stride_xm, stride_vn, stride_ym,
            HAS_BIAS: tl.constexpr, NN: tl.constexpr, MM: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    BLOCK_KC: tl.constexpr = BLOCK_K // MM * NN
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rc = tl.arange(0, BLOCK_KC)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kc0 = k0 // MM * NN
        x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :],
                    mask=(rm[:, None] < M) & ((k0 + rk)[None, :] < K), other=0.0)
        cmask = (rn[:, None] < N) & ((kc0 + rc)[None, :] < KC)
        v = tl.load(v_ptr + rn[:, None] * stride_vn + (kc0 + rc)[None, :], mask=cmask, other=0.0)
        off = tl.load(o_ptr + rn[:, None] * stride_vn + (kc0 + rc)[None, :], mask=cmask, other=0).to(tl.int32)
        col = (rc[None, :] // NN) * MM + off
        w = tl.sum(tl.where(col[:, :, None] == rk[None, None, :], v[:, :, None], 0.0), axis=1)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def nm_linear(x, values, offsets, bias, n, m):
    out_f, kept = values.shape
    in_f = kept // n * m
    if (n & (n - 1)) or (m & (m - 1)) or m > 32:  # tl.arange needs power-of-two tiles
        return _torch_path(x, values, offsets, bias, n, m)
    x2 = x.reshape(-1, in_f).contiguous()
    rows = x2.shape[0]
    y = torch.empty(rows, out_f, device=x.device, dtype=x.dtype)
    block_m, block_n, block_k = 16, 32, max(32, m)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(out_f, block_n))
    _kernel[grid](x2, values.contiguous(), offsets.contiguous(), bias if bias is not None else values, y,
                  rows, out_f, in_f, kept, x2.stride(0), kept, y.stride(0),
                  HAS_BIAS=bias is not None, NN=n, MM=m, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y.reshape(*x.shape[:-1], out_f)
