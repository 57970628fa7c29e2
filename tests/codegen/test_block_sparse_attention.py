"""sparsegraph::block_sparse_attention through every backend: reference, CPU, Triton, ONNX Runtime."""

import math
import warnings

import onnx
import pytest
import torch
import torch.nn.functional as F

from sparsegraph import attention_layouts
from sparsegraph.attention_layouts import LayoutWarning, fixed_table, layout_from_block_mask
from sparsegraph.codegen import attention_fallback, triton_available, use_backend
from sparsegraph.codegen import block_sparse_attention as bsa
from sparsegraph.codegen.block_sparse_attention import OP
from sparsegraph.onnx_export import OnnxModel, export_onnx

SHAPES = [  # batch, heads, kv heads, L, S, head dim, block
    (2, 4, 2, 70, 70, 16, 16),   # GQA, length not a multiple of the block
    (1, 2, 2, 64, 64, 8, 16),    # exact multiple
    (2, 4, 1, 33, 33, 8, 8),     # one kv head (MQA)
    (1, 2, 2, 40, 72, 8, 16),    # cross-length: more keys than queries
]


def _case(B, H, Hkv, L, S, E, block, *, uniform=False, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, E, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S, E, generator=g).to(dtype)
    v = torch.randn(B, Hkv, S, E, generator=g).to(dtype)
    nq, nk = math.ceil(L / block), math.ceil(S / block)
    if uniform:  # every row lists the same number of blocks: the CPU path's single-call case
        bm = torch.zeros(H, nq, nk, dtype=torch.bool)
        bm[:, :, 0] = True
        bm[:, torch.arange(nq), torch.arange(nq).clamp(max=nk - 1)] = True
    else:
        bm = torch.rand(H, nq, nk, generator=g) < 0.4
    return q, k, v, fixed_table(bm), bm


def _masks(B, H, L, S, seed=1):
    g = torch.Generator().manual_seed(seed)
    padding = torch.zeros(B, 1, 1, S)
    padding[-1, ..., S - 5:] = float("-inf")
    return {"none": None, "padding": padding, "padding expanded": padding.expand(B, 1, L, S).contiguous(),
            "full": torch.randn(B, H, L, S, generator=g),
            "2d": torch.randn(L, S, generator=g)}


def _dense_oracle(q, k, v, bm, mask, block, causal, scale):
    """An independent oracle: SDPA with the block mask expanded by hand (rows with no key → 0)."""
    H, L, S = q.shape[1], q.shape[2], k.shape[2]
    allowed = bm.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :L, :S]
    if causal:
        allowed = allowed & torch.ones(L, S, dtype=torch.bool).tril()
    bias = torch.zeros(L, S).masked_fill(~allowed, float("-inf"))
    if mask is not None:
        bias = bias + mask
    group = H // k.shape[1]
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                         attn_mask=bias, scale=scale)
    return out.nan_to_num(0.0)


def test_layout_round_trips_through_the_block_mask():
    bm = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0)) < 0.3
    bm[0, 0] = False  # an empty row
    layout = layout_from_block_mask(bm)
    assert layout.dtype == torch.int64 and layout.shape[-1] == int(bm.sum(-1).max())
    assert (layout[0, 0] == -1).all()
    assert torch.equal(attention_layouts.block_mask_from_layout(layout, 7), bm)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_reference_is_masked_dense_attention(shape, causal):
    B, H, _Hkv, L, S, E, block = shape
    q, k, v, layout, bm = _case(*shape)
    for name, mask in _masks(B, H, L, S).items():
        got = bsa.reference(q, k, v, layout, mask, block, causal, E ** -0.5)
        want = _dense_oracle(q, k, v, bm, mask, block, causal, E ** -0.5)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"mask {name}")


