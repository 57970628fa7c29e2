"""sparsegraph::dynamic_block_sparse_attention: the run-time block estimate and every backend."""

import math

import onnx
import pytest
import torch

from sparsegraph import attention_layouts
from sparsegraph.attention_layouts import block_mask, fixed_table, layout_from_block_mask
from sparsegraph.codegen import block_sparse_attention as bsa
from sparsegraph.codegen import dynamic_block_sparse_attention as dyn
from sparsegraph.codegen import triton_available, use_backend
from sparsegraph.onnx_export import OnnxModel, export_onnx


def _case(B=2, H=4, Hkv=2, L=70, E=16, block=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, L, E, generator=g) for h in (H, Hkv, Hkv))
    nq = math.ceil(L / block)
    bm = torch.zeros(H, nq, nq, dtype=torch.bool)
    bm[0] = True       # a static dense head
    bm[1, :, 0] = True  # a static sink head that also takes its top 1
    layout = fixed_table(bm)
    topk = torch.tensor([0, 1, 2, 3])[:H]
    padding = torch.zeros(B, 1, 1, L)
    padding[-1, ..., L - 20:] = float("-inf")
    masks = {"none": None, "padding": padding, "full": torch.randn(B, H, L, L, generator=g)}
    return q, k, v, layout, topk, masks


def _oracle(q, k, v, layout, topk, mask, block, causal, scale):
    """Block means, scores and top-k by explicit loops; then the static op per input."""
    B, H, L, _ = q.shape
    S, group = k.shape[2], H // k.shape[1]
    nq, nk = math.ceil(L / block), math.ceil(S / block)
    full = None if mask is None else mask.expand(B, H, L, S)
    outs = []
    for b in range(B):
        bm = block_mask(layout, nq, nk, causal)
        for h in range(H):
            if topk[h] == 0:
                continue
            for i in range(nq):
                scores = []
                for j in range(nk):
                    if causal and j > i:
                        continue
                    qm = q[b, h, i * block:(i + 1) * block].sum(0) / block
                    km = k[b, h // group, j * block:(j + 1) * block].sum(0) / block
                    bias = 0.0 if full is None else float(full[b, h, i * block:(i + 1) * block,
                                                               j * block:(j + 1) * block].max())
                    if bias == float("-inf"):
                        continue
                    scores.append((float("inf") if i == j else float(qm @ km) * scale + bias, j))
                for _, j in sorted(scores, reverse=True)[:int(topk[h])]:
                    bm[h, i, j] = True
        m = None if mask is None else mask[b:b + 1] if mask.shape[0] > 1 else mask
        outs.append(bsa.reference_lists(q[b:b + 1], k[b:b + 1], v[b:b + 1], layout_from_block_mask(bm), m,
                                        block, causal, scale))
    return torch.cat(outs)


@pytest.mark.parametrize("causal", [False, True])
def test_reference_is_the_loop_oracle(causal):
    q, k, v, layout, topk, masks = _case()
    for name, mask in masks.items():
        torch.testing.assert_close(dyn.reference(q, k, v, layout, topk, mask, 16, causal, 0.25),
                                   _oracle(q, k, v, layout, topk, mask, 16, causal, 0.25), rtol=1e-5,
                                   atol=1e-5, msg=f"mask {name}")


def test_estimate_keeps_the_diagonal_and_never_picks_what_no_query_sees():
    q, k, _, layout, topk, masks = _case()
    static = attention_layouts.layout(layout, 5, 5, True)  # the table's index lists at L = 70
    lists = dyn.layouts(q, k, static, topk, masks["padding"], 16, True, 0.25)  # [B, H, nq, n]
    dynamic = lists[..., static.shape[-1]:]
    nq = static.shape[1]
    rows = torch.arange(nq)[:, None]
    assert ((dynamic <= rows) | (dynamic == -1)).all()  # causal: no block after the diagonal
    assert (dynamic[0, 3] == rows).any(-1).all()  # the diagonal is always chosen
    assert not (dynamic[1] == nq - 1).any()  # the last block of input 1 is all padding
    counts = (dynamic >= 0).sum(-1)  # per row: min(topk, blocks it may see)
    want = torch.minimum(topk[:, None], (rows.view(-1) + 1)[None, :])
    assert torch.equal(counts[0], want)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 4, 2, 70), (1, 4, 4, 64)])
def test_cpu_matches_reference(cpu_path, causal, shape):
    B, H, Hkv, L = shape
    q, k, v, layout, topk, masks = _case(B, H, Hkv, L)
    for name, mask in masks.items():
        ref = dyn.reference(q, k, v, layout, topk, mask, 16, causal, 0.25)
        with use_backend("eager"):
            got = dyn.OP(q, k, v, layout, topk, mask, 16, causal, 0.25)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=f"mask {name}")


@pytest.mark.slow  # interpreted Triton: 3-10 s per case; CI runs it (-m ci)
@pytest.mark.ci
@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("causal", [False, True])
def test_triton_matches_reference(causal):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, layout, topk, masks = _case()
    for name in ("none", "padding"):
        mask = None if masks[name] is None else masks[name].to(device)
        args = (q.to(device), k.to(device), v.to(device), layout.to(device), topk.to(device), mask, 16,
                causal, 0.25)
        ref = dyn.reference(*args)
        with use_backend("triton"):
            got = dyn.OP(*args)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4, msg=f"mask {name}")


class _Attention(torch.nn.Module):
    def __init__(self, layout, topk, causal):
        super().__init__()
        self.register_buffer("layout", layout)
        self.register_buffer("topk", topk)
        self.causal = causal

    def forward(self, q, k, v, mask):
        return dyn.OP(q, k, v, self.layout, self.topk, mask, 16, self.causal, 0.25)


@pytest.mark.parametrize("causal", [False, True])
def test_onnx_translation_matches_in_onnxruntime(causal, tmp_path):
    q, k, v, layout, topk, masks = _case(L=72)
    gm = torch.fx.symbolic_trace(_Attention(layout, topk, causal))
    path = export_onnx(gm, tmp_path / "dyn.onnx", (q, k, v, masks["padding"]))
    assert {"TopK", "ReduceSum", "Softmax"} <= {n.op_type for n in onnx.load(str(path)).graph.node}
    for batch in (2, 3):  # the batch axis is dynamic
        g = torch.Generator().manual_seed(batch)
        args = (torch.randn(batch, 4, 72, 16, generator=g), torch.randn(batch, 2, 72, 16, generator=g),
                torch.randn(batch, 2, 72, 16, generator=g),
                masks["padding"][:1].expand(batch, -1, -1, -1).contiguous())
        ref = dyn.reference(*args[:3], layout, topk, args[3], 16, causal, 0.25)
        torch.testing.assert_close(OnnxModel(path, gm)(*args), ref, rtol=1e-4, atol=1e-4)


def test_cost_counts_static_and_topk_blocks():
    q, k, v, layout, topk, _ = _case(B=1, L=64)
    gm = torch.fx.symbolic_trace(_Attention(layout, topk, False))
    from sparsegraph import ir

    ir.propagate_shapes(gm, (q, k, v, torch.zeros(1, 1, 1, 64)))
    node = next(n for n in gm.graph.nodes if n.target is dyn.OP.overload)
    macs, _ = dyn.cost(node)
    listed = int((attention_layouts.layout(layout, 4, 4, False) >= 0).sum()) + int(topk.sum()) * 4
    assert macs == listed * 16 * 16 * 32 + 4 * 4 * 4 * 16
