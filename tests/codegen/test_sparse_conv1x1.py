"""sparsegraph::sparse_conv1x1 through every backend: reference, the compiled CPU kernel (and its AVX2 and
portable builds), Triton (interpreter on CPU), ONNX Runtime; the block-CSR packing; the call record."""

import ctypes
import math
import re
import shutil
import subprocess

import onnx
import pytest
import torch
import torch.nn.functional as F

from sparsegraph.codegen import cpu_kernels, sparse_conv1x1, triton_available, use_backend
from sparsegraph.codegen.sparse_conv1x1 import OP, pack, unpack
from sparsegraph.onnx_export import OnnxModel, export_onnx

# the kernel sums each output in its own order (FMA, channel by channel); conv2d in another
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _case(n=2, c=37, o=45, h=9, w=11, block=1, density=0.3, bias=True, seed=0):
    """x [n, c, h, w], the pruned weight [o, c, 1, 1], bias, and its block-CSR form at `density`."""
    g = torch.Generator().manual_seed(seed)
    rows = -(-o // block)
    kept = torch.rand(rows, c, generator=g) < density
    weight = torch.randn(o, c, generator=g) * kept.repeat_interleave(block, 0)[:o]
    x = torch.randn(n, c, h, w, generator=g)
    b = torch.randn(o, generator=g) if bias else None
    return x, weight[:, :, None, None].contiguous(), b, pack(weight, kept, block)


def _expected(x, weight, bias, lo, hi):
    y = F.conv2d(x, weight, bias)
    return y if lo is None and hi is None else y.clamp(lo, hi)


@pytest.mark.parametrize("block", [1, 2, 4, 8])
def test_pack_is_block_csr_of_the_kept_blocks_and_unpacks_to_the_weight(block):
    _, weight, _, (values, indices, indptr) = _case(o=45, block=block)
    assert values.shape == (indices.numel(), block) and indptr.numel() == -(-45 // block) + 1
    assert indices.dtype == indptr.dtype == torch.int32 and int(indptr[-1]) == indices.numel()
    for b in range(indptr.numel() - 1):  # channels ascend within a block row
        row = indices[indptr[b]:indptr[b + 1]]
        assert bool((row[1:] > row[:-1]).all())
    torch.testing.assert_close(unpack(values, indices, indptr, 45, 37), weight[:, :, 0, 0], rtol=0, atol=0)


@pytest.mark.parametrize("lo,hi", [(None, None), (0.0, 6.0), (0.0, None), (None, 0.25)])
def test_reference_is_conv2d_of_the_pruned_weight_then_the_clamp(lo, hi):
    x, weight, b, packed = _case()
    got = sparse_conv1x1.reference(x, weight, b, *packed, lo, hi)
    torch.testing.assert_close(got, _expected(x, weight, b, lo, hi), rtol=0, atol=0)


# odd channel counts and pixel counts (partial vectors, narrow last tiles), one pixel, many channels (the
# kernel's input-channel chunks), batch > 1
SHAPES = [(1, 17, 23, 5, 7), (3, 5, 9, 3, 50), (2, 40, 71, 1, 1), (2, 301, 19, 10, 20), (1, 64, 96, 14, 14),
          (4, 33, 8, 7, 7)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block", [1, 4])
@pytest.mark.parametrize("lo,hi", [(None, None), (0.0, 6.0)])
def test_cpu_kernel_matches_the_reference(shape, block, lo, hi, cpu_path):
    n, c, o, h, w = shape
    x, weight, b, packed = _case(n, c, o, h, w, block=block)
    with use_backend("eager"):
        got = OP(x, weight, b, *packed, lo, hi)
    torch.testing.assert_close(got, _expected(x, weight, b, lo, hi), **TOL)


@pytest.mark.parametrize("block", [2, 8])
def test_cpu_kernel_every_block_size_without_bias(block, cpu_path):
    x, weight, _, packed = _case(2, 29, 43, 6, 13, block=block, bias=False)
    with use_backend("eager"):
        got = OP(x, weight, None, *packed, None, 1.0)
    torch.testing.assert_close(got, _expected(x, weight, None, None, 1.0), **TOL)


def test_cpu_kernel_edges(cpu_path):
    """Empty rows (output = bias), an all-zero weight, a channels-last input, NaN through the clamp: it
    reaches every output that reads its channel (the dense forms spread it to all outputs at its pixel,
    0·NaN being NaN; the module docstring says so)."""
    x, weight, b, packed = _case(2, 16, 10, 4, 5, density=0.05)
    assert int((packed[2][1:] == packed[2][:-1]).sum()) > 0  # some rows keep nothing
    with use_backend("eager"):
        clamped = _expected(x, weight, b, 0.0, 6.0)
        torch.testing.assert_close(OP(x, weight, b, *packed, 0.0, 6.0), clamped, **TOL)
        zero = torch.zeros(10, 16)
        empty = pack(zero, torch.zeros(10, 16, dtype=torch.bool), 1)
        y = OP(x, zero[:, :, None, None], b, *empty, None, None)
        torch.testing.assert_close(y, b[None, :, None, None].expand_as(y), rtol=0, atol=0)
        x_last = x.to(memory_format=torch.channels_last)
        torch.testing.assert_close(OP(x_last, weight, b, *packed, None, None),
                                   _expected(x, weight, b, None, None), **TOL)
        x_nan = x.clone()
        x_nan[0, :, 1, 2] = float("nan")
        y = OP(x_nan, weight, b, *packed, 0.0, 6.0)
    reads = (packed[2][1:] > packed[2][:-1])  # outputs that keep some channel
    expected = _expected(x, weight, b, 0.0, 6.0)
    if cpu_path == "native":
        expected[0, reads, 1, 2] = float("nan")
    else:  # the torch path is the dense reference
        expected[0, :, 1, 2] = float("nan")
    assert torch.equal(y.isnan(), expected.isnan())
    torch.testing.assert_close(y.nan_to_num(), expected.nan_to_num(), **TOL)


def test_cpu_kernel_takes_a_row_s_entries_in_any_order(cpu_path):
    """Ascending channels (what `pack` writes) keep each chunk's rows in L1; any order is still right."""
    x, weight, b, (values, indices, indptr) = _case(1, 301, 19, 10, 20, block=2)
    for r in range(indptr.numel() - 1):
        lo, hi = int(indptr[r]), int(indptr[r + 1])
        order = torch.arange(lo, hi).flip(0)
        values[lo:hi], indices[lo:hi] = values[order].clone(), indices[order].clone()
    with use_backend("eager"):
        got = OP(x, weight, b, values, indices, indptr, None, None)
    torch.testing.assert_close(got, _expected(x, weight, b, None, None), **TOL)


def test_cpu_kernel_gives_the_same_bits_on_any_number_of_threads():
    """Each output is summed by one thread in the order of its entries, however the work is split."""
    x, weight, b, packed = _case(2, 96, 130, 12, 12)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with use_backend("eager"):
            one = OP(x, weight, b, *packed, 0.0, 6.0)
        torch.set_num_threads(2)
        with use_backend("eager"):
            two = OP(x, weight, b, *packed, 0.0, 6.0)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_the_binding_declines_what_the_kernel_does_not_take():
    x, weight, b, packed = _case()
    assert cpu_kernels.sparse_conv1x1(x.double(), packed[0].double(), *packed[1:], b.double(), 45, None,
                                      None) is None
    values, indices, indptr = pack(weight[:, :, 0, 0], torch.ones(-(-45 // 3), 37, dtype=torch.bool), 3)
    assert cpu_kernels.sparse_conv1x1(x, values, indices, indptr, b, 45, None, None) is None  # block 3
    with use_backend("eager"):  # the op then runs the reference
        torch.testing.assert_close(OP(x.double(), weight.double(), b.double(), *packed, None, None),
                                   _expected(x.double(), weight.double(), b.double(), None, None))


def test_the_conv_call_record_is_the_binding():
    """The binding packs one call's arguments in the order of `struct SgConvCall` in the C source, all
    8-byte fields (pointers, int64_t, the two double bounds last)."""
    text = next(p for p in cpu_kernels.SOURCES if p.name == "sparse_conv1x1.cpp").read_text()
    body = re.search(r"struct SgConvCall \{(.*?)\n\};", text, re.S).group(1)
    fields = []
    for declaration in re.sub(r"//[^\n]*", "", body).split(";"):
        if declaration.strip():
            kind, names = re.match(r"\s*((?:const )?\w+\*?)\s+(.*)", declaration, re.S).groups()
            fields += [(kind, name.strip()) for name in names.split(",")]
    assert tuple(name for _, name in fields) == cpu_kernels._CONV_FIELDS
    assert all(kind != "double" for kind, _ in fields[:-2]) and [k for k, _ in fields[-2:]] == ["double"] * 2
    assert cpu_kernels._CONV_CALL.size == 8 * len(fields)


# The library is built with -march=native; the AVX2 and portable paths of the source only compile on
# other machines. Built here on purpose (a few seconds each) and called through the same record.
BUILDS = {"avx2": ["-march=haswell"], "portable": ["-march=x86-64"]}


@pytest.mark.skipif(not shutil.which("g++"), reason="no g++ to build the other instruction-set paths with")
@pytest.mark.parametrize("build", sorted(BUILDS))
def test_the_other_instruction_set_paths_match_the_reference(build, tmp_path):
    source = next(p for p in cpu_kernels.SOURCES if p.name == "sparse_conv1x1.cpp")
    if build == "avx2" and not torch.backends.cpu.get_cpu_capability().startswith(("AVX2", "AVX512")):
        pytest.skip("this CPU has no AVX2")
    library = tmp_path / f"conv_{build}.so"
    subprocess.run(["g++", "-O2", *BUILDS[build], "-fopenmp", "-std=c++17", "-shared", "-fPIC", str(source),
                    "-o", str(library)], check=True)
    lib = ctypes.CDLL(str(library))
    lib.sg_sparse_conv1x1.argtypes = [ctypes.c_void_p]
    for (n, c, o, h, w), block, (lo, hi) in [((2, 37, 45, 9, 11), 1, (0.0, 6.0)), ((1, 301, 19, 10, 20), 4,
                                                                                   (None, None))]:
        x, weight, b, (values, indices, indptr) = _case(n, c, o, h, w, block=block)
        y = torch.empty(n, o, h, w)
        call = cpu_kernels._CONV_CALL.pack(
            x.data_ptr(), n, c, h * w, values.data_ptr(), indices.data_ptr(), indptr.data_ptr(), b.data_ptr(),
            y.data_ptr(), o, block, 2, lo is not None, hi is not None, lo or 0.0, hi or 0.0)
        assert lib.sg_sparse_conv1x1(call) == 0
        torch.testing.assert_close(y, _expected(x, weight, b, lo, hi), **TOL)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("block", [1, 2, 4, 8])
def test_triton_kernel_matches_the_reference(block):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, weight, b, packed = _case(2, 13, 11, 5, 7, block=block)
    for lo, hi in [(None, None), (0.0, 6.0)]:
        with use_backend("triton"):
            got = OP(x.to(device), weight.to(device), b.to(device), *(t.to(device) for t in packed), lo, hi)
        torch.testing.assert_close(got.cpu(), _expected(x, weight, b, lo, hi), **TOL)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_kernel_keeps_nan_through_the_clamp_and_has_no_bias():
    x, weight, _, packed = _case(1, 9, 6, 3, 3, block=2, bias=False, density=0.5)
    expected = _expected(x, weight, None, 0.0, 6.0)
    reads = (packed[2][1:] > packed[2][:-1]).repeat_interleave(2)[:6]
    expected[0, reads, 0, 0] = float("nan")
    x[0, :, 0, 0] = float("nan")
    with use_backend("triton"):
        got = OP(x, weight, None, *packed, 0.0, 6.0)
    assert torch.equal(got.isnan(), expected.isnan())
    torch.testing.assert_close(got.nan_to_num(), expected.nan_to_num(), **TOL)


class _Layer(torch.nn.Module):
    def __init__(self, weight, bias, packed, lo, hi):
        super().__init__()
        for name, t in zip(("weight", "bias", "values", "indices", "indptr"), (weight, bias, *packed)):
            self.register_buffer(name, t)
        self.lo, self.hi = lo, hi

    def forward(self, x):
        return OP(x, self.weight, self.bias, self.values, self.indices, self.indptr, self.lo, self.hi)


@pytest.mark.parametrize("lo,hi", [(0.0, 6.0), (None, None)])
def test_onnx_translation_is_a_dense_conv_and_matches_in_onnxruntime(lo, hi, tmp_path):
    x, weight, b, packed = _case()
    gm = torch.fx.symbolic_trace(_Layer(weight, b, packed, lo, hi))
    path = export_onnx(gm, tmp_path / "conv.onnx", (x,))
    onnx.checker.check_model(str(path))
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "Conv" in ops and ("Clip" in ops) == (lo is not None)
    torch.testing.assert_close(OnnxModel(path, gm)(x), _expected(x, weight, b, lo, hi), **TOL)
    x3 = torch.randn(3, 37, 9, 11)  # another batch through the same file
    torch.testing.assert_close(OnnxModel(path, gm)(x3), _expected(x3, weight, b, lo, hi), **TOL)


def test_op_survives_torch_export_and_costs_its_kept_weights():
    x, weight, b, packed = _case(2, 37, 45, 9, 11, block=4)
    ep = torch.export.export(_Layer(weight, b, packed, 0.0, 6.0), (x,), strict=False)
    node = next(n for n in ep.graph.nodes if n.target is OP.overload)
    macs, moved = OP.cost(node)
    assert macs == 2 * 9 * 11 * packed[0].numel()  # every pixel of every image × each kept block's 4 weights
    assert moved > 0 and macs < 2 * 9 * 11 * 45 * 37 * 0.5
    assert OP.backends == ["reference", "cpu", "triton", "onnx"]
    assert math.isclose(packed[0].numel() / (44 * 37), 0.3, abs_tol=0.1)  # the case's density
