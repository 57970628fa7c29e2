"""``sparsegraph::sparse_conv1x1``: a 1x1 convolution whose weight is sparse, computed from the kept weights.

A 1x1 convolution of an NCHW image is one matrix product per image, ``y[n] = W · x[n]`` with W [O, C] and
x[n] [C, H·W]. With most of W zero (``conv_sparsity`` prunes it), only the kept weights need to be
multiplied:

    y[n, o, p] = clamp(b_o + Σ_{c kept in row o} W[o, c] · x[n, c, p], lo, hi)

where ``lo``/``hi`` (either may be None: unbounded) are the ReLU / ReLU6 / hardtanh the pass folds in,
and b, W have the eval-mode batch norm that follows folded in: ``W' = W·s``, ``b' = β + (b − μ)·s``
with ``s = γ/√(σ²+ε)`` per output channel.

The op takes the weight twice, in two forms the pass makes together from one mask:

- ``weight`` [O, C, 1, 1]: dense, pruned (zeros where dropped). The reference, the dense form and the ONNX
  translation read it: a plain ``conv2d``;
- ``values`` [nnzb, K], ``indices`` int32 [nnzb], ``indptr`` int32 [⌈O/K⌉ + 1]: the same weights as
  block-CSR over blocks of K consecutive output channels that share one input channel (K = 1: plain
  CSR, unstructured sparsity): block row b holds entries ``indptr[b] … indptr[b+1]``, each an input
  channel and its K weights ``W[b·K + r, c]`` (rows past O in the last block are zero). The CPU and
  Triton kernels read only these.

Why both: a dense conv needs the dense weight at its own speed (rebuilding it from the packed form on
every call costs a scatter per call, and ``speed_check`` puts the dense form back where sparsity does not
pay, where it must run at dense speed); the kernels must not touch the zeros. The compiled model holds
the pruned dense weight plus (1 + 1/K) × the kept share of it packed (1.2–1.4× the original weight at
80% sparsity); the original weight is no longer referenced.

Non-finite inputs: the kernels add only kept weights' products, so a NaN or inf in an input channel
reaches the outputs that read that channel; the dense forms (reference, dense form, ONNX) multiply the
zeros too and spread it to every output at its pixel (0·NaN is NaN). On finite inputs all agree.

Why blocks: a block of K output channels loads its input channel's pixels once for K outputs (K times
fewer loads per multiply-add), which is what makes 1×4 blocks faster than unstructured sparsity at the
same density (Elsen et al., "Fast Sparse ConvNets", 2020); they cost more fidelity.

Backends:

- reference: ``conv2d`` of the dense pruned weight, the bias, the clamp;
- CPU: the compiled kernel (``cpu_kernels/sparse_conv1x1.cpp``: output-channel-major, a tile of pixels
  in vector registers per block of K outputs, AVX-512 / AVX2 intrinsics or a portable loop, OpenMP over
  pixel tiles and output blocks) for fp32; the reference elsewhere (other dtypes, no library,
  ``SPARSEGRAPH_NATIVE=0``), which is correct at dense speed. Measured (``python -m bench conv``,
  ``bench/results/conv-cpu.md``; 2-core Xeon, 2 threads, load average 0.9–1.2): EfficientNet-Lite0's
  31 rewritten 1x1 layers at 224×224, summed, at 70 / 80 / 90% sparsity: 2.1 / 2.5 / 3.2x over
  ``F.conv2d`` (oneDNN) through the op (3.15–3.18x at 90% over three runs), 2.6 / 3.5 / 4.7x the
  kernel alone (the op's dispatch costs 15–25 µs a call, more when the call before evicted the
  caches); 1×4 blocks at 90%: 3.1x / 5.0x. On one thread ``F.conv2d`` takes torch's GEMM path and is
  faster than oneDNN on two for these small convs: over the faster of the two, 1.3 / 1.5 / 1.9x. Small
  images gain least (192→1152 at 7×7: about 2x at 90%);
- Triton (`triton_kernels/sparse_conv1x1.py`): the same block-CSR walk, one program per (image, block of
  K outputs, tile of pixels);
- ONNX: ``Conv`` with the dense pruned weight, then ``Clip``: correct, at dense speed (onnxruntime has no
  sparse convolution; it densifies sparse initializers);
- dense form: the reference (a dense conv of the pruned weight); cost: MACs of the kept weights only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from onnxscript import opset18 as op

from sparsegraph import ir
from sparsegraph.codegen import cpu_kernels
from sparsegraph.codegen.op import SparseOp

BLOCKS = (1, 2, 4, 8)  # output channels per block the kernels take (powers of two: Triton tiles)


def pack(weight: torch.Tensor, kept: torch.Tensor,
         block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(values, indices, indptr)``: the block-CSR form of `weight` [O, C] at the kept blocks `kept`
    (bool [⌈O/block⌉, C]: block row b keeps input channel c), input channels ascending in each row."""
    out_channels, in_channels = weight.shape
    rows = -(-out_channels // block)
    padded = torch.zeros(rows * block, in_channels, dtype=weight.dtype)
    padded[:out_channels] = weight
    blocks = padded.view(rows, block, in_channels).transpose(1, 2)  # [rows, C, block]
    row, col = kept.nonzero(as_tuple=True)  # row-major: each row's channels ascending
    counts = torch.bincount(row, minlength=rows)
    indptr = torch.zeros(rows + 1, dtype=torch.int32)
    indptr[1:] = counts.cumsum(0)
    return blocks[row, col].contiguous(), col.to(torch.int32), indptr


def unpack(values: torch.Tensor, indices: torch.Tensor, indptr: torch.Tensor, out_channels: int,
           in_channels: int) -> torch.Tensor:
    """The dense [O, C] weight of a block-CSR form (zeros where nothing is kept)."""
    block = values.shape[1]
    rows = indptr.numel() - 1
    row = torch.repeat_interleave(torch.arange(rows), (indptr[1:] - indptr[:-1]).long())
    dense = torch.zeros(rows, in_channels, block, dtype=values.dtype)
    dense[row, indices.long()] = values
    return dense.transpose(1, 2).reshape(rows * block, in_channels)[:out_channels]


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, values: torch.Tensor,
              indices: torch.Tensor, indptr: torch.Tensor, lo: float | None,
              hi: float | None) -> torch.Tensor:
    y = F.conv2d(x, weight, bias)
    return y if lo is None and hi is None else y.clamp(lo, hi)


