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
ops run their torch paths (for block-sparse attention: `attention_fallback`), which compute the same
thing more slowly. ``SPARSEGRAPH_NATIVE=0`` turns the library off too (to time or test the fallback).
`status()` says which it is and why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import os
import re
from pathlib import Path

import torch

SOURCES = (Path(__file__).with_name("block_sparse_attention.cpp"),)
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


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (not built, stale, or turned off with SPARSEGRAPH_NATIVE=0)."""
    if os.environ.get("SPARSEGRAPH_NATIVE", "1") == "0":
        return None
    return _load()[0]


def status() -> str:
    """One line: whether the compiled kernels are in use, and if not why."""
    if os.environ.get("SPARSEGRAPH_NATIVE", "1") == "0":
        return "turned off (SPARSEGRAPH_NATIVE=0); torch fallback in use"
    return _load()[1]


def _strides(t: torch.Tensor) -> ctypes.Array:
    """A 4-d tensor's element strides, 0 along size-1 dimensions (they broadcast)."""
    return _Strides(*(s if n > 1 else 0 for n, s in zip(t.shape, t.stride())))


def block_sparse_attention(q, k, v, layout, mask, block: int, causal: bool,
                           scale: float) -> torch.Tensor | None:
    """The op's CPU result from the compiled kernel (fp32 inside; other dtypes are converted), or None
    when the library is not available. q [B, H, L, E], k [B, Hkv, S, E], v [B, Hkv, S, Ev] on the CPU;
    layout int64 index lists [H, nq, nsel]; mask None or an additive mask as a [Mb, Mh, L, S] view
    (Mb ∈ {1, B}, Mh ∈ {1, H}; any strides)."""
    lib = library()
    if lib is None:
        return None
    q, k, v = (t.float() if t.stride(-1) == 1 else t.float().contiguous() for t in (q, k, v))
    B, H, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty(B, H, L, Ev, dtype=torch.float32)
    layout = layout.to("cpu", torch.int64).contiguous()
    if mask is not None:  # varying over queries: stored query-fastest, so the kernel loads a vector per key
        mask = (mask.float() if mask.stride(2) in (0, 1)
                else mask.float().transpose(2, 3).contiguous().transpose(2, 3))
    failed = lib.sg_block_sparse_attention_f32(
        q.data_ptr(), _strides(q), k.data_ptr(), _strides(k), v.data_ptr(), _strides(v), out.data_ptr(),
        layout.data_ptr(), layout.shape[2], None if mask is None else mask.data_ptr(),
        None if mask is None else _strides(mask), B, H, Hkv, L, S, E, Ev, block, int(causal), float(scale),
        torch.get_num_threads())
    if failed:
        raise MemoryError("sparsegraph's CPU attention kernel could not allocate its scratch memory")
    return out
