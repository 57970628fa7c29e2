"""sparsegraph::token_scores / token_select / token_gather: reference vs CPU, and ONNX Runtime with a
k that follows the runtime length."""

import onnx
import pytest
import torch

from sparsegraph.codegen import token_gather, token_scores, token_select
from sparsegraph.onnx_export import OnnxModel, export_onnx


def _stream(B=2, N=17, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, D, generator=g), torch.randn(B, N, generator=g)


def _padding(B, N, pad):
    mask = torch.zeros(B, 1, 1, N)
    mask[-1, ..., N - pad:] = float("-inf")
    return mask


@pytest.mark.parametrize("N, keep, protect, expected", [(197, 0.7, 1, 138), (138, 0.7, 1, 97),
                                                        (97, 0.7, 1, 68), (65, 0.5, 1, 33), (10, 0.01, 1, 2),
                                                        (8, 1.0, 0, 8)])
def test_kept_count_matches_the_vit_schedule(N, keep, protect, expected):
    assert token_select.kept_count(N, keep, protect) == expected


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("protect", [0, 1, 2])
def test_select_cpu_matches_reference(fuse, protect):
    x, s = _stream()
    ref, ref_index = token_select.reference(x, s, 0.5, protect, fuse)
    out, index = token_select.cpu(x, s, 0.5, protect, fuse)
    assert torch.equal(index, ref_index)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    k = token_select.kept_count(17, 0.5, protect) + fuse
    assert out.shape == (2, k, 8)
    body = index[:, :k - fuse]
    assert (body[:, 1:] > body[:, :-1]).all(), "kept tokens stay in order"
    assert (body[:, :protect] == torch.arange(protect)).all(), "protected tokens are always kept"


def test_select_keeps_the_highest_scores():
    x, s = _stream(B=1, N=9)
    _, index = token_select.cpu(x, s, 0.5, 1, False)  # 1 + 4 of 8
    expected = (s[0, 1:].topk(4).indices + 1).sort().values
    assert index[0].tolist() == [0, *expected.tolist()]


def test_fused_token_is_the_score_weighted_mean_of_the_dropped():
    x, s = _stream(B=1, N=6)
    s = s.abs()
    out, index = token_select.cpu(x, s, 0.5, 1, True)
    dropped = sorted(set(range(6)) - set(index[0, :-1].tolist()))
    w = s[0, dropped]
    torch.testing.assert_close(out[0, -1], (w[:, None] * x[0, dropped]).sum(0) / w.sum())
    assert index[0, -1].item() == dropped[int(w.argmax())]


def test_select_never_prefers_padding():
    x, s = _stream(B=1, N=10)
    s[0, 6:] = float("-inf")  # 4 padding tokens, keep 1 + 4 of 9: all 5 real non-protected ones win
    _, index = token_select.cpu(x, s, 0.5, 1, False)
    assert index[0].max().item() < 6


def test_keep_zero_keeps_every_finite_score():
    x, s = _stream(B=2, N=10)
    s[0, 4:] = float("-inf")  # row 0: tokens 1-3 finite
    s[1, 1:] = float("-inf")
    s[1, 5:7] = 1.0           # row 1: tokens 5, 6 finite → k = 3 for both, row 1 topped up with one more
    _, index = token_select.cpu(x, s, 0.0, 1, False)
    assert index.shape == (2, 4) and index[0].tolist() == [0, 1, 2, 3] and {5, 6} <= set(index[1].tolist())
    _, ref_index = token_select.reference(x, s, 0.0, 1, False)
    assert torch.equal(index[0], ref_index[0])


def test_select_refuses_bad_inputs():
    x, s = _stream()
    with pytest.raises(ValueError, match="keep"):
        token_select.cpu(x, s, 1.5, 1, False)
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        token_select.cpu(x, s[:, :5], 0.5, 1, False)


def _qk(B=2, H=4, Hkv=2, L=17, E=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, L, E, generator=g), torch.randn(B, Hkv, L, E, generator=g)


@pytest.mark.parametrize("mode", token_scores.MODES)
@pytest.mark.parametrize("masked", [False, True])
def test_scores_cpu_matches_reference(mode, masked):
    q, k = _qk()
    mask = _padding(2, 17, 5) if masked else None
    ref = token_scores.reference(q, k, mask, 0.3, mode, 4)
    torch.testing.assert_close(token_scores.cpu(q, k, mask, 0.3, mode, 4), ref)
    if masked:
        assert torch.isinf(ref[1, -5:]).all() and torch.isfinite(ref[0]).all()


def test_scores_are_attention_received():
    """Against a plain softmax: the cls row of head-averaged probabilities, and the column means."""
    q, k = _qk(B=1, Hkv=4)
    p = ((q @ k.transpose(-1, -2)) * 0.3).softmax(-1)
    torch.testing.assert_close(token_scores.cpu(q, k, None, 0.3, "cls", 4), p[:, :, 0].mean(1))
    torch.testing.assert_close(token_scores.cpu(q, k, None, 0.3, "received", 4), p.mean((1, 2)))
    torch.testing.assert_close(token_scores.cpu(q, k, None, 0.3, "last", 4), p[:, :, -1].mean(1))


