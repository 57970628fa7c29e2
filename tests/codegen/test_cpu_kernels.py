"""The compiled CPU kernels (codegen/cpu_kernels): built, loaded, and equal to the reference."""

import itertools
import math
import platform
import re
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsegraph.attention_layouts import layout_from_block_mask
from sparsegraph.codegen import block_sparse_attention as bsa
from sparsegraph.codegen import cpu_kernels

native = pytest.mark.skipif(cpu_kernels.library() is None,
                            reason=f"compiled CPU kernels: {cpu_kernels.status()}")


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")) or platform.system() != "Linux",
                    reason="no C++ compiler on this Linux machine, so the optional build was skipped")
def test_the_kernels_are_built_where_a_compiler_exists():
    assert cpu_kernels.library() is not None, cpu_kernels.status()


def test_turned_off_says_so(monkeypatch):
    monkeypatch.setenv("SPARSEGRAPH_NATIVE", "0")
    assert cpu_kernels.library() is None and "SPARSEGRAPH_NATIVE=0" in cpu_kernels.status()
    assert cpu_kernels.block_sparse_attention(*[torch.zeros(1, 1, 4, 4)] * 3,
                                              torch.zeros(1, 1, 1, dtype=torch.long),
                                              None, 4, False, 1.0) is None


@pytest.fixture
def reload(monkeypatch):
    """Patches (through the returned monkeypatch) under which the library is looked up again; the
    cache is cleared after the test too, so later tests load the real library."""
    cpu_kernels._load.cache_clear()
    yield monkeypatch
    cpu_kernels._load.cache_clear()


@native
def test_a_library_built_from_other_sources_is_refused_not_called(reload):
    """The sources were edited after the build (their hash moved): the old library is not called."""
    reload.setattr(cpu_kernels, "source_hash", lambda: "0" * 64)
    assert cpu_kernels.library() is None and "built from other sources" in cpu_kernels.status()


def test_the_source_stamp_is_current():
    """The stamp in the sources is their hash: edit a .cpp and this fails until it is restamped."""
    for path in cpu_kernels.SOURCES:
        stamp = cpu_kernels._STAMP.search(path.read_text()).group(2)
        assert stamp == cpu_kernels.source_hash(), (
            f"{path.name}: stale SG_SOURCE_HASH; run `python -m sparsegraph.codegen.cpu_kernels`, then "
            "reinstall")


def test_the_c_prototypes_are_the_binding():
    """The ctypes types come from the extern "C" definitions: one declaration, read the same way."""
    import ctypes

    found = cpu_kernels.signatures(cpu_kernels.SOURCES[0].read_text())
    restype, argtypes = found["sg_block_sparse_attention_f32"]
    assert restype is ctypes.c_int and len(argtypes) == 28
    # q, qs, k, ks, v, vs, out, the pooled keys (kbar, kbs, vbar, vbs, logn, heads), layout; then nsel
    assert argtypes[:14] == [ctypes.c_void_p] * 14 and argtypes[14] is ctypes.c_int64
    assert argtypes[-3:] == [ctypes.c_int, ctypes.c_float, ctypes.c_int]
    assert found["sg_source_hash"] == (ctypes.c_char_p, [])


def test_a_build_for_another_cpu_is_refused_not_called(reload):
    """A library whose instruction sets this CPU lacks would die on an illegal instruction: refused."""

    class ForeignBuild:
        class sg_source_hash:  # a current build's stamp
            restype = None

            def __new__(cls):
                return cpu_kernels.source_hash().encode()

        def sg_cpu_supported(self):
            return 0

    reload.setattr(cpu_kernels.ctypes, "CDLL", lambda path: ForeignBuild())
    reload.setattr(cpu_kernels.importlib.util, "find_spec",
                   lambda name: type("Spec", (), {"origin": "/elsewhere/_native.so"})())
    assert cpu_kernels.library() is None and "built for another CPU" in cpu_kernels.status()


@native
def test_this_cpu_runs_the_build():
    assert cpu_kernels.library().sg_cpu_supported() == 1


def _masks(B, H, L, S, g):
    padding = torch.zeros(B, 1, 1, S)
    padding[-1, ..., S - max(1, S // 3):] = float("-inf")
    per_query = torch.randn(B, H, L, S, generator=g)
    per_query[0, 0, 0] = float("-inf")  # a query that sees nothing: 0
    return {"none": None, "padding": padding, "padding over queries": padding.expand(B, 1, L, S),
            "per query": per_query, "per query, shared by heads": per_query[:, :1]}


@native
@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), kv=st.integers(1, 3), group=st.integers(1, 2), L=st.integers(1, 90),
       extra_keys=st.integers(0, 20), E=st.integers(1, 40), Ev=st.integers(1, 40),
       block=st.sampled_from([4, 16, 24, 64]), causal=st.booleans(), density=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**16))
