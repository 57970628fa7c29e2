"""sparsegraph::sparse_linear through every backend: reference, CPU (the compiled sparse GEMV and the torch
path), Triton, ONNX Runtime."""

import onnx
import pytest
import torch

from sparsegraph.codegen import sparse_linear, triton_available, use_backend
from sparsegraph.codegen.sparse_linear import OP
from sparsegraph.onnx_export import OnnxModel, export_onnx

CASES = [  # rows, threshold, k, centred
    ((1,), 0.5, 0, True),
    ((3, 5), 0.5, 0, False),
    ((2,), 0.0, 7, True),
    ((20,), 0.8, 0, True),
    ((1,), 0.0, 5, False),
    ((3,), 0.5, 0, False),  # rows ≤ 4: the compiled GEMV (or embedding_bag); more rows: masked GEMM
    ((4,), 0.0, 9, True),
]


def _case(rows, centred, in_f=48, out_f=40, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w_t = torch.randn(in_f, out_f, generator=g).to(dtype)
    x = torch.randn(*rows, in_f, generator=g).to(dtype)
    b = torch.randn(out_f, generator=g).to(dtype)
    c = (torch.randn(in_f, generator=g) * 0.1).to(dtype) if centred else None
    return x, w_t, b, c


def test_reference_is_the_masked_dense_product():
    x, w_t, b, c = _case((4,), True)
    a = x - c
    expected = torch.where(a.abs() > 0.5, a, 0) @ w_t + b
    torch.testing.assert_close(sparse_linear.reference(x, w_t, b, c, 0.5, 0), expected, rtol=0, atol=0)
    kept = (sparse_linear.reference(x, w_t * 0 + torch.eye(48, 40), None, c, 0.0, 6) != 0).sum(-1)
    assert (kept <= 6).all()  # top-k keeps k inputs per row


def test_nothing_dropped_equals_dense_linear():
    x, w_t, b, c = _case((3,), True)
    dense = x @ w_t + b
    folded = b + c @ w_t  # what the pass folds into the bias: W c
    for backend in ("reference", "eager"):
        with use_backend(backend):
            torch.testing.assert_close(OP(x, w_t, folded, c, -1.0, 0), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows,threshold,k,centred", CASES)
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_fast_path_matches_reference(rows, threshold, k, centred, threads, cpu_path):
    x, w_t, b, c = _case(rows, centred)
    ref = sparse_linear.reference(x, w_t, b, c, threshold, k)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # one row is split over threads: both splits must agree
    try:
        with use_backend("eager"):
            torch.testing.assert_close(OP(x, w_t, b, c, threshold, k), ref, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(previous)


def test_cpu_path_runs_the_compiled_gemv_up_to_4_rows(cpu_path):
    """With the library loaded, up to 4 rows (any leading shape) are the compiled kernel's result, more
    rows and the library turned off the torch path's."""
    from sparsegraph.codegen import cpu_kernels

    for rows in ((1, 1), (2, 2), (5,)):
        x, w_t, b, c = _case(rows, True)
        got = sparse_linear.cpu(x, w_t, b, c, 0.5, 0)
        native = cpu_kernels.sparse_gemv(x, w_t, b, c, 0.5, 0)
        assert (native is not None) == (cpu_path == "native" and len(x.flatten(0, -2)) <= 4)
        torch_path = sparse_linear.cpu_torch(x, w_t, b, c, 0.5, 0)
        assert torch.equal(got, native if native is not None else torch_path)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("rows,threshold,k,centred", CASES)
def test_triton_matches_reference(rows, threshold, k, centred):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, w_t, b, c = (t.to(device) if t is not None else None for t in _case(rows, centred))
    ref = sparse_linear.reference(x, w_t, b, c, threshold, k)
    with use_backend("triton"):
        torch.testing.assert_close(OP(x, w_t, b, c, threshold, k), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
def test_triton_half_precision_accumulates_in_fp32(dtype, tol):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, w_t, b, c = (t.to(device) for t in _case((1,), True, dtype=dtype))
    ref = sparse_linear.reference(x.float(), w_t.float(), b.float(), c.float(), 0.5, 0)
    with use_backend("triton"):
        y = OP(x, w_t, b, c, 0.5, 0)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol)


class _Layer(torch.nn.Module):
    def __init__(self, w_t, b, c, threshold, k):
        super().__init__()
        self.register_buffer("w_t", w_t)
        self.register_buffer("b", b)
        self.register_buffer("c", c)
        self.threshold, self.k = threshold, k

    def forward(self, x):
        return OP(x, self.w_t, self.b, self.c, self.threshold, self.k)


@pytest.mark.parametrize("threshold,k", [(0.5, 0), (0.0, 7)])
def test_onnx_translation_matches_in_onnxruntime(threshold, k, tmp_path):
    x, w_t, b, c = _case((2, 6), True)
    gm = torch.fx.symbolic_trace(_Layer(w_t, b, c, threshold, k))
    path = export_onnx(gm, tmp_path / "sl.onnx", (x,))
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Where" in ops and ("TopK" in ops) == (k > 0)
    for inputs in (x, torch.randn(3, 9, 48)):
        ref = sparse_linear.reference(inputs, w_t, b, c, threshold, k)
        torch.testing.assert_close(OnnxModel(path, gm)(inputs), ref, rtol=1e-4, atol=1e-4)


def test_cost_counts_the_kept_fraction():
    import sparsegraph as sg

    x, w_t, b, c = _case((1,), True)
    gm = sg.trace(_Layer(w_t, b, c, 0.0, 12), (x,))
    node = next(n for n in gm.graph.nodes if n.target is OP.overload)
    macs, _ = OP.cost(node)
    assert macs == 1 * 12 * 40  # top-k: k of 48 inputs


@pytest.mark.parametrize("threshold,k", [(0.5, 0), (0.0, 7)])
def test_nan_and_inf_reach_the_output_in_every_backend(threshold, k, tmp_path):
    """A NaN or inf input reaches the output as through the dense layer (never dropped as 'inactive'),
    in the reference, both CPU paths (decode and batched), Triton and ONNX Runtime."""
    x, w_t, b, c = _case((6,), True)
    x[1, 3], x[4, 10] = float("nan"), float("inf")
    dense = torch.isfinite(x @ w_t + b).all(-1)
    assert dense.tolist() == [True, False, True, True, False, True]
    backends = ["reference", "eager"] + (["triton"] if triton_available() else [])
    for backend in backends:
        for rows in (x, x[:2]):  # 6 rows: masked GEMM; 2 rows: the compiled GEMV (or embedding_bag)
            with use_backend(backend):
                got = OP(rows, w_t, b, c, threshold, k)
            assert torch.equal(torch.isfinite(got).all(-1), dense[:len(rows)]), backend
    gm = torch.fx.symbolic_trace(_Layer(w_t, b, c, threshold, k))
    got = OnnxModel(export_onnx(gm, tmp_path / "sl.onnx", (x,)), gm)(x)
    assert torch.equal(torch.isfinite(got).all(-1), dense)
