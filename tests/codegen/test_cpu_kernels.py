"""The compiled CPU kernels (codegen/cpu_kernels): built, loaded, and equal to the reference."""

import math
import platform
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
    assert restype is ctypes.c_int and len(argtypes) == 22
    assert argtypes[:8] == [ctypes.c_void_p] * 8 and argtypes[8] is ctypes.c_int64
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
