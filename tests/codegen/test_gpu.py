"""The Triton kernels at the sizes they are for, on a CUDA GPU (skipped without one: run them on a lent
GPU with ``-m gpu``). The interpreter tests beside these check correctness on small shapes on the CPU;
these check what the interpreter cannot: real launch grids, fp16/bf16 tensor cores, long sequences."""

import math

import pytest
import torch

from sparsegraph import attention_layouts
from sparsegraph.codegen import block_sparse_attention as bsa
from sparsegraph.codegen import dynamic_block_sparse_attention as dyn
from sparsegraph.codegen import sparse_linear, use_backend

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 6e-2)])
@pytest.mark.parametrize("causal", [False, True])
def test_block_sparse_attention_at_4096_tokens(dtype, tol, causal):
    g = torch.Generator(device="cuda").manual_seed(0)
    B, H, Hkv, L, E, block = 1, 8, 2, 4096, 64, 64
    q = torch.randn(B, H, L, E, device="cuda", dtype=dtype, generator=g)
    k, v = (torch.randn(B, Hkv, L, E, device="cuda", dtype=dtype, generator=g) for _ in range(2))
    heads = [{"pattern": "sink_local", "params": {"sinks": 1, "window": 3}},
             {"pattern": "vertical_slash", "params": {"columns": [0, 7, 30], "diagonals": [0, 1, 9]}}] * 4
    table = attention_layouts.table(heads).cuda()
    with use_backend("triton"):
        got = bsa.OP(q, k, v, table, None, block, causal, E ** -0.5)
    want = bsa.reference(q.float(), k.float(), v.float(), table, None, block, causal, E ** -0.5)
    assert got.dtype == dtype and want.shape == got.shape
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


def test_dynamic_block_sparse_attention_at_4096_tokens():
    g = torch.Generator(device="cuda").manual_seed(1)
    B, H, L, E, block = 2, 4, 4096, 64, 64
    q, k, v = (torch.randn(B, H, L, E, device="cuda", generator=g) for _ in range(3))
    table = attention_layouts.table([{"pattern": "local", "params": {"window": 1}}] * H).cuda()
    topk = torch.tensor([4, 4, 8, 0], device="cuda")
    with use_backend("triton"):
        got = dyn.OP(q, k, v, table, topk, None, block, True, E ** -0.5)
    torch.testing.assert_close(got, dyn.reference(q, k, v, table, topk, None, block, True, E ** -0.5),
                               rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("rows", [1, 4, 64])
def test_sparse_linear_at_llm_sizes(rows):
    g = torch.Generator(device="cuda").manual_seed(2)
    in_f, out_f = 11008, 4096
    x = torch.randn(rows, in_f, device="cuda", generator=g)
    w_t = torch.randn(in_f, out_f, device="cuda", generator=g) / math.sqrt(in_f)
    b = torch.randn(out_f, device="cuda", generator=g)
    with use_backend("triton"):
        got = sparse_linear.OP(x, w_t, b, None, 0.7, 0)
    torch.testing.assert_close(got, sparse_linear.reference(x, w_t, b, None, 0.7, 0), rtol=1e-3, atol=1e-3)
