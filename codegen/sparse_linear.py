"""``sparsegraph::sparse_linear``: a linear layer whose *input* is sparse at run time.

With the weight stored input-major, ``weight_t`` [in, out], a centre ``c`` [in] (or none) and the
centred input ``a = x − c``, only the inputs that survive the test feed the product:

    keep_j = |a_j| > threshold                      (threshold mode, k = 0)
    keep_j = |a_j| ≥ (k-th largest |a| of the row)  (top-k mode, k > 0)
    (and keep_j whenever a_j is NaN: non-finite inputs reach the output, as through the dense layer)
    y      = Σ_{j kept} a_j · weight_t[j, :] + bias

The caller folds ``weight_t ᵀ c`` into ``bias`` once, so that ``y = W x + b`` exactly when nothing is
dropped: ``W x = W (x − c) + W c``. This one primitive covers activation sparsity on an MLP's down
projection (inputs = the intermediate activations: CATS/TEAL thresholds, Deja Vu-style top-k, and the
centred variant) and TEAL's input sparsity on any projection.

Why input-major: a skipped input skips a whole contiguous row of ``weight_t``, so the kernels read
only the rows they use, in place. (Gathering the active rows into a copy first reads and writes as much
memory as the dense product and is slower than dense; see ``../shared/FINDINGS.md``.)

Backends:

- reference: mask and dense matmul;
- CPU, up to 4 rows (decoding), when the compiled library is built (`cpu_kernels.sparse_gemv`,
  ``cpu_kernels/sparse_gemv.cpp``): one C call does it all: ``a = x − c``, the test (NaN kept; top-k
  by a radix select of the k-th largest ``|a|``), the list of kept inputs, and ``y = Σ_j a_j · W_t[j, :]
  + b`` with threads splitting the *output* columns, each streaming its slice of every kept row in
  place (no copy, no reduction across threads), the next kept rows prefetched; the kept rows of up to
  4 tokens are read once for all of them. fp32, bf16, fp16 (fp32 accumulation). Why: a decode GEMV is
  bound by the bytes of weight it reads and, at small sizes, by what a call costs around its
  arithmetic; the kernel reads each kept row once, contiguously, and its binding passes one packed
  record through ctypes (one argument: 0.5 µs; sixteen: ~5 µs). Measured (``python -m bench gemv``,
  ``bench/results/gemv-cpu.md``: 2-core Xeon, 2 threads, one fp32 token, speed-up over the faster
  dense GEMV in the same run) at 2048→5632, 5632→2048 and 2048→2048 with 30 / 50 / 70 / 90% of the
  inputs skipped: 1.3–1.4 / 1.7–1.8 / 2.5–2.9 / 5.7–6.9x with the weight in cache, 1.4 / 1.8 /
  2.7–3.0 / 6.6–8.3x with the weight read from memory (the bound is 1 / (1 − sparsity): the bytes);
  the embedding_bag path below: 0.6–0.7 / 0.8–0.9 / 1.0–1.4 / 1.7–2.8x and 0.8–0.9 / 1.0–1.1 /
  1.4–1.8 / 2.6–3.7x; ``torch.sparse.mm`` with a COO or CSR vector (built per call): 0.4–0.8x up to
  50%, ~1x at 70%. At 256↔688 a call is 15 µs dense and the cost around the arithmetic decides: 0.8–0.95x at
  30–50%, 1.0x at 70%, 1.3–1.4x at 90% (embedding_bag: 0.15x). Per call at 16→16: 10 µs (dense
  6.8, embedding_bag 115); through ``torch.ops.sparsegraph.sparse_linear`` 44 µs (was 167), the rest
  being the custom-op dispatch;
- CPU otherwise (`cpu_torch`; also when the library is not built or ``SPARSEGRAPH_NATIVE=0``): up to
  ``GATHER_MAX_ROWS`` rows, ``embedding_bag`` in ``sum`` mode with ``per_sample_weights``, which is
  exactly Σ_j a_j · row_j over a list of row indices read in place; each row is one bag, split into as
  many bags as there are threads when there are fewer rows than threads, so one token uses all cores.
  For more rows (prefill, encoders) the kept rows of all tokens together cover nearly every weight
  row, nothing is saved by skipping, and a masked GEMM is faster;
- Triton (`triton_kernels/sparse_linear.py`): masked loads of the active weight rows only; a GEMV-style
  path for decode (≤ 4 rows) and a ``tl.dot`` path for batches;
- ONNX: ``Where(|a| > t, a, 0)`` then ``MatMul`` (top-k: threshold at the k-th ``TopK`` value), which
  keeps the semantics; runtimes without sparse kernels run it at dense speed.

Autograd (`backward`): the forward's choice of kept inputs is fixed (the test has zero derivative almost
everywhere), so with ``ã = keep ⊙ a`` and the output gradient ``g``:

    ∂x = (g · weight_tᵀ) ⊙ keep      ∂weight_t = ãᵀ g (only the rows some row kept are nonzero)
    ∂bias = Σ_rows g                   ∂centre = −Σ_rows ∂x
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from onnxscript import opset18 as op

from sparsegraph import ir, meta
from sparsegraph.codegen import cpu_kernels
from sparsegraph.codegen.op import SparseOp


def _centred_kept(x, centre, threshold: float, k: int):
    """The centred input and which inputs are kept. NaN inputs are always kept, so a NaN reaches the
    output as it does through the dense layer (a comparison with NaN is false: testing ``|a| > t`` would
    drop it and hide it)."""
    a = x if centre is None else x - centre
    if k > 0:
        kth = a.abs().topk(k, dim=-1).values[..., -1:]
        return a, (a.abs() >= kth) | a.isnan()
    return a, ~(a.abs() <= threshold)


def reference(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, centre: torch.Tensor | None,
              threshold: float, k: int) -> torch.Tensor:
    a, keep = _centred_kept(x, centre, threshold, k)
    y = torch.where(keep, a, torch.zeros_like(a)) @ weight_t
    return y if bias is None else y + bias


GATHER_MAX_ROWS = 4  # above this many rows the kept weight rows cover (nearly) all rows: GEMM wins


def cpu(x, weight_t, bias, centre, threshold, k):
    """The CPU path: the compiled sparse GEMV for up to ``cpu_kernels.GEMV_MAX_ROWS`` rows when the
    library is built and takes the arguments, else `cpu_torch`."""
    y = cpu_kernels.sparse_gemv(x, weight_t, bias, centre, threshold, k)
    return y if y is not None else cpu_torch(x, weight_t, bias, centre, threshold, k)


def cpu_torch(x, weight_t, bias, centre, threshold, k):
    """The torch CPU path: ``embedding_bag`` over the kept rows up to `GATHER_MAX_ROWS` rows, a masked
    GEMM above (module docstring)."""
    in_f, out_f = weight_t.shape
    a, keep = _centred_kept(x.reshape(-1, in_f), centre, threshold, k)
    rows = a.shape[0]
    if rows > GATHER_MAX_ROWS:  # measured: at 8+ rows masked GEMM beats embedding_bag (docs/findings.md)
        y = torch.where(keep, a, torch.zeros_like(a)) @ weight_t
        y = y if bias is None else y + bias
        return y.to(x.dtype).reshape(*x.shape[:-1], out_f)
    row, col = (t.contiguous() for t in keep.nonzero(as_tuple=True))  # strided indices miss the fast path
    counts = torch.bincount(row, minlength=rows)
    pieces = max(1, math.ceil(torch.get_num_threads() / rows)) if rows else 1
    starts = torch.cumsum(counts, 0) - counts
    offsets = (starts[:, None] + counts[:, None] * torch.arange(pieces) // pieces).reshape(-1)
    y = F.embedding_bag(col, weight_t, offsets, mode="sum", per_sample_weights=a[row, col].to(weight_t.dtype))
    y = y.view(rows, pieces, out_f).sum(1) if pieces > 1 else y
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).reshape(*x.shape[:-1], out_f)


def dense(x, weight_t, bias, centre, threshold, k):
    """Nothing skipped: (x − c) Wᵀ + b, which is the original dense layer (W c is folded into b)."""
    a = x if centre is None else x - centre
    y = torch.matmul(a, weight_t)
    return y if bias is None else y + bias


def fake(x, weight_t, bias, centre, threshold, k):
    return x.new_empty(*x.shape[:-1], weight_t.shape[1])


def onnx(x, weight_t, bias, centre, threshold: float, k: int):
    a = x if centre is None else op.Sub(x, centre)
    magnitude = op.Abs(a)
    if k > 0:
        values, _ = op.TopK(magnitude, op.Constant(value_ints=[k]), axis=-1, largest=1, sorted=1)
        kth = op.Slice(values, op.Constant(value_ints=[k - 1]), op.Constant(value_ints=[k]),
                       op.Constant(value_ints=[-1]))
        keep = op.Or(op.GreaterOrEqual(magnitude, kth), op.IsNaN(a))
    else:  # NaN kept, as in the kernels
        keep = op.Not(op.LessOrEqual(magnitude, op.CastLike(op.Constant(value_float=threshold), a)))
    y = op.MatMul(op.Where(keep, a, op.CastLike(op.Constant(value_float=0.0), a)), weight_t)
    return y if bias is None else op.Add(y, bias)


def cost(node: torch.fx.Node) -> tuple[int, int]:
    """MACs and bytes at the expected density (top-k: k/in; threshold: calibrated, from node meta)."""
    x, weight_t = ir.val(node.args[0]), ir.val(node.args[1])
    in_f, out_f = weight_t.shape
    k = node.args[5]
    info = meta.get(node)
    density = k / in_f if k > 0 else (info.density if info is not None and info.density is not None else 1.0)
    rows = math.prod(x.shape[:-1])
    macs = int(rows * in_f * out_f * density)
    out = ir.val(node)
    # one row reads only its active weight rows; many rows together touch (nearly) all of them
    weight_read = weight_t.numel() * weight_t.element_size() * (density if rows == 1 else 1.0)
    moved = x.numel() * x.element_size() + out.numel() * out.element_size() + int(weight_read)
    return macs, moved


def setup_context(ctx, inputs, output):
    x, weight_t, bias, centre, threshold, k = inputs
    a, keep = _centred_kept(x, centre, threshold, k)
    ctx.save_for_backward(torch.where(keep, a, torch.zeros_like(a)), keep, weight_t)
    ctx.has_bias, ctx.has_centre = bias is not None, centre is not None


def backward(ctx, grad):
    """The gradients of the module docstring, the kept inputs fixed by the forward."""
    kept, keep, weight_t = ctx.saved_tensors
    in_f, out_f = weight_t.shape
    g = grad.reshape(-1, out_f)
    dx = d_weight = d_bias = d_centre = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[3]:
        dx = torch.where(keep, (grad @ weight_t.t()).to(kept.dtype), torch.zeros_like(kept))
        if ctx.has_centre and ctx.needs_input_grad[3]:
            d_centre = -dx.reshape(-1, in_f).sum(0)
    if ctx.needs_input_grad[1]:
        d_weight = kept.reshape(-1, in_f).t().to(g.dtype) @ g
    if ctx.has_bias and ctx.needs_input_grad[2]:
        d_bias = g.sum(0)
    return dx if ctx.needs_input_grad[0] else None, d_weight, d_bias, d_centre, None, None


OP = SparseOp("sparse_linear", reference, fake=fake, cpu=cpu, onnx=onnx, cost=cost, dense=dense,
              triton="sparsegraph.codegen.triton_kernels.sparse_linear:sparse_linear",
              backward=backward, setup_context=setup_context)