def test_kernel_matches_the_reference(B, kv, group, L, extra_keys, E, Ev, block, causal, density, seed):
    """Any shape (partial blocks, odd head dims, GQA, more keys than queries), any mask, any layout."""
    g = torch.Generator().manual_seed(seed)
    H, S = kv * group, L + extra_keys
    q, k = torch.randn(B, H, L, E, generator=g), torch.randn(B, kv, S, E, generator=g)
    v = torch.randn(B, kv, S, Ev, generator=g)
    bm = torch.rand(H, math.ceil(L / block), math.ceil(S / block), generator=g) < density
    layout = layout_from_block_mask(bm)
    for name, mask in _masks(B, H, L, S, g).items():
        want = bsa.reference_lists(q, k, v, layout, mask, block, causal, E ** -0.5)
        got = cpu_kernels.block_sparse_attention(q, k, v, layout, None if mask is None else
                                                 bsa._full_mask(mask, B, H, L, S), block, causal, E ** -0.5)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"mask {name}")


@native
def test_strided_inputs_are_read_in_place():
    """q/k/v as [B, L, H, E] transposed views (what attention modules pass) give the same result."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 50, 4, 16, generator=g).transpose(1, 2) for _ in range(3))
    layout = layout_from_block_mask(torch.rand(4, 4, 4, generator=g) < 0.5)
    got = cpu_kernels.block_sparse_attention(q, k, v, layout, None, 16, True, 0.25)
    want = cpu_kernels.block_sparse_attention(*(t.contiguous() for t in (q, k, v)), layout, None,
                                              16, True, 0.25)
    assert torch.equal(got, want)
    torch.testing.assert_close(got, bsa.reference_lists(q, k, v, layout, None, 16, True, 0.25), rtol=1e-5,
                               atol=1e-5)


@native
def test_result_does_not_depend_on_the_thread_count():
    """Each (batch, head, query block) is computed by one thread in a fixed order: bit-identical."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 3, 200, 32, generator=g) for _ in range(3))
    layout = layout_from_block_mask(torch.rand(3, 13, 13, generator=g) < 0.4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernels.block_sparse_attention(q, k, v, layout, None, 16, False, 0.2)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, cpu_kernels.block_sparse_attention(q, k, v, layout, None, 16, False, 0.2))


@native
@pytest.mark.parametrize("causal", [False, True])
def test_every_mask_layout_matches_the_reference(causal):
    """A mask constant over queries (one broadcast per key), one varying over queries (transposed by
    the binding: a vector load per key on full query chunks, a load per lane on the partial last one),
    per head or shared, with padding and a row that sees nothing."""
    B, H, L, E, block = 2, 4, 100, 16, 64  # query blocks of 64 (two full chunks) and 36 (a partial one)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, H, L, E, generator=g) for _ in range(3))
    layout = layout_from_block_mask(torch.rand(H, 2, 2, generator=g) < 0.7)
    for name, mask in _masks(B, H, L, L, g).items():
        want = bsa.reference_lists(q, k, v, layout, mask, block, causal, 0.25)
        full = None if mask is None else bsa._full_mask(mask, B, H, L, L)
        got = cpu_kernels.block_sparse_attention(q, k, v, layout, full, block, causal, 0.25)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"mask {name}")


@native
@pytest.mark.parametrize("shape", [
    (2, 4, 2, 100, 100, 16, 64),  # GQA; query blocks of 64 (chunks of 4 vectors with AVX-512) and 36
    (2, 3, 1, 70, 90, 12, 16),    # MQA, more keys than queries, partial last blocks of both
    (1, 2, 2, 50, 50, 8, 24),     # a block that is not a power of two
    (1, 2, 2, 600, 600, 8, 8),    # more pooled keys (75) than a block: read `block` at a time
])
def test_kernel_reads_pyramid_heads_pooled_keys_in_the_same_pass(shape):
    """Pyramid heads (pooled keys given) match the reference, which appends the pooled keys to the keys:
    a query block listing nothing reads only pooled keys, one listing everything none; other heads are
    the same bits as without pooled keys."""
    B, H, Hkv, L, S, E, block = shape
    g = torch.Generator().manual_seed(L + block)
    q, k = torch.randn(B, H, L, E, generator=g), torch.randn(B, Hkv, S, E, generator=g)
    v = torch.randn(B, Hkv, S, E, generator=g)
    bm = torch.rand(H, math.ceil(L / block), math.ceil(S / block), generator=g) < 0.3
    bm[0, 0] = True
    bm[-1, -1] = False  # a query block listing nothing
    bm[-1, 0] = True  # one listing everything
    layout = layout_from_block_mask(bm)
    pooled = torch.zeros(H, dtype=torch.bool)
    pooled[-1] = True
    args = (q, k, v, layout, None, block, False, E ** -0.5)
    got = cpu_kernels.block_sparse_attention(*args, (*bsa.pooled_keys(k, v, block), pooled))
    want = bsa.reference_lists(*args, pooled)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[:, :-1], cpu_kernels.block_sparse_attention(*args)[:, :-1])


