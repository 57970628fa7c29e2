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
  ``SPARSEGRAPH_NATIVE=0``), which is correct at dense speed. Measured (``python -m bench conv``;
  2 threads): EfficientNet-Lite0's 31 rewritten 1x1 layers at 224×224, summed, at 70 / 80 / 90%
  sparsity, over ``F.conv2d`` (oneDNN), through the op / the kernel alone: on a 2-core Xeon with
  AVX-512 (the op then a ``custom_op``, under ``no_grad``) 2.1 / 2.5 / 3.2x and 2.6 / 3.5 / 4.7x (the
  dispatch cost 15–25 µs a call); on a 2-core AMD EPYC with AVX2 (``bench/results/conv-cpu.md``; ops
  defined with define + impl, under ``inference_mode``) 2.1 / 2.6 / 3.6x and 2.3 / 3.0 / 4.3x (about
  16 µs a call); 1×4 blocks at 90%: 3.1x / 5.0x and 4.1x / 5.2x. On one thread ``F.conv2d`` takes
  torch's GEMM path and is faster than oneDNN on two for these small convs: over the faster of the
  two, 1.3 / 1.5 / 1.9x (Xeon), 1.9 / 2.3 / 3.2x (EPYC). Small images gain least (192→1152 at 7×7:
  about 2x at 90%);
- Triton (`triton_kernels/sparse_conv1x1.py`): the same block-CSR walk, one program per (image, block of
  K outputs, tile of pixels);
- ONNX: ``Conv`` with the dense pruned weight, then ``Clip``: correct, at dense speed (onnxruntime has no
  sparse convolution; it densifies sparse initializers);
- dense form: the reference (a dense conv of the pruned weight); cost: MACs of the kept weights only.

Autograd (`backward`): the kept blocks are fixed, so what learns is ``values`` (and the bias); the dense
``weight`` is the mirror of ``values`` (``weight = unpack(values)``), not a second set of weights, and
gets no gradient of its own: its gradient is delivered to ``values``. Whoever changes ``values`` rewrites
the mirror from them (`sparsegraph.recover` does after every step; `unpack` is the map), or the forms
disagree. With the output gradient ``g`` masked where the clamp cut (``lo < y < hi``, strict, as
``hardtanh``'s backward), over images n and pixels p:

    ∂x[n, c, p] = Σ_o W[o, c] · g[n, o, p]        (a transposed 1x1 conv)
    ∂b_o        = Σ_{n,p} g[n, o, p]
    ∂values[e, r] = (Σ_{n,p} g[n, b·K + r, p] · x[n, c, p])   for entry e = (block row b, input channel c)

the gradient of the dense weight read at the kept blocks (rows past O in the last block: zero). The
dense weight gradient costs one dense ``O×C×(N·P)`` product, as a dense conv's backward does: training
is not where the sparse kernel pays.
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


def setup_context(ctx, inputs, output):
    x, weight, bias, values, indices, indptr, lo, hi = inputs
    clamped = lo is not None or hi is not None
    ctx.save_for_backward(x, weight, indices, indptr, output if clamped else None)
    ctx.lo, ctx.hi, ctx.block, ctx.has_bias = lo, hi, values.shape[1], bias is not None


def backward(ctx, grad):
    """The gradients of the module docstring: the input's, the bias's and the kept values' (the kept blocks
    fixed; the dense mirror ``weight`` gets none)."""
    x, weight, indices, indptr, output = ctx.saved_tensors
    g = grad
    if output is not None:  # the clamp passes the gradient where it did not cut
        inside = torch.ones_like(output, dtype=torch.bool)
        if ctx.lo is not None:
            inside &= output > ctx.lo
        if ctx.hi is not None:
            inside &= output < ctx.hi
        g = g * inside
    dx = d_bias = d_values = None
    if ctx.needs_input_grad[0]:
        dx = F.conv_transpose2d(g, weight.to(g.dtype))
    if ctx.has_bias and ctx.needs_input_grad[2]:
        d_bias = g.sum((0, 2, 3))
    if ctx.needs_input_grad[3]:
        out_channels, in_channels, block = weight.shape[0], weight.shape[1], ctx.block
        d_weight = torch.einsum("nop,ncp->oc", g.flatten(2), x.flatten(2).to(g.dtype))
        rows = indptr.numel() - 1
        padded = d_weight.new_zeros(rows * block, in_channels)
        padded[:out_channels] = d_weight
        row = torch.repeat_interleave(torch.arange(rows, device=g.device), (indptr[1:] - indptr[:-1]).long())
        d_values = padded.view(rows, block, in_channels).transpose(1, 2)[row, indices.long()]
    return dx, None, d_bias, d_values, None, None, None, None


OP = SparseOp("sparse_conv1x1", reference, fake=fake, cpu=cpu, onnx=onnx, cost=cost, dense=reference,
              triton="sparsegraph.codegen.triton_kernels.sparse_conv1x1:sparse_conv1x1",
              backward=backward, setup_context=setup_context)
