"""Pyramid heads of the block-sparse attention ops: listed blocks exact, every other key block through its
mean key and value weighted by its token count (codegen/block_sparse_attention.py, module docstring)."""

import math

import onnx
import pytest
import torch

from sparsegraph import attention_layouts
from sparsegraph.codegen import block_sparse_attention as bsa
from sparsegraph.codegen import dynamic_block_sparse_attention as dyn
from sparsegraph.codegen import triton_available, use_backend
from sparsegraph.onnx_export import OnnxModel, export_onnx

BLOCK = 16
HEADS = [{"pattern": "pyramid", "params": {"near": "local", "window": 1}},
         {"pattern": "dense", "params": {}},
         {"pattern": "pyramid", "params": {"near": "window_3d", "extent": [0, 1, 2], "grid": [2, 5, 8]}},
         {"pattern": "local", "params": {"window": 2}}]
L = 80  # the window head's grid: 2 × 5 × 8 tokens; 5 blocks of 16


def _qkv(B=2, H=4, Hkv=2, length=L, E=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, length, E, generator=g).to(dtype) for h in (H, Hkv, Hkv))


def _by_hand(q, k, v, table, block, scale):
    """out_i = (Σ_listed e^s v + Σ_far n_J e^{q·k̄_J·scale} v̄_J) / (the same sums without v), row by row."""
    B, H, length, _ = q.shape
    group = H // k.shape[1]
    nk = math.ceil(k.shape[2] / block)
    listed = attention_layouts.block_mask(table, nk, nk, False)
    pooled = attention_layouts.pooled_heads(table)
    out = torch.zeros(B, H, length, v.shape[-1], dtype=torch.float64)
    q, k, v = q.double(), k.double(), v.double()
    for h in range(H):
        kh, vh = k[:, h // group], v[:, h // group]
        for i in range(length):
            num, den = 0.0, 0.0
            for J in range(nk):
                keys = slice(J * block, min(k.shape[2], (J + 1) * block))
                if listed[h, i // block, J]:
                    e = (q[:, h, i, None] * scale * kh[:, keys]).sum(-1).exp()  # [B, n]
                    num, den = num + (e[..., None] * vh[:, keys]).sum(1), den + e.sum(1)
                elif pooled[h]:
                    n = keys.stop - keys.start
                    e = n * (q[:, h, i] * scale * kh[:, keys].mean(1)).sum(-1).exp()
                    num, den = num + e[:, None] * vh[:, keys].mean(1), den + e
            out[:, h, i] = num / den[:, None]
    return out.float()


def _heads(length):
    """HEADS at `length` tokens: its window head (grid 2 × 5 × 8) swapped for a local pyramid elsewhere."""
    if length == L:
        return HEADS
    return [HEADS[0] if h["params"].get("near") == "window_3d" else h for h in HEADS]


def test_table_marks_pyramid_heads_and_lists_only_their_near_blocks():
    table = attention_layouts.table(HEADS, block=BLOCK)
    assert attention_layouts.pooled_heads(table).tolist() == [True, False, True, False]
    masks = attention_layouts.block_mask(table, 5, 5, False)
    near = attention_layouts.pattern_mask("local", {"window": 1}, 5, 5, False)
    assert torch.equal(masks[0], near)
    window = attention_layouts.window_block_mask([0, 1, 2], [2, 5, 8], BLOCK)
    assert torch.equal(masks[2], window)
    as_pattern = attention_layouts.pattern_mask("pyramid", HEADS[2]["params"], 5, 5, False, block=BLOCK)
    assert torch.equal(as_pattern, window)
    with pytest.raises(ValueError, match="near part"):
        attention_layouts.table([{"pattern": "pyramid", "params": {"near": "dense"}}])


@pytest.mark.parametrize("length", [L, 75])  # 75: a partial last key block (n_J = 11)
def test_reference_is_the_pooled_formula(length):
    heads = _heads(length)
    table = attention_layouts.table(heads, block=BLOCK)
    q, k, v = _qkv(length=length)
    got = bsa.reference(q, k, v, table, None, BLOCK, False, 0.3)
    torch.testing.assert_close(got, _by_hand(q, k, v, table, BLOCK, 0.3), rtol=1e-5, atol=1e-5)


def test_without_pyramid_heads_nothing_changes():
    plain = [h if h["pattern"] != "pyramid" else {"pattern": "local", "params": {"window": 1}} for h in HEADS]
    table = attention_layouts.table(plain, block=BLOCK)
    q, k, v = _qkv()
    assert bsa.pooled_of(table, None, False) is None
    s = (q * 0.3) @ bsa.repeat_kv(k, 4).transpose(-1, -2)
    listed = attention_layouts.block_mask(table, 5, 5, False).repeat_interleave(BLOCK, 1).repeat_interleave(
        BLOCK, 2)
    want = torch.softmax(s.masked_fill(~listed, float("-inf")), -1) @ bsa.repeat_kv(v, 4)
    torch.testing.assert_close(bsa.reference(q, k, v, table, None, BLOCK, False, 0.3), want)


@pytest.mark.parametrize("length", [L, 75])
def test_cpu_paths_match_the_reference(cpu_path, length):
    heads = _heads(length)
    table = attention_layouts.table(heads, block=BLOCK)
    q, k, v = _qkv(length=length)
    ref = bsa.reference(q, k, v, table, None, BLOCK, False, 0.3)
    with use_backend("eager"):
        got = bsa.OP(q, k, v, table, None, BLOCK, False, 0.3)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_far_part_is_computed_in_row_chunks_exactly():
    table = attention_layouts.table(HEADS, block=BLOCK)
    q, k, v = _qkv()
    lists = bsa.lists(q, k, v, table, BLOCK, False)
    heads = torch.tensor([0, 2])
    whole, whole_lse = bsa.far(q, k, v, lists, heads, BLOCK, 0.3)
    parts, parts_lse = bsa.far(q, k, v, lists, heads, BLOCK, 0.3, rows=BLOCK)
    torch.testing.assert_close(parts, whole)
    torch.testing.assert_close(parts_lse, whole_lse)


def test_pyramid_heads_refuse_a_mask_or_causal_attention():
    table = attention_layouts.table(HEADS, block=BLOCK)
    q, k, v = _qkv()
    mask = torch.zeros(2, 1, 1, L)
    with pytest.raises(ValueError, match=r"pyramid head.*masked"):
        bsa.reference(q, k, v, table, mask, BLOCK, False, 0.3)
    plain = attention_layouts.table([HEADS[0]] * 4, block=BLOCK)
    with pytest.raises(ValueError, match=r"pyramid head.*causal"):
        bsa.cpu(q, k, v, plain, None, BLOCK, True, 0.3)


def test_gradients_flow_through_the_pooled_keys():
    table = attention_layouts.table([HEADS[0], HEADS[3]])
    q, k, v = (t.double().requires_grad_() for t in _qkv(B=1, H=2, Hkv=1, length=11, E=3))  # blocks 4, 4, 3
    with use_backend("reference"):  # the CPU kernels compute in fp32: too coarse for finite differences
        assert torch.autograd.gradcheck(lambda *a: bsa.OP(*a, table, None, 4, False, 0.5), (q, k, v))


def test_dynamic_op_reads_pyramid_heads_of_its_table(cpu_path):
    table = attention_layouts.table(HEADS, block=BLOCK)
    topk = torch.tensor([0, 0, 0, 2])  # the last head: its local band and its 2 best blocks per input
    q, k, v = _qkv()
    ref = dyn.reference(q, k, v, table, topk, None, BLOCK, False, 0.3)
    # pyramid heads are static: as in the static op
    static = bsa.reference(q, k, v, table, None, BLOCK, False, 0.3)
    torch.testing.assert_close(ref[:, [0, 2]], static[:, [0, 2]])
    with use_backend("eager"):
        got = dyn.OP(q, k, v, table, topk, None, BLOCK, False, 0.3)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_matches_the_reference():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    table = attention_layouts.table(HEADS, block=BLOCK)
    q, k, v = (t.to(device) for t in _qkv(B=1))
    ref = bsa.reference(q, k, v, table, None, BLOCK, False, 0.3)
    with use_backend("triton"):
        got = bsa.OP(q, k, v, table, None, BLOCK, False, 0.3)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


class _Attention(torch.nn.Module):
    def __init__(self, table, topk=None):
        super().__init__()
        self.register_buffer("table", table)
        self.register_buffer("topk", topk if topk is not None else torch.zeros(0))

    def forward(self, q, k, v):
        if self.topk.numel():
            return dyn.OP(q, k, v, self.table, self.topk, None, BLOCK, False, 0.3)
        return bsa.OP(q, k, v, self.table, None, BLOCK, False, 0.3)


@pytest.mark.parametrize("dynamic", [False, True])
def test_onnx_translation_matches_in_onnxruntime(dynamic, tmp_path):
    table = attention_layouts.table(HEADS, block=BLOCK)
    module = _Attention(table, torch.tensor([0, 0, 0, 2]) if dynamic else None)
    args = _qkv(seed=3)
    gm = torch.fx.symbolic_trace(module)
    path = export_onnx(gm, tmp_path / "pyramid.onnx", args)
    assert {"ReduceSum", "Concat"} <= {n.op_type for n in onnx.load(str(path)).graph.node}
    with use_backend("reference"):
        ref = module(*args)
    torch.testing.assert_close(OnnxModel(path, gm)(*args), ref, rtol=1e-4, atol=1e-4)


def test_cost_counts_the_pooled_keys():
    import sparsegraph as sg

    heads = [HEADS[0], HEADS[1]]  # a pyramid over the diagonal, a dense head
    q, k, v = _qkv(B=1, H=2, Hkv=2, E=8)
    gm = sg.trace(_Attention(attention_layouts.table(heads)), (q, k, v))
    node = next(n for n in gm.graph.nodes if n.target is bsa.OP.overload)
    macs, _ = bsa.OP.cost(node)
    listed = 5 * BLOCK * BLOCK + 25 * BLOCK * BLOCK  # the diagonal's pairs, the dense head's
    assert macs == (listed + L * 5) * (8 + 8)  # and L queries × 5 pooled keys