# --- the sparse GEMV (sparse_gemv.cpp): sparsegraph::sparse_linear for up to 4 rows -----------------

def _exact(x, w_t, b, c, threshold, k):
    """The op in float64 (on the kept set and centred input the op computes in x's dtype) and
    Σ_j |a_j w_jo| + |b_o|: an fp32 dot product of n terms, summed in any order, is within n·2^-24 times
    that of the exact value (the classical bound), so the kernel is held to it rather than to another
    fp32 result that rounds in its own order (the kernel sums in index order with FMAs)."""
    from sparsegraph.codegen.sparse_linear import _centred_kept

    a, keep = _centred_kept(x, c, threshold, k)
    a = torch.where(keep, a, torch.zeros_like(a)).double()
    bias = torch.zeros(w_t.shape[1], dtype=torch.float64) if b is None else b.double()
    return a @ w_t.double() + bias, a.abs().nan_to_num(0.0) @ w_t.double().abs() + bias.abs()


def _assert_exact(got, x, w_t, b, c, threshold, k, relative=0.0):
    """got within the fp32 summation bound of the exact op (+ `relative` · |y|: a half-precision
    result's one rounding), NaN exactly where the exact op has NaN."""
    want, scale = _exact(x, w_t, b, c, threshold, k)
    assert got.shape == want.shape and got.dtype == x.dtype
    got = got.double()
    assert torch.equal(got.isnan(), want.isnan())
    err = (got - want).abs().nan_to_num(0.0)
    allowed = (x.shape[-1] + 1) * 2.0 ** -24 * scale + relative * want.abs().nan_to_num(0.0)
    assert (err <= allowed).all(), f"max error {(err - allowed).max().item():.3g} over the bound"


