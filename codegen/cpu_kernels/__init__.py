"""Compiled CPU kernels and their bindings.

The C++ sources beside this file are built when the package is installed (``pyproject.toml``,
``[[tool.setuptools.ext-modules]]``: ``-O3 -march=native -fopenmp``) into one shared library,
``_native`` (setuptools names it like a CPython extension, ``_native.cpython-….so``; it is a plain C
library: no Python or torch headers, so it does not depend on the torch version it runs with). It is
loaded with ctypes; the tensors are passed as data pointers and strides. Nothing is compiled at run
time. The kernels run on ``torch.get_num_threads()`` OpenMP threads of the runtime torch itself loaded
(one ``libgomp.so.1`` per process), so torch's rules hold for them too: in a process forked after
threads ran, set one thread (as DataLoader workers do) or use spawn.

Two things keep the binding honest without anything written twice:

- **The source stamp.** Each source carries ``SG_SOURCE_HASH``, the sha256 of its own text (the stamp
  itself blanked), which the library returns from ``sg_source_hash()``. At load the stamp of the
  built library must equal the hash of the sources installed beside it: a library built from other
  sources (the ``.cpp`` edited, the package not reinstalled) is refused, not called. A test keeps the
  stamp in the source current (``python -m sparsegraph.codegen.cpu_kernels`` restamps it).
- **The signatures.** The ctypes argument and return types are read from the ``extern "C"``
  definitions of the sources, so the C prototypes are the one declaration.

The build is optional: without a C++ compiler the install still succeeds, `library()` is None and the
ops run their torch paths (for block-sparse attention: `attention_fallback`; for sparse_linear:
`sparse_linear.cpu_torch`; for sparse_conv1x1: a dense conv of the pruned weight), which compute the
same thing more slowly. ``SPARSEGRAPH_NATIVE=0`` turns
the library off too (to time or test the fallback). `status()` says which it is and why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import os
import re
import struct
from pathlib import Path

import torch

SOURCES = tuple(Path(__file__).with_name(name)
                for name in ("block_sparse_attention.cpp", "sparse_gemv.cpp", "sparse_conv1x1.cpp"))
_STAMP = re.compile(r'(#define SG_SOURCE_HASH ")([0-9a-f]*)(")')
_C_TYPES = {"int": ctypes.c_int, "int64_t": ctypes.c_int64, "float": ctypes.c_float,
            "const char*": ctypes.c_char_p}
_DEFINITION = re.compile(r"^(int|int64_t|float|const char\*)\s+(sg_\w+)\(([^)]*)\)\s*\{", re.M)
_Strides = ctypes.c_int64 * 4


def source_hash() -> str:
    """sha256 of the kernel sources, each with its stamp blanked (what a current build is stamped with)."""
    digest = hashlib.sha256()
    for path in SOURCES:
        digest.update(_STAMP.sub(r"\g<1>\g<3>", path.read_text()).encode())
    return digest.hexdigest()


def signatures(text: str) -> dict[str, tuple]:
    """``{name: (restype, [argtypes])}`` of the ``extern "C"`` functions defined in C source `text`
    (pointers become ``c_void_p``: tensors go in as data pointers, strides as ctypes arrays)."""
    exported = text[text.index('extern "C" {'):]
    found = {}
    for result, name, params in _DEFINITION.findall(exported):
        types = []
        for param in filter(None, (p.strip() for p in params.split(","))):
            ctype = param.rsplit(" ", 1)[0].strip() if "*" not in param else "pointer"
            types.append(ctypes.c_void_p if ctype == "pointer" else _C_TYPES[ctype.replace("const ", "")])
        found[name] = (_C_TYPES[result], types)
    return found


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    spec = importlib.util.find_spec(f"{__name__}._native")
    if spec is None or spec.origin is None:
        return None, "not built (no C++ compiler when the package was installed); torch fallback in use"
    lib = ctypes.CDLL(spec.origin)
    if not hasattr(lib, "sg_source_hash"):  # built before the stamp existed
        return None, (f"{spec.origin} is a stale build (no source stamp): reinstall the package; torch "
                      "fallback in use")
    lib.sg_source_hash.restype = ctypes.c_char_p
    built, current = lib.sg_source_hash().decode(), source_hash()
    if built != current:
        return None, (f"{spec.origin} was built from other sources (stamp {built[:12]}, sources "
                      f"{current[:12]}): reinstall the package to rebuild it; torch fallback in use")
    if not lib.sg_cpu_supported():
        return None, (f"{spec.origin} was built for another CPU (-march=native where it was installed): "
                      "reinstall the package on this machine to rebuild it; torch fallback in use")
    for path in SOURCES:
        for name, (restype, argtypes) in signatures(path.read_text()).items():
            function = getattr(lib, name)
            function.restype, function.argtypes = restype, argtypes
    return lib, f"loaded from {spec.origin}"


try:  # CPython's environ, looked up in its own dict: 0.06 µs, where os.environ.get takes 1–2 µs when
    # the variable is unset (it raises and catches a KeyError), paid at every call of a 5 µs kernel
    _ENV_DATA, _ENV_KEY, _ENV_OFF = (os.environ._data, os.environ.encodekey("SPARSEGRAPH_NATIVE"),
                                     os.environ.encodevalue("0"))
except AttributeError:  # another Python: the public lookup
    _ENV_DATA = None


def _turned_off() -> bool:
    """SPARSEGRAPH_NATIVE=0, read at every call (it is flipped at run time, by tests too)."""
    if _ENV_DATA is not None:
        return _ENV_DATA.get(_ENV_KEY) == _ENV_OFF
    return os.environ.get("SPARSEGRAPH_NATIVE", "1") == "0"


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (not built, stale, or turned off with SPARSEGRAPH_NATIVE=0)."""
    if _turned_off():
        return None
    return _load()[0]


