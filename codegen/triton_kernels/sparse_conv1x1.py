"""Triton kernel for ``sparsegraph::sparse_conv1x1``: a 1x1 convolution from the block-CSR weight.

One program per (image, block of K output channels, tile of BLOCK_P pixels): the K × BLOCK_P outputs
accumulate in fp32 registers while the program walks its block row's entries (an input channel and K
weights each), loading that channel's BLOCK_P pixels once per entry, contiguous, and adding the outer
product of the K weights with them. Only kept weights and the input rows they name are read; the dense
pruned weight is not. Then bias, clamp (NaN propagates, as through torch.clamp) and one masked store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _kernel(x_ptr, v_ptr, i_ptr, p_ptr, b_ptr, y_ptr, C, P, OUT, lo, hi,
            HAS_BIAS: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
            K: tl.constexpr, BLOCK_P: tl.constexpr):
    image = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    rp = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    rk = tl.arange(0, K)
    pixels = rp < P
    start = tl.load(p_ptr + block)
    end = tl.load(p_ptr + block + 1)
    x_image = x_ptr + image * C * P
    acc = tl.zeros((K, BLOCK_P), dtype=tl.float32)
    for j in range(start, end):
        channel = tl.load(i_ptr + j).to(tl.int64)
        row = tl.load(x_image + channel * P + rp, mask=pixels, other=0.0).to(tl.float32)
        weights = tl.load(v_ptr + j * K + rk).to(tl.float32)
        acc += weights[:, None] * row[None, :]
    ro = block * K + rk
    outputs = ro < OUT
    if HAS_BIAS:
        acc += tl.load(b_ptr + ro, mask=outputs, other=0.0).to(tl.float32)[:, None]
    if HAS_LO:
        acc = tl.maximum(acc, lo, propagate_nan=tl.PropagateNan.ALL)
    if HAS_HI:
        acc = tl.minimum(acc, hi, propagate_nan=tl.PropagateNan.ALL)
    tl.store(y_ptr + image * OUT * P + ro[:, None] * P + rp[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=outputs[:, None] & pixels[None, :])


def sparse_conv1x1(x, weight, bias, values, indices, indptr, lo, hi):
    x = x.contiguous()
    n, c, h, w = x.shape
    out_channels, block = weight.shape[0], values.shape[1]
    y = torch.empty(n, out_channels, h, w, device=x.device, dtype=x.dtype)
    pixels = h * w
    block_p = min(128, triton.next_power_of_2(max(pixels, 16)))
    grid = (n, indptr.numel() - 1, triton.cdiv(pixels, block_p))
    _kernel[grid](x, values.contiguous(), indices.contiguous(), indptr.contiguous(),
                  bias if bias is not None else values, y, c, pixels, out_channels,
                  0.0 if lo is None else float(lo), 0.0 if hi is None else float(hi),
                  HAS_BIAS=bias is not None, HAS_LO=lo is not None, HAS_HI=hi is not None,
                  K=block, BLOCK_P=block_p)
    return y
