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