def test_padding_queries_do_not_vote():
    q, k = _qk(B=1, Hkv=4)
    mask = _padding(1, 17, 4)
    p = ((q @ k.transpose(-1, -2)) * 0.3 + mask).softmax(-1)
    expected = p[:, :, :13].mean((1, 2))[:, :13]
    torch.testing.assert_close(token_scores.cpu(q, k, mask, 0.3, "received", 5)[:, :13], expected)


@pytest.mark.parametrize("dims", [(1,), (2, 3), (3,)])
@pytest.mark.parametrize("batch", [1, 2])
def test_gather_cpu_matches_reference(dims, batch):
    _, index = token_select.cpu(*_stream(), 0.5, 1, False)
    t = torch.randn(batch, 17, 17, 17) if dims == (1,) else torch.randn(batch, 1, 17, 17)
    out = token_gather.cpu(t, index, list(dims))
    torch.testing.assert_close(out, token_gather.reference(t, index, list(dims)))
    assert out.shape[0] == 2 and all(out.shape[d] == index.shape[1] for d in dims)


class _Prune(torch.nn.Module):
    """scores → select → gather: what the token_pruning rewrite inserts."""

    def __init__(self, mode, fuse):
        super().__init__()
        self.mode, self.fuse = mode, fuse

    def forward(self, x, q, k, mask, weights):
        s = token_scores.OP(q, k, mask, 0.3, self.mode, 4)
        y, index = token_select.OP(x, s, 0.5, 1, self.fuse)
        return y, index, token_gather.OP(weights, index, [1]), token_gather.OP(mask, index, [3])


def _inputs(B, N, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, 8, generator=g)
    q, k = torch.randn(B, 4, N, 8, generator=g), torch.randn(B, 2, N, 8, generator=g)
    return x, q, k, _padding(B, N, 3), torch.rand(B, N, 1, generator=g)


@pytest.mark.parametrize("mode, fuse", [("cls", False), ("received", True), ("last", False)])
def test_onnx_k_follows_the_runtime_length(mode, fuse, tmp_path):
    """One ONNX file, several lengths: k = round((N − 1)/2) at each, parity with the PyTorch ops."""
    gm = torch.fx.symbolic_trace(_Prune(mode, fuse))
    auto = torch.export.Dim.AUTO
    shapes = {"x": {0: auto, 1: auto}, "q": {0: auto, 2: auto}, "k": {0: auto, 2: auto},
              "mask": {0: auto, 3: auto}, "weights": {0: auto, 1: auto}}
    ep = torch.export.export(gm, _inputs(2, 17, 0), dynamic_shapes=shapes, strict=False)
    from sparsegraph import codegen

    program = torch.onnx.export(ep, dynamo=True, custom_translation_table=codegen.onnx_translations())
    path = tmp_path / "prune.onnx"
    program.save(str(path))
    assert {"TopK", "GatherElements"} <= {n.op_type for n in onnx.load(str(path)).graph.node}
    session = OnnxModel(path, gm)
    for B, N in [(2, 17), (3, 30), (1, 9), (2, 64)]:
        args = _inputs(B, N, N)
        expected, got = gm(*args), session(*args)
        assert got[0].shape[1] == token_select.kept_count(N, 0.5, 1) + fuse
        for e, o in zip(expected, got):
            torch.testing.assert_close(o.to(e.dtype), e, rtol=1e-4, atol=1e-4)


def test_onnx_export_through_the_project_exporter(tmp_path):
    path = export_onnx(torch.fx.symbolic_trace(_Prune("cls", False)), tmp_path / "p.onnx", _inputs(2, 17, 0))
    assert path.exists()


def test_core_scores_cpu_reference_and_onnx(tmp_path):
    from sparsegraph.codegen import core_scores

    g = torch.Generator().manual_seed(4)
    a, centre = torch.randn(2, 17, 32, generator=g), torch.randn(32, generator=g) * 0.1
    hot = torch.tensor([1, 5, 9, 30])
    mask = _padding(2, 17, 4)
    ref = core_scores.reference(a, hot, centre, mask)
    torch.testing.assert_close(core_scores.cpu(a, hot, centre, mask), ref)
    torch.testing.assert_close(ref[0], (a[0][:, hot] - centre[hot]).abs().sum(-1))
    assert torch.isinf(ref[1, -4:]).all()

    class Core(torch.nn.Module):
        def forward(self, a, mask):
            return core_scores.OP(a, hot, centre, mask)

    gm = torch.fx.symbolic_trace(Core())
    session = OnnxModel(export_onnx(gm, tmp_path / "core.onnx", (a, mask)), gm)
    torch.testing.assert_close(session(a, mask), ref, rtol=1e-5, atol=1e-5)


def test_roi_scores_op_dispatches_on_a_tensor_list():
    """The registered op (not just its reference) runs when its only tensors sit inside a list."""
    from sparsegraph.codegen import roi_scores

    scores = [torch.zeros(2, 1 + 16).index_fill_(1, torch.tensor([6]), 1.0) + 0.01 for _ in range(2)]
    out = torch.ops.sparsegraph.roi_scores(scores, 4, 1, 0.2, 1)
    torch.testing.assert_close(out, roi_scores.reference(scores, 4, 1, 0.2, 1))
    assert out[:, 0].eq(1).all() and torch.isfinite(out[:, 6]).all() and torch.isinf(out[:, 16]).all()
