"""Autograd of the sparse ops (`SparseOp` backward): `torch.autograd.gradcheck` in float64 on small shapes,
the forward's decisions (kept inputs, N:M positions, layout) fixed, so inputs are kept away from the
decision boundaries that a finite difference could cross."""

from __future__ import annotations

import pytest
import torch

from sparsegraph.attention_layouts import fixed_table
from sparsegraph.codegen import use_backend
from sparsegraph.codegen.block_sparse_attention import OP as ATTENTION
from sparsegraph.codegen.nm_linear import OP as NM
from sparsegraph.codegen.nm_linear import nm_pack
from sparsegraph.codegen.sparse_conv1x1 import OP as CONV1X1
from sparsegraph.codegen.sparse_conv1x1 import pack, unpack
from sparsegraph.codegen.sparse_linear import OP as SPARSE_LINEAR


def _away_from(x: torch.Tensor, threshold: float, gap: float = 0.05) -> torch.Tensor:
    """`x` with every |entry| at least `gap` from `threshold` (a finite difference keeps the mask)."""
    near = (x.abs() - threshold).abs() < gap
    return torch.where(near, x.sign() * (threshold + 2 * gap), x)


@pytest.mark.parametrize("backend", ["reference", "eager"])
@pytest.mark.parametrize("k", [0, 3])
def test_sparse_linear_gradcheck(backend, k):
    g = torch.Generator().manual_seed(0)
    x = _away_from(torch.randn(2, 3, 8, generator=g, dtype=torch.float64), 0.5)
    if k:  # distinct magnitudes: the top-k set does not change under a small step
        order = torch.randperm(48, generator=g)
        x = torch.linspace(0.2, 2.0, 48, dtype=torch.float64)[order].reshape(2, 3, 8)
    w = torch.randn(8, 5, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    c = torch.zeros(8, dtype=torch.float64)
    args = [t.requires_grad_() for t in (x, w, b, c)]
    with use_backend(backend):
        assert torch.autograd.gradcheck(lambda *a: SPARSE_LINEAR(*a, 0.5, k), args)


def test_sparse_linear_grads_only_kept():
    """Inputs the forward dropped get no gradient, and neither do weight rows no row read."""
    x = torch.tensor([[1.0, 0.1, -2.0, 0.0]], requires_grad=True)
    w = torch.randn(4, 3, requires_grad=True)
    SPARSE_LINEAR(x, w, None, None, 0.5, 0).sum().backward()
    assert x.grad[0, 1] == 0 and x.grad[0, 3] == 0 and x.grad[0, 0] != 0
    assert (w.grad[1] == 0).all() and (w.grad[3] == 0).all() and (w.grad[0] != 0).all()


@pytest.mark.parametrize("backend", ["reference", "eager"])
@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 8)])
def test_nm_linear_gradcheck(backend, n, m):
    g = torch.Generator().manual_seed(1)
    values, offsets = nm_pack(torch.randn(6, 16, generator=g, dtype=torch.float64), n, m)
    x = torch.randn(2, 3, 16, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    values.requires_grad_()
    with use_backend(backend):
        assert torch.autograd.gradcheck(lambda x, v, b: NM(x, v, offsets, b, n, m), (x, values, b))


@pytest.mark.parametrize("causal", [False, True])
def test_block_sparse_attention_gradcheck(causal):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 8, 4, generator=g, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    mask = torch.randn(1, 1, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    block_mask = torch.tensor([[[1, 0, 0], [1, 1, 0], [0, 1, 1]], [[1, 0, 0], [1, 0, 0], [1, 0, 1]]],
                              dtype=torch.bool)  # every query block lists its own block: no empty row
    table = fixed_table(block_mask)
    with use_backend("reference"):  # the CPU kernels compute in fp32: too coarse for finite differences
        assert torch.autograd.gradcheck(lambda q, k, v, m: ATTENTION(q, k, v, table, m, 3, causal, 0.5),
                                        (q, k, v, mask))


def _conv_case(block: int, seed: int, out_channels: int = 7, in_channels: int = 5):
    """A pruned weight [O, C] with about half its blocks kept, and its block-CSR form (odd sizes: the last
    block row is partial for block > 1)."""
    g = torch.Generator().manual_seed(seed)
    rows = -(-out_channels // block)
    kept = torch.rand(rows, in_channels, generator=g) < 0.5
    kept[0, 0] = kept[-1, -1] = True
    mask = kept.repeat_interleave(block, 0)[:out_channels]
    weight = torch.randn(out_channels, in_channels, generator=g, dtype=torch.float64) * mask
    return g, pack(weight, kept, block)


@pytest.mark.parametrize("block", [1, 4])
@pytest.mark.parametrize("bounds", [(None, None), (0.0, 6.0), (None, 0.5)])
def test_sparse_conv1x1_gradcheck(block, bounds):
    """Input, bias and kept values (float64: every backend runs the reference, the compiled kernel takes
    fp32 only; `test_sparse_conv1x1_grads_only_kept` covers it); the dense weight is rebuilt from the
    values (its mirror), so the finite differences see what the kernels see, and the op's gradient reaches
    the values alone. Inputs are kept away from the clamp's bounds, where a finite difference would cross
    a kink."""
    lo, hi = bounds
    for seed in range(3, 100):  # the first case whose pre-clamp outputs are off the bounds (the kinks)
        g, (values, indices, indptr) = _conv_case(block, seed)
        x = torch.randn(2, 5, 2, 3, generator=g, dtype=torch.float64)
        bias = torch.randn(7, generator=g, dtype=torch.float64)
        weight = unpack(values, indices, indptr, 7, 5)[:, :, None, None]
        y = CONV1X1(x, weight, bias, values, indices, indptr, None, None)
        if all((y - b).abs().min() > 1e-3 for b in bounds if b is not None):
            break
    else:
        raise AssertionError("no case off the clamp's bounds")

    def f(x, values, bias):
        weight = unpack(values, indices, indptr, 7, 5)[:, :, None, None]
        return CONV1X1(x, weight, bias, values, indices, indptr, lo, hi)

    # fast mode: the Jacobian against random directions (one backward and two forwards per input), where
    # the full Jacobian takes a backward per output entry through the custom op's dispatch
    assert torch.autograd.gradcheck(f, [t.requires_grad_() for t in (x, values, bias)], fast_mode=True)


def test_sparse_conv1x1_grads_only_kept():
    """The values' gradient is the dense weight's gradient at the kept blocks; the fp32 kernel's forward
    trains the same as the reference's."""
    _, (values, indices, indptr) = _conv_case(2, seed=9)
    values = values.float()
    x = torch.randn(3, 5, 4, 4)
    weight = unpack(values, indices, indptr, 7, 5)[:, :, None, None]
    dense = weight.clone().requires_grad_()
    torch.nn.functional.conv2d(x, dense).square().sum().backward()
    for backend in ("reference", "eager"):
        v = values.clone().requires_grad_()
        with use_backend(backend):
            CONV1X1(x, weight, None, v, indices, indptr, None, None).square().sum().backward()
        expected = pack(dense.grad[:, :, 0, 0], _kept(indices, indptr, 5), 2)[0]
        torch.testing.assert_close(v.grad, expected, rtol=1e-4, atol=1e-4)


def _kept(indices, indptr, in_channels):
    rows = indptr.numel() - 1
    kept = torch.zeros(rows, in_channels, dtype=torch.bool)
    for r in range(rows):
        kept[r, indices[indptr[r]:indptr[r + 1]].long()] = True
    return kept


def test_torch_compile_trains_through_ops():
    """``torch.compile`` traces the ops in grad mode (it needs their autograd formulas)."""
    values, offsets = nm_pack(torch.randn(4, 8), 2, 4)
    values.requires_grad_()
    w = torch.randn(8, 8, requires_grad=True)

    def f(x):
        return NM(SPARSE_LINEAR(x, w, None, None, 0.3, 0), values, offsets, None, 2, 4).square().sum()

    loss = torch.compile(f, backend="aot_eager")(torch.randn(3, 8))
    loss.backward()
    assert values.grad is not None and w.grad is not None