def _gemv_case(rows, in_f, out_f, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x, w_t = torch.randn(rows, in_f, generator=g), torch.randn(in_f, out_f, generator=g)
    b, c = torch.randn(out_f, generator=g), torch.randn(in_f, generator=g) * 0.1
    return (t.to(dtype) for t in (x, w_t, b, c))


@native
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("in_f,out_f", [(37, 53), (16, 16), (301, 1111), (67, 4111)])
def test_sparse_gemv_matches_the_reference(rows, in_f, out_f):
    """Odd sizes (columns past the last whole vector, one and several panels of y; two threads where
    over 1 MB of weight is kept: 301→1111 and 67→4111 with everything kept), every threshold regime
    (all kept: threshold 0 and −1; none but NaN: 1e9), top-k, centre and bias or not, a NaN input
    (kept: its row is NaN, the others exact); one thread and two give the same bits (each column is
    summed by one thread in one order)."""
    x, w_t, b, c = _gemv_case(rows, in_f, out_f, seed=rows * in_f)
    x[-1, in_f // 2] = float("nan")
    threads = torch.get_num_threads()
    for threshold, k, centre, bias in itertools.product([0.0, 0.7, 1e9, -1.0], [0, 5], [None, c], [None, b]):
        got = cpu_kernels.sparse_gemv(x, w_t, bias, centre, threshold, k)
        _assert_exact(got, x, w_t, bias, centre, threshold, k)
        try:
            torch.set_num_threads(1)
            assert torch.equal(cpu_kernels.sparse_gemv(x, w_t, bias, centre, threshold, k).nan_to_num(7.0),
                               got.nan_to_num(7.0))
        finally:
            torch.set_num_threads(threads)


@native
def test_sparse_gemv_keeps_nothing_but_the_bias_above_every_input():
    x, w_t, b, c = _gemv_case(3, 37, 53, seed=1)
    assert torch.equal(cpu_kernels.sparse_gemv(x, w_t, b, c, 1e9, 0), b.expand(3, 53))
    assert torch.equal(cpu_kernels.sparse_gemv(x, w_t, None, c, 1e9, 0), torch.zeros(3, 53))


@native
def test_sparse_gemv_top_k_keeps_ties():
    """Top-k keeps every |a| equal to the k-th largest, as `|a| ≥ kth` does (so more than k)."""
    x = torch.tensor([[3.0, -2.0, 2.0, 1.0, -3.0, 0.5], [1.0, 2.0, 3.0, 9.0, 8.0, 7.0]])
    got = cpu_kernels.sparse_gemv(x, torch.eye(6), None, None, 0.0, 3)
    assert torch.equal(got, torch.tensor([[3.0, -2.0, 2.0, 0.0, -3.0, 0.0], [0.0, 0.0, 0.0, 9.0, 8.0, 7.0]]))


@native
def test_sparse_gemv_reads_strided_tensors_in_place():
    """x as a transposed view, every other column, or 3-d; bias and centre every other element; a
    weight whose rows are padded: the same values read in the same order, so bit-identical."""
    x, w_t, b, c = _gemv_case(3, 37, 53, seed=2)
    want = cpu_kernels.sparse_gemv(x, w_t, b, c, 0.5, 0)
    wide = torch.zeros(37, 64)
    wide[:, :53] = w_t
    views = {"x transposed": (x.t().contiguous().t(), w_t, b, c),
             "x every other column": (torch.stack([x, x], -1).flatten(1)[:, ::2], w_t, b, c),
             "x 3-d": (x.t().contiguous().t().reshape(3, 1, 37), w_t, b, c),
             "padded weight rows": (x, wide[:, :53], b, c),
             "strided bias and centre": (x, w_t, torch.stack([b, b], -1).flatten()[::2],
                                         torch.stack([c, c], -1).flatten()[::2])}
    for name, (xv, wv, bv, cv) in views.items():
        assert not all(t.is_contiguous() for t in (xv, wv, bv, cv)), name
        got = cpu_kernels.sparse_gemv(xv, wv, bv, cv, 0.5, 0)
        assert torch.equal(got.reshape(3, 53), want), name
    _assert_exact(want, x, w_t, b, c, 0.5, 0)


@native
@pytest.mark.parametrize("dtype,ulp", [(torch.bfloat16, 2.0 ** -8), (torch.float16, 2.0 ** -11)])
def test_sparse_gemv_half_precision(dtype, ulp):
    """bf16/fp16: the same kept set as torch (a = x − c and the threshold rounded to the dtype), fp32
    accumulation, the result rounded once (half an ulp; the bound allows one)."""
    for rows in (1, 4):
        x, w_t, b, c = _gemv_case(rows, 301, 133, seed=rows, dtype=dtype)
        for threshold, k in ((0.6, 0), (0.0, 40)):
            got = cpu_kernels.sparse_gemv(x, w_t, b, c, threshold, k)
            _assert_exact(got, x, w_t, b, c, threshold, k, relative=ulp)


@native
def test_sparse_gemv_declines_what_it_does_not_take():
    """None (the op then runs its torch path) for more than 4 rows, k > in, mixed or other dtypes, a
    weight whose columns are not adjacent."""
    x, w_t, b, c = _gemv_case(5, 37, 53, seed=3)
    assert cpu_kernels.sparse_gemv(x, w_t, b, c, 0.5, 0) is None
    assert cpu_kernels.sparse_gemv(x[:4], w_t, b, c, 0.5, 0) is not None
    assert cpu_kernels.sparse_gemv(x[:1], w_t, b, c, 0.0, 38) is None
    assert cpu_kernels.sparse_gemv(x[:1], w_t, b.double(), c, 0.5, 0) is None
    assert cpu_kernels.sparse_gemv(x[:1].double(), w_t.double(), None, None, 0.5, 0) is None
    assert cpu_kernels.sparse_gemv(x[:1], w_t.t().contiguous().t(), b, c, 0.5, 0) is None


def test_sparse_gemv_turned_off_says_none(monkeypatch):
    monkeypatch.setenv("SPARSEGRAPH_NATIVE", "0")
    x, w_t, b, c = _gemv_case(1, 37, 53, seed=4)
    assert cpu_kernels.sparse_gemv(x, w_t, b, c, 0.5, 0) is None


def test_the_gemv_call_record_is_the_binding():
    """The binding packs one call's arguments in the order of `struct SgGemvCall` in the C source, all
    8-byte fields (pointers, int64_t, the double threshold last): the two must agree field by field."""
    text = cpu_kernels.SOURCES[1].read_text()
    body = re.search(r"struct SgGemvCall \{(.*?)\n\};", text, re.S).group(1)
    fields = []
    for declaration in re.sub(r"//[^\n]*", "", body).split(";"):
        if declaration.strip():
            kind, names = re.match(r"\s*((?:const )?\w+\*?)\s+(.*)", declaration, re.S).groups()
            fields += [(kind, name.strip()) for name in names.split(",")]
    assert tuple(name for _, name in fields) == cpu_kernels._GEMV_FIELDS
    assert all(kind in ("int64_t", "const void*", "void*") for kind, _ in fields[:-1])
    assert fields[-1][0] == "double" and cpu_kernels._GEMV_CALL.size == 8 * len(fields)
