"""Compiled CPU kernels and their bindings.

The C++ sources beside this file are built when the package is installed (``pyproject.toml``,
``[[tool.setuptools.ext-modules]]``: ``-O3 -march=native -fopenmp``) into one shared library,
``_native``, with a plain C interface: no Python or torch headers, so it does not depend on the torch
version it runs with. It is loaded with ctypes; the tensors are passed as data pointers and strides.
Nothing is compiled at run time. The kernels run on ``torch.get_num_threads()`` OpenMP threads of the
runtime torch itself loaded (one ``libgomp.so.1`` per process), so torch's rules hold for them too:
in a process forked after threads ran, set one thread (as DataLoader workers do) or use spawn.

The build is optional: without a C++ compiler the install still succeeds, `library()` is None and the
ops run their torch paths (for block-sparse attention: `attention_tiles` and the gathered path),
which compute the same thing more slowly. ``SPARSEGRAPH_NATIVE=0`` turns the library off too (to time
or test the fallback). `status()` says which it is and why.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os

import torch

ABI_VERSION = 2  # must equal sg_abi_version() in the sources: a stale build is refused, not called

_P, _I, _Strides = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64 * 4


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    spec = importlib.util.find_spec(f"{__name__}._native")
    if spec is None or spec.origin is None:
        return None, "not built (no C++ compiler when the package was installed); torch fallback in use"
    lib = ctypes.CDLL(spec.origin)
    if lib.sg_abi_version() != ABI_VERSION:
        return None, (f"{spec.origin} is a stale build (ABI {lib.sg_abi_version()}, expected {ABI_VERSION}): "
                      "reinstall the package to rebuild it; torch fallback in use")
    if not lib.sg_cpu_supported():
        return None, (f"{spec.origin} was built for another CPU (-march=native where it was installed): "
                      "reinstall the package on this machine to rebuild it; torch fallback in use")
    strides = ctypes.POINTER(_I)
    lib.sg_block_sparse_attention_f32.argtypes = [_P, strides, _P, strides, _P, strides, _P, _P, _I, _P, strides,
                                                  _I, _I, _I, _I, _I, _I, _I, _I, ctypes.c_int, ctypes.c_float,
                                                  ctypes.c_int]
    lib.sg_block_sparse_attention_f32.restype = ctypes.c_int
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


def block_sparse_attention(q, k, v, layout, mask, block: int, causal: bool, scale: float) -> torch.Tensor | None:
    """The op's CPU result from the compiled kernel (fp32 inside; other dtypes are converted), or None
    when the library is not available. q [B, H, L, E], k [B, Hkv, S, E], v [B, Hkv, S, Ev] on the CPU;
    mask None or an additive mask as a [Mb, Mh, L, S] view (Mb ∈ {1, B}, Mh ∈ {1, H}; any strides)."""
    lib = library()
    if lib is None:
        return None
    q, k, v = (t.float() if t.stride(-1) == 1 else t.float().contiguous() for t in (q, k, v))
    B, H, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty(B, H, L, Ev, dtype=torch.float32)
    layout = layout.to("cpu", torch.int64).contiguous()
    if mask is not None:  # varying over queries: stored query-fastest, so the kernel loads a vector per key
        mask = mask.float() if mask.stride(2) in (0, 1) else mask.float().transpose(2, 3).contiguous().transpose(2, 3)
    failed = lib.sg_block_sparse_attention_f32(
        q.data_ptr(), _strides(q), k.data_ptr(), _strides(k), v.data_ptr(), _strides(v), out.data_ptr(),
        layout.data_ptr(), layout.shape[2], None if mask is None else mask.data_ptr(),
        None if mask is None else _strides(mask), B, H, Hkv, L, S, E, Ev, block, int(causal), float(scale),
        torch.get_num_threads())
    if failed:
        raise MemoryError("sparsegraph's CPU attention kernel could not allocate its scratch memory")
    return out