def test_full_layout_is_sdpa():
    q, k, v, _, _ = _case(2, 4, 2, 70, 70, 16, 16)
    full = fixed_table(torch.ones(4, 5, 5, dtype=torch.bool))
    for causal in (False, True):
        want = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        torch.testing.assert_close(bsa.reference(q, k, v, full, None, 16, causal, 0.25), want,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("uniform", [False, True])
def test_cpu_matches_reference(cpu_path, shape, causal, uniform):
    B, H, _Hkv, L, S, E, block = shape
    q, k, v, layout, _ = _case(*shape, uniform=uniform)
    for name, mask in _masks(B, H, L, S).items():
        ref = bsa.reference(q, k, v, layout, mask, block, causal, E ** -0.5)
        with use_backend("eager"):
            got = OP(q, k, v, layout, mask, block, causal, E ** -0.5)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=f"mask {name}")


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_dense_heads_match_the_oracle(cpu_path, causal):
    """Dense heads (the torch path: plain SDPA, no gather) mixed with sparse heads all match the oracle."""
    B, H, Hkv, L, E, block = 2, 4, 2, 70, 16, 16
    q, k, v, _, bm = _case(B, H, Hkv, L, L, E, block)
    bm[1] = True  # head 1 dense
    bm[2] = torch.ones(5, 5, dtype=torch.bool).tril() if causal else True
    layout = fixed_table(bm)
    for name, mask in _masks(B, H, L, L).items():
        ref = bsa.reference(q, k, v, layout, mask, block, causal, 0.25)
        torch.testing.assert_close(bsa.cpu(q, k, v, layout, mask, block, causal, 0.25), ref, rtol=1e-5,
                                   atol=1e-5, msg=f"mask {name}")


def _reference_lse(q, k, lists, mask, block, causal, scale):
    """log Σ_j e^{score} over each query's allowed keys, densely (−inf for a query with none): [B, H, L]."""
    H, L, S = q.shape[1], q.shape[2], k.shape[2]
    s = (q.float() * scale) @ bsa.repeat_kv(k, H).float().transpose(-1, -2)
    if mask is not None:
        s = s + mask
    return torch.logsumexp(s.masked_fill(~bsa._element_mask(lists, L, S, block, causal), float("-inf")), -1)


def _assert_lse(got, want, msg):
    assert got.dtype == torch.float32 and got.shape == want.shape and got.is_contiguous(), msg
    assert torch.equal(got == float("-inf"), want == float("-inf")), msg  # the rows with no allowed key
    finite = want.isfinite()
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5, msg=msg)