def status() -> str:
    """One line: whether the compiled kernels are in use, and if not why."""
    if _turned_off():
        return "turned off (SPARSEGRAPH_NATIVE=0); torch fallback in use"
    return _load()[1]


def _strides(t: torch.Tensor) -> ctypes.Array:
    """A 4-d tensor's element strides, 0 along size-1 dimensions (they broadcast)."""
    return _Strides(*(s if n > 1 else 0 for n, s in zip(t.shape, t.stride())))


def block_sparse_attention(q, k, v, layout, mask, block: int, causal: bool, scale: float,
                           pooled=None) -> torch.Tensor | None:
    """The op's CPU result from the compiled kernel (fp32 inside; other dtypes are converted), or None
    when the library is not available. q [B, H, L, E], k [B, Hkv, S, E], v [B, Hkv, S, Ev] on the CPU;
    layout int64 index lists [H, nq, nsel]; mask None or an additive mask as a [Mb, Mh, L, S] view
    (Mb ∈ {1, B}, Mh ∈ {1, H}; any strides). `pooled`: None, or pyramid heads' ``(k̄, v̄, log n, heads)``
    (`block_sparse_attention.pooled_keys` and bool [H]): those heads also read their unlisted key blocks
    pooled, in the same pass.

    q, k and v are copied to rows of one head side by side ([.., S, E] contiguous) unless they are
    already: views of a packed projection (``qkv(x).view(B, S, 3, H, E).permute(...)``, a DiT's or ViT's
    attention) put a head's consecutive rows 3·H·E floats apart, and a head that reads many key blocks
    streams K and V at that stride. Measured on a 2-core AMD EPYC (AVX2), 4 heads of 32 at 16k tokens,
    one dense head and three 3-D windows: 1.15 s strided, 0.57 s on contiguous copies; the copies take a
    few milliseconds (O(S·E) per head against the kernel's O(L·S·density·E))."""
    lib = library()
    if lib is None:
        return None
    q, k, v = (_rows(t) for t in (q, k, v))
    B, H, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty(B, H, L, Ev, dtype=torch.float32)
    layout = layout.to("cpu", torch.int64).contiguous()
    if mask is not None:  # varying over queries: stored query-fastest, so the kernel loads a vector per key
        mask = (mask.float() if mask.stride(2) in (0, 1)
                else mask.float().transpose(2, 3).contiguous().transpose(2, 3))
    if pooled is not None:
        kbar, vbar, logn, heads = pooled
        kbar, vbar = _rows(kbar), _rows(vbar)
        logn, heads = logn.float().contiguous(), heads.to("cpu", torch.int64).contiguous()
        far = (kbar.data_ptr(), _strides(kbar), vbar.data_ptr(), _strides(vbar), logn.data_ptr(),
               heads.data_ptr())
    else:
        far = (None,) * 6
    failed = lib.sg_block_sparse_attention_f32(
        q.data_ptr(), _strides(q), k.data_ptr(), _strides(k), v.data_ptr(), _strides(v), out.data_ptr(), *far,
        layout.data_ptr(), layout.shape[2], None if mask is None else mask.data_ptr(),
        None if mask is None else _strides(mask), B, H, Hkv, L, S, E, Ev, block, int(causal), float(scale),
        torch.get_num_threads())
    if failed:
        raise MemoryError("sparsegraph's CPU attention kernel could not allocate its scratch memory")
    return out


def _rows(t: torch.Tensor) -> torch.Tensor:
    """fp32 with each head's rows side by side (see `block_sparse_attention`): as it is, or a copy."""
    return t.float() if t.stride(-1) == 1 and t.stride(-2) == t.shape[-1] else t.float().contiguous()