def cpu(x, weight, bias, values, indices, indptr, lo, hi):
    """The compiled kernel where it takes the call (fp32 on the CPU, library built), else the reference."""
    y = cpu_kernels.sparse_conv1x1(x, values, indices, indptr, bias, weight.shape[0], lo, hi)
    return y if y is not None else reference(x, weight, bias, values, indices, indptr, lo, hi)


def fake(x, weight, bias, values, indices, indptr, lo, hi):
    return x.new_empty(x.shape[0], weight.shape[0], x.shape[2], x.shape[3])


def onnx(x, weight, bias, values, indices, indptr, lo: float | None, hi: float | None):
    """Dense ``Conv`` of the pruned weight (and ``Clip``): the same result at dense speed."""
    y = op.Conv(x, weight) if bias is None else op.Conv(x, weight, bias)
    if lo is None and hi is None:
        return y
    low = op.CastLike(op.Constant(value_float=-math.inf if lo is None else lo), y)
    high = op.CastLike(op.Constant(value_float=math.inf if hi is None else hi), y)
    return op.Clip(y, low, high)


def cost(node: torch.fx.Node) -> tuple[int, int]:
    """MACs of the kept weights (each kept block: K weights × every pixel of every image); bytes of x,
    y and the packed weight (the dense pruned weight is not read)."""
    x, values, indices, indptr = (ir.val(a) for a in (node.args[0], node.args[3], node.args[4], node.args[5]))
    out = ir.val(node)
    images_pixels = x.shape[0] * x.shape[2] * x.shape[3]
    macs = images_pixels * values.numel()
    moved = sum(t.numel() * t.element_size() for t in (x, out, values, indices, indptr))
    return macs, moved


OP = SparseOp("sparse_conv1x1", reference, fake=fake, cpu=cpu, onnx=onnx, cost=cost, dense=reference,
              triton="sparsegraph.codegen.triton_kernels.sparse_conv1x1:sparse_conv1x1")
