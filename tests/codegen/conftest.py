import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter when there is no GPU. The flag must be set
# before a kernel module is imported (``triton.jit`` reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(params=["native", "torch"])
def cpu_path(request, monkeypatch):
    """Run a CPU test on both CPU paths of the attention ops: the compiled kernel (skipped, saying why,
    when it was not built) and the torch fallback (SPARSEGRAPH_NATIVE=0)."""
    from sparsegraph.codegen import cpu_kernels

    if request.param == "torch":
        monkeypatch.setenv("SPARSEGRAPH_NATIVE", "0")
    elif cpu_kernels.library() is None:
        pytest.skip(f"compiled CPU kernels: {cpu_kernels.status()}")
    return request.param


@pytest.fixture
def torch_path(monkeypatch):
    """Tests of the torch fallback's own structure (tiles, gathers): the compiled kernel turned off."""
    monkeypatch.setenv("SPARSEGRAPH_NATIVE", "0")