GEMV_MAX_ROWS = 4  # rows the compiled sparse GEMV takes (decoding: one token of a few sequences)
# The fields of `struct SgGemvCall` (sparse_gemv.cpp) in order, all 8 bytes: one call's arguments go
# in as one packed record, as one pointer. Sixteen ctypes arguments cost ~5 µs per call to convert,
# more than the kernel at small sizes; packing them costs 0.2 µs and the one-pointer call 0.3 µs.
_GEMV_FIELDS = ("dtype", "x", "rows", "xs0", "xs1", "weight", "ld", "bias", "bs", "centre", "cs", "out", "in",
                "out_f", "k", "threads", "threshold")
_GEMV_CALL = struct.Struct("@16qd")
_GEMV_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def sparse_gemv(x, weight_t, bias, centre, threshold: float, k: int) -> torch.Tensor | None:
    """``sparsegraph::sparse_linear`` from the compiled kernel (`sparse_gemv.cpp`) for inputs of at most
    `GEMV_MAX_ROWS` rows, or None where it does not apply: the library is not available, a tensor is
    not on the CPU, the dtypes differ or are not fp32/bf16/fp16, the weight's columns are not adjacent,
    more rows, k > in. x [..., in] with any strides; weight_t [in, out]; bias [out] and centre [in] or
    None, any strides. Threshold (k = 0) and top-k (k > 0) modes are both computed in the kernel."""
    lib = library()
    if lib is None:
        return None
    in_f, out_f = weight_t.shape
    ld, column = weight_t.stride()
    dtype = x.dtype
    rows = x.numel() // in_f if in_f else 0
    code = _GEMV_DTYPES.get(dtype)
    if not (0 < rows <= GEMV_MAX_ROWS and k <= in_f and out_f and code is not None and x.is_cpu
            and weight_t.is_cpu and weight_t.dtype is dtype and (column == 1 or out_f == 1)
            and (bias is None or (bias.is_cpu and bias.dtype is dtype))
            and (centre is None or (centre.is_cpu and centre.dtype is dtype))):
        return None
    out = torch.empty(*x.shape[:-1], out_f, dtype=dtype)
    if rows == 1:
        xs0, xs1 = 0, x.stride()[-1]
    else:
        x = x.reshape(rows, in_f)  # a view where the strides allow it (a small copy where not)
        xs0, xs1 = x.stride()
    call = _GEMV_CALL.pack(
        code, x.data_ptr(), rows, xs0, xs1, weight_t.data_ptr(), ld,
        0 if bias is None else bias.data_ptr(), 0 if bias is None else bias.stride(0),
        0 if centre is None else centre.data_ptr(), 0 if centre is None else centre.stride(0),
        out.data_ptr(), in_f, out_f, k, torch.get_num_threads(), threshold)
    return None if lib.sg_sparse_gemv(call) else out


# The fields of `struct SgConvCall` (sparse_conv1x1.cpp) in order, all 8 bytes, packed into one record
# as for the GEMV: the op runs once per 1x1 layer, and 16 ctypes arguments would cost ~5 µs a call.
_CONV_FIELDS = ("x", "n", "c", "p", "values", "indices", "indptr", "bias", "y", "o", "k", "threads", "has_lo",
                "has_hi", "lo", "hi")
_CONV_CALL = struct.Struct("@14q2d")


def sparse_conv1x1(x, values, indices, indptr, bias, out_channels: int, lo: float | None,
                   hi: float | None) -> torch.Tensor | None:
    """``sparsegraph::sparse_conv1x1`` from the compiled kernel (`sparse_conv1x1.cpp`), or None where it
    does not apply: the library is not available, a tensor is not an fp32 CPU tensor, the block size is
    not 1, 2, 4 or 8. x [N, C, H, W] (made contiguous: the kernel reads NCHW rows); values [nnzb, K],
    indices and indptr int32 (made contiguous); bias [O] or None."""
    lib = library()
    if lib is None:
        return None
    tensors = (x, values) if bias is None else (x, values, bias)
    if not (all(t.is_cpu and t.dtype is torch.float32 for t in tensors) and values.shape[1] in (1, 2, 4, 8)
            and indices.dtype is torch.int32 and indptr.dtype is torch.int32 and x.dim() == 4):
        return None
    x, values, indices, indptr = (t.contiguous() for t in (x, values, indices, indptr))
    bias = None if bias is None else bias.contiguous()
    n, c, h, w = x.shape
    y = torch.empty(n, out_channels, h, w, dtype=torch.float32)
    call = _CONV_CALL.pack(
        x.data_ptr(), n, c, h * w, values.data_ptr(), indices.data_ptr(), indptr.data_ptr(),
        0 if bias is None else bias.data_ptr(), y.data_ptr(), out_channels, values.shape[1],
        torch.get_num_threads(), lo is not None, hi is not None, 0.0 if lo is None else lo,
        0.0 if hi is None else hi)
    failed = lib.sg_sparse_conv1x1(call)
    if failed == 1:
        raise MemoryError("sparsegraph's CPU sparse conv kernel could not allocate its scratch memory")
    return None if failed else y