def _lse_case(B, H, Hkv, L, E, block, causal, seed=0):
    """Heads that take every path of the torch fallback: dense (columns tiles), local (bands), random
    blocks and one with an empty row (gathered); a key-padding mask, a full mask with a row of −inf."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, L, E, generator=g) for h in (H, Hkv, Hkv))
    nq = math.ceil(L / block)
    bm = torch.rand(H, nq, nq, generator=g) < 0.4
    bm[0] = True
    bm[1] = attention_layouts.pattern_mask("local", {"window": 2}, nq, nq, causal)
    bm[3, 2] = False  # a query block listing nothing
    bm[3, 0, 0] = True
    lists = bsa.lists(q, k, v, fixed_table(bm), block, causal)
    masks = _masks(B, H, L, L)
    masks["full"][0, 0, 7] = float("-inf")  # a query of the dense head whose every key is masked
    return q, k, v, lists, masks


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("tile", [True, False])
def test_fallback_returns_the_log_sum_exp(causal, tile):
    """attention_fallback.attention(lse=True): (out, lse), lse the log-sum-exp of each query's allowed
    scores, merged over the tiles and gathers; −inf for a query with no allowed key (a query block no call
    wrote, a query whose keys are all masked); out the same as without it. GQA, a partial last block."""
    B, H, Hkv, L, E, block = 2, 4, 2, 300, 8, 16  # 19 query blocks, the last of 12 rows; 304 keys ≥ MIN_KEYS
    q, k, v, lists, masks = _lse_case(B, H, Hkv, L, E, block, causal)
    for name, mask in masks.items():
        full = None if mask is None else bsa._full_mask(mask, B, H, L, L)
        out, lse = attention_fallback.attention(q, k, v, lists, full, block, causal, 0.3, tile=tile, lse=True)
        torch.testing.assert_close(out, attention_fallback.attention(q, k, v, lists, full, block, causal, 0.3,
                                                                     tile=tile), rtol=0, atol=0)
        want = _reference_lse(q, k, lists, mask, block, causal, 0.3)
        assert (want == float("-inf")).any(), "the case has a query with no allowed key"
        _assert_lse(lse, want, f"mask {name}")


def test_the_compiled_kernel_leaves_dense_heads_to_sdpa(monkeypatch):
    """Without a mask, not causal: the kernel gets the dense heads' lists emptied (and the lists trimmed to
    the sparse heads' longest), and one SDPA call computes those heads; the result is the oracle's. With a
    mask, every head stays in the kernel."""
    from sparsegraph.codegen import cpu_kernels

    if cpu_kernels.library() is None:
        pytest.skip(f"compiled CPU kernels: {cpu_kernels.status()}")
    B, H, Hkv, L, E, block = 2, 4, 2, 70, 16, 16
    q, k, v, _, bm = _case(B, H, Hkv, L, L, E, block)
    bm[1] = bm[3] = True  # heads 1 and 3 dense
    bm[0] = bm[2] = torch.eye(5, dtype=torch.bool)
    layout = fixed_table(bm)
    seen, calls = [], []
    kernel, sdpa = cpu_kernels.block_sparse_attention, F.scaled_dot_product_attention
    monkeypatch.setattr(cpu_kernels, "block_sparse_attention", lambda q, k, v, lists, *a: seen.append(lists)
                        or kernel(q, k, v, lists, *a))
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, *a, **kw: calls.append(q.shape[1])
                        or sdpa(q, *a, **kw))
    got = bsa.cpu(q, k, v, layout, None, block, False, 0.25)
    torch.testing.assert_close(got, bsa.reference(q, k, v, layout, None, block, False, 0.25), rtol=1e-5,
                               atol=1e-5)
    assert calls == [2] and seen[0].shape == (H, 5, 1)
    assert (seen[0][[1, 3]] == -1).all() and seen[0][[0, 2], :, 0].tolist() == [list(range(5))] * 2
    seen.clear(), calls.clear()
    mask = torch.zeros(B, 1, 1, L)
    torch.testing.assert_close(bsa.cpu(q, k, v, layout, mask, block, False, 0.25),
                               bsa.reference(q, k, v, layout, mask, block, False, 0.25), rtol=1e-5, atol=1e-5)
    assert calls == [] and seen[0].shape == (H, 5, 5)


def test_cpu_never_builds_the_dense_score_matrix(torch_path, monkeypatch):
    """The torch CPU path's attention calls see only listed blocks: no call reads every key, and the
    (query, key) pairs computed are those of the listed blocks."""
    from sparsegraph.codegen import attention_tiles

    q, k, v, layout, bm = _case(1, 2, 2, 128, 128, 8, 16)
    seen = []
    real = attention_tiles.attend

    def spy(q_, k_, *args, **kw):
        seen.append((q_.shape[:-2].numel(), q_.shape[-2], k_.shape[-2]))
        return real(q_, k_, *args, **kw)

    monkeypatch.setattr(attention_tiles, "attend", spy)
    bsa.cpu(q, k, v, layout, None, 16, False, 0.3)
    assert seen and all(lk < 128 for _, _, lk in seen)
    assert sum(n * lq * lk for n, lq, lk in seen) == int(bm.sum()) * 16 * 16


def test_row_with_no_allowed_key_is_zero(cpu_path):
    q, k, v, _, _ = _case(1, 2, 2, 32, 32, 8, 16)
    bm = torch.ones(2, 2, 2, dtype=torch.bool)
    bm[1, 1] = False
    layout = fixed_table(bm)
    for backend in ("reference", "eager"):
        with use_backend(backend):
            out = OP(q, k, v, layout, None, 16, False, 0.3)
        assert torch.isfinite(out).all() and (out[0, 1, 16:] == 0).all() and (out[0, 0, 16:] != 0).any()


def test_a_fixed_layout_at_another_length_runs_dense_and_warns(cpu_path):
    """A block mask given for one grid (block_topk's kind) is exact at any other length: dense, with a
    warning."""
    q, k, v, layout, _ = _case(1, 2, 2, 64, 64, 8, 16)
    q, k, v = q[:, :, :40], k[:, :, :40], v[:, :, :40]
    for backend in ("reference", "eager"):
        with use_backend(backend), pytest.warns(LayoutWarning, match="run dense"):
            got = OP(q, k, v, layout, None, 16, False, 0.3)
        want = F.scaled_dot_product_attention(q, k, v, scale=0.3)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_malformed_layout_is_refused_with_a_reason():
    q, k, v, _, bm = _case(1, 2, 2, 64, 64, 8, 16)
    with pytest.raises(ValueError, match="layout table"):
        OP(q, k, v, layout_from_block_mask(bm), None, 16, False, 0.3)  # index lists are not a table
    with pytest.raises(ValueError, match="heads=2"):
        OP(q, k, v, fixed_table(bm[:1]), None, 16, False, 0.3)


HEADS = [{"pattern": "local", "params": {"window": 2}},
         {"pattern": "sink_local", "params": {"sinks": 1, "window": 1}},
         {"pattern": "vertical_slash", "params": {"columns": [2], "diagonals": [0, 3]}},
         {"pattern": "multi_diagonal", "params": {"diagonals": [-2, 0, 2]}}]


@pytest.mark.parametrize("length", [16, 31, 64, 100, 257])
@pytest.mark.parametrize("causal", [False, True])
def test_structured_layouts_run_at_any_length(cpu_path, length, causal, tmp_path):
    """One table serves every length: below, at, above and not a multiple of the block, in every backend."""
    g = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(1, 4, length, 8, generator=g) for _ in range(3))
    table = attention_layouts.table(HEADS)
    nq = math.ceil(length / 16)
    bm = torch.stack([attention_layouts.pattern_mask(h["pattern"], h["params"], nq, nq, causal)
                      for h in HEADS])
    want = _dense_oracle(q, k, v, bm, None, 16, causal, 0.3)
    for backend in ("reference", "eager"):
        with use_backend(backend):
            torch.testing.assert_close(OP(q, k, v, table, None, 16, causal, 0.3), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
def test_cpu_half_precision(cpu_path, dtype, tol):
    q, k, v, layout, _ = _case(2, 4, 2, 70, 70, 16, 16, dtype=dtype)
    ref = bsa.reference(q.float(), k.float(), v.float(), layout, None, 16, True, 0.25)
    with use_backend("eager"):
        got = OP(q, k, v, layout, None, 16, True, 0.25)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol)


triton_only = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


@pytest.mark.slow  # interpreted Triton: 3-10 s per case; CI runs it (-m ci)
@pytest.mark.ci
@triton_only
@pytest.mark.parametrize("shape", [s for s in SHAPES if s[-1] >= 16])  # tl.dot: block ≥ 16 (tested below)
@pytest.mark.parametrize("causal", [False, True])
def test_triton_matches_reference(shape, causal):
    B, H, _Hkv, L, S, E, block = shape
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, layout, _ = (t.to(device) for t in _case(*shape))
    masks = _masks(B, H, L, S)
    for name in ("none", "padding", "full"):
        mask = masks[name].to(device) if masks[name] is not None else None
        ref = bsa.reference(q, k, v, layout, mask, block, causal, E ** -0.5)
        with use_backend("triton"):
            got = OP(q, k, v, layout, mask, block, causal, E ** -0.5)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4, msg=f"mask {name}")


@triton_only
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_triton_half_precision_accumulates_in_fp32(dtype, tol):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, layout, _ = (t.to(device) for t in _case(1, 2, 2, 48, 48, 16, 16, dtype=dtype))
    ref = bsa.reference(q.float(), k.float(), v.float(), layout, None, 16, True, 0.25)
    with use_backend("triton"):
        got = OP(q, k, v, layout, None, 16, True, 0.25)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol)


@triton_only
@pytest.mark.parametrize("causal", [False, True])
def test_triton_returns_the_log_sum_exp(causal):
    """lse=True: (out, lse) with lse = m + log(l) of the online softmax, the log-sum-exp of each query's
    allowed scores; −inf for a query with no allowed key; out the same as without it. GQA, a partial
    last block, more keys than queries."""
    from sparsegraph.codegen.triton_kernels.block_sparse_attention import block_sparse_attention

    device = "cuda" if torch.cuda.is_available() else "cpu"
    B, H, Hkv, L, S, E, block = 1, 2, 1, 40, 56, 16, 16
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(B, h, n, E, generator=g) for h, n in ((H, L), (Hkv, S), (Hkv, S)))
    bm = torch.rand(H, 3, 4, generator=g) < 0.5
    bm[0, 0, 0], bm[1, 1] = True, False  # head 1's second query block lists nothing
    lists = layout_from_block_mask(bm)
    full = torch.randn(B, H, L, S, generator=g)
    full[0, 0, 3] = float("-inf")  # a query whose every key is masked
    for name, mask in (("none", None), ("full", full)):
        args = [t.to(device) for t in (q, k, v, lists)] + [None if mask is None else mask.to(device)]
        out, lse = block_sparse_attention(*args, block, causal, 0.3, lse=True)
        torch.testing.assert_close(out, block_sparse_attention(*args, block, causal, 0.3), rtol=0, atol=0)
        want = _reference_lse(q, k, lists, mask, block, causal, 0.3)
        assert lse.device.type == device and (want == float("-inf")).any()
        _assert_lse(lse.cpu(), want, f"mask {name}")


@triton_only
def test_triton_refuses_blocks_tl_dot_cannot_use():
    q, k, v, layout, _ = _case(1, 2, 2, 24, 24, 8, 8)
    with use_backend("triton"), pytest.raises(ValueError, match="power of two"):
        OP(q, k, v, layout, None, 8, False, 0.3)


class _Attention(torch.nn.Module):
    def __init__(self, layout, block, causal):
        super().__init__()
        self.register_buffer("layout", layout)
        self.block, self.causal = block, causal

    def forward(self, q, k, v, mask):
        return OP(q, k, v, self.layout, mask, self.block, self.causal, 0.25)


class _Sequence(torch.nn.Module):
    """The op on [B, L, heads·E] inputs and a bool [B, L] key mask: export keeps batch and length dynamic."""

    def __init__(self, layout, heads, kv_heads, block, causal):
        super().__init__()
        self.register_buffer("layout", layout)
        self.heads, self.kv_heads, self.block, self.causal = heads, kv_heads, block, causal

    def forward(self, q, k, v, keep):
        def split(x, h):
            return x.unflatten(-1, (h, -1)).transpose(1, 2)

        mask = torch.where(keep, 0.0, float("-inf"))[:, None, None, :]
        return OP(split(q, self.heads), split(k, self.kv_heads), split(v, self.kv_heads), self.layout, mask,
                  self.block, self.causal, 0.25)


@pytest.mark.parametrize("length", [40, 72])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("structured", [False, True])
def test_onnx_translation_matches_in_onnxruntime(length, causal, structured, tmp_path):
    """ORT runs the table as PyTorch does: at the traced length, and at other lengths (structured heads
    laid out there; a fixed layout dense there), for any batch."""
    B, H, Hkv, E, block = 2, 4, 2, 16, 16
    _, _, _, layout, _ = _case(B, H, Hkv, length, length, E, block, seed=length)
    if structured:
        layout = attention_layouts.table(HEADS)
    module = _Sequence(layout, H, Hkv, block, causal)

    def inputs(batch, L):
        g = torch.Generator().manual_seed(batch + L)
        keep = torch.ones(batch, L, dtype=torch.bool)
        keep[-1, L - 3:] = False
        return (torch.randn(batch, L, H * E, generator=g), torch.randn(batch, L, Hkv * E, generator=g),
                torch.randn(batch, L, Hkv * E, generator=g), keep)

    gm = torch.fx.symbolic_trace(module)
    path = export_onnx(gm, tmp_path / "bsa.onnx", inputs(B, length))
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"Softmax", "Where", "MatMul"} <= ops
    model = OnnxModel(path, gm)
    for batch, L in ((B, length), (3, length), (1, length + 29), (2, 17)):  # batch and length are dynamic
        args = inputs(batch, L)
        with warnings.catch_warnings(), use_backend("reference"):
            warnings.simplefilter("ignore", LayoutWarning)
            ref = module(*args)
        torch.testing.assert_close(model(*args), ref, rtol=1e-4, atol=1e-4, msg=f"batch {batch}, length {L}")


def test_cost_counts_only_listed_blocks():
    import sparsegraph as sg

    q, k, v, _, _ = _case(1, 2, 2, 64, 64, 8, 16)
    bm = torch.zeros(2, 4, 4, dtype=torch.bool)
    bm[:, torch.arange(4), torch.arange(4)] = True  # 4 of 16 blocks per head
    gm = sg.trace(_Attention(fixed_table(bm), 16, False), (q, k, v, torch.zeros(1, 1, 1, 64)))
    node = next(n for n in gm.graph.nodes if n.target is OP.overload)
    macs, _ = OP.cost(node)
    assert macs == 1 * 2 * 4 * 16 * 16 * (8 + 8)  # listed (query, key) pairs × (E + Ev)


def test_cpu_runs_in_and_out_of_inference_mode_in_any_order(torch_path):
    """The torch path's gather workspace is reused across calls: one made under inference_mode must
    still be writable."""
    attention_fallback._workspaces.__dict__.clear()
    q, k, v, layout, _ = _case(1, 2, 2, 64, 64, 8, 16)
    with torch.inference_mode():
        first = bsa.cpu(q, k, v, layout, None, 16, False, 0.3)
    torch.testing.assert_close(bsa.cpu(q, k, v, layout, None, 16, False, 0.3), first)


def test_cpu_reads_views_of_a_packed_projection(cpu_path):
    """q, k, v as a DiT or ViT makes them (``qkv(x).view(B, L, 3, H, E).permute(2, 0, 3, 1, 4)``: a head's
    rows 3·H·E apart; the compiled kernel copies them to contiguous rows) give the reference's result, and
    so does a table made under inference_mode (no version counter to cache the layout by)."""
    B, H, L, E, block = 2, 3, 96, 8, 16
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(B, L, 3, H, E, generator=g).permute(2, 0, 3, 1, 4)
    assert q.stride(2) == 3 * H * E
    _, _, _, layout, _ = _case(B, H, H, L, L, E, block)
    ref = bsa.reference(q.contiguous(), k.contiguous(), v.contiguous(), layout, None, block, False, E ** -0.5)
    with use_backend("eager"):
        strided = OP(q, k, v, layout, None, block, False, E ** -0.5)
        with torch.inference_mode():
            made_here = layout.clone()
            got = OP(q, k, v, made_here, None, block, False, E ** -0.5)
            again = OP(q, k, v, made_here, None, block, False, E ** -0.5)
    torch.testing.assert_close(strided, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, got, rtol=0, atol=0)
