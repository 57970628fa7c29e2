"""sparsegraph::nm_linear through every backend: reference, CPU, Triton (interpreter on CPU), ONNX Runtime."""

import onnx
import pytest
import torch

from sparsegraph.codegen import nm_linear, triton_available, use_backend
from sparsegraph.codegen.nm_linear import OP, nm_pack, nm_unpack
from sparsegraph.onnx_export import OnnxModel, export_onnx


def _case(out_f=24, in_f=32, n=2, m=4, rows=(3, 5), bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    x = torch.randn(*rows, in_f, generator=g)
    b = torch.randn(out_f, generator=g) if bias else None
    values, offsets = nm_pack(w, n, m)
    return x, w, b, values, offsets


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 4)])
def test_pack_keeps_the_n_largest_per_group(n, m):
    _, w, _, values, offsets = _case(n=n, m=m)
    dense = nm_unpack(values, offsets, n, m)
    groups = dense.reshape(w.shape[0], -1, m)
    assert ((groups != 0).sum(-1) <= n).all()
    kept_mag = groups.abs().sum(-1)
    top = w.reshape(w.shape[0], -1, m).abs().topk(n, dim=-1).values.sum(-1)
    torch.testing.assert_close(kept_mag, top, rtol=0, atol=1e-6)
    assert offsets.dtype == torch.uint8 and values.shape == (w.shape[0], w.shape[1] // m * n)


def test_reference_equals_dense_linear_with_pruned_weight():
    x, _, b, values, offsets = _case()
    expected = torch.nn.functional.linear(x, nm_unpack(values, offsets, 2, 4), b)
    torch.testing.assert_close(nm_linear.reference(x, values, offsets, b, 2, 4), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
def test_cpu_backend_matches_reference(bias):
    x, _, b, values, offsets = _case(bias=bias)
    ref = nm_linear.reference(x, values, offsets, b, 2, 4)
    with use_backend("eager"):
        torch.testing.assert_close(OP(x, values, offsets, b, 2, 4), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("shape", [(24, 32, (3, 5)), (70, 64, (1, 9)), (16, 128, (2, 2, 7))])
def test_triton_backend_matches_reference(shape):
    out_f, in_f, rows = shape
    x, _, b, values, offsets = _case(out_f, in_f, rows=rows)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, b, values, offsets = (t.to(device) for t in (x, b, values, offsets))
    ref = nm_linear.reference(x, values, offsets, b, 2, 4)
    with use_backend("triton"):
        y = OP(x, values, offsets, b, 2, 4)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)  # tl.dot accumulates in another order


def test_triton_backend_refuses_clearly_when_triton_cannot_run(monkeypatch):
    monkeypatch.setattr("sparsegraph.codegen.op.triton_available", lambda: False)
    x, _, b, values, offsets = _case()
    with use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        OP(x, values, offsets, b, 2, 4)


class _Layer(torch.nn.Module):
    def __init__(self, values, offsets, bias):
        super().__init__()
        self.register_buffer("values", values)
        self.register_buffer("offsets", offsets)
        self.register_buffer("bias", bias)

    def forward(self, x):
        return OP(x, self.values, self.offsets, self.bias, 2, 4)


def test_onnx_translation_matches_reference_in_onnxruntime(tmp_path):
    x, _, b, values, offsets = _case()
    layer = _Layer(values, offsets, b)
    gm = torch.fx.symbolic_trace(layer)
    path = export_onnx(gm, tmp_path / "nm.onnx", (x,))
    onnx.checker.check_model(str(path))
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "ScatterElements" in ops  # our translation, not a decomposition of the reference
    ref = nm_linear.reference(x, values, offsets, b, 2, 4)
    got = OnnxModel(path, gm)(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # dynamic leading dims: another batch size through the same file
    x2 = torch.randn(7, 5, 32)
    torch.testing.assert_close(OnnxModel(path, gm)(x2), nm_linear.reference(x2, values, offsets, b, 2, 4),
                               rtol=1e-5, atol=1e-5)


def test_op_survives_torch_export_and_has_its_cost():
    x, _, b, values, offsets = _case()
    ep = torch.export.export(_Layer(values, offsets, b), (x,), strict=False)
    node = next(n for n in ep.graph.nodes if n.target is OP.overload)
    macs, moved = OP.cost(node)
    assert macs == 3 * 5 * 24 * 16  # rows · out · kept inputs (n/m of dense)
    assert moved > 0
    assert OP.backends == ["reference", "cpu", "triton", "onnx"]
