"""sparsegraph::decode_attention: one query over a static cache, reading the listed blocks only."""

import pytest
import torch

from sparsegraph import attention_layouts
from sparsegraph.codegen import decode_attention as da
from sparsegraph.codegen.block_sparse_attention import repeat_kv

LOW = torch.finfo(torch.float32).min
HEADS = [{"pattern": "sink_local", "params": {"sinks": 1, "window": 2}}] * 3 + \
        [{"pattern": "dense", "params": {}}, {"pattern": "local", "params": {"window": 1}}] + \
        [{"pattern": "vertical_slash", "params": {"columns": [2], "diagonals": [0, 3]}}] * 3


def _case(S=101, valid=77, B=2, H=8, Hkv=2, E=16, seed=0):
    """A cache of S slots of which the first `valid` hold tokens; the last row left-padded by 5."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, 1, E, generator=g)
    k, v = (torch.randn(B, Hkv, S, E, generator=g) for _ in range(2))
    mask = torch.zeros(B, 1, 1, S)
    mask[..., valid:] = LOW
    mask[-1, ..., :5] = LOW
    return q, k, v, mask


def _oracle(q, k, v, mask, sel, block, valid):
    """Dense attention over the valid slots of the blocks each head reads (`sel` [B, H, nk])."""
    H = q.shape[1]
    slots = torch.arange(valid)
    add = mask[..., :valid].expand(-1, H, -1, -1).masked_fill(~sel[:, :, None, slots // block], float("-inf"))
    s = q @ repeat_kv(k[:, :, :valid], H).transpose(-1, -2) * q.shape[-1] ** -0.5 + add
    return s.softmax(-1) @ repeat_kv(v[:, :, :valid], H)


@pytest.mark.parametrize("block", [4, 8, 16])
@pytest.mark.parametrize("keep", [0.0, 0.3, 1.0])
def test_cpu_matches_reference_and_the_blocks_it_lists(block, keep):
    q, k, v, mask = _case()
    table = attention_layouts.table(HEADS)
    scale = q.shape[-1] ** -0.5
    ref = da.reference(q, k, v, mask, table, keep, block, scale)
    torch.testing.assert_close(da.cpu(q, k, v, mask, table, keep, block, scale), ref, rtol=1e-5, atol=1e-5)
    n, sel = da.selection(q, k, mask, table, keep, block, scale)
    assert n == 77 and sel.shape == (2, 8, -(-77 // block))
    assert sel[..., -1].all() and sel[:, 3].all()  # the current block always; the dense head everything
    torch.testing.assert_close(ref, _oracle(q, k, v, mask, sel, block, n), rtol=1e-5, atol=1e-5)
    if keep == 0.0:  # static: the sink (block 0) and the window counted back from the current block
        assert sel[:, 0, 0].all() and sel[:, 0, -2:].all() and int(sel[0, 0].sum()) == min(3, sel.shape[-1])


@pytest.mark.parametrize("heads", [
    [{"pattern": "sink_local", "params": {"sinks": 1, "window": 2}}] * 8,  # two runs: the sink, the window
    [{"pattern": "vertical_slash", "params": {"columns": [0, 3], "diagonals": [0, 2]}}] * 8,  # four runs
    [{"pattern": "dense", "params": {}}] * 8])
def test_heads_reading_the_same_blocks_take_the_sliced_path_and_match_the_reference(heads, monkeypatch):
    q, k, v, mask = _case(B=1)
    table, scale = attention_layouts.table(heads), q.shape[-1] ** -0.5
    calls = []
    monkeypatch.setattr(da, "_runs", lambda blocks, runs=da._runs: calls.append(1) or runs(blocks))
    got = da.cpu(q, k, v, mask, table, 0.0, 8, scale)
    assert calls, "the same blocks for every head: the sliced path"
    torch.testing.assert_close(got, da.reference(q, k, v, mask, table, 0.0, 8, scale), rtol=1e-5, atol=1e-5)
    assert da._runs(torch.tensor([0, 1, 2, 5, 7, 8])) == [(0, 3), (5, 6), (7, 9)]


def test_dynamic_reads_keep_of_the_blocks_per_kv_head_and_all_of_them_is_dense():
    q, k, v, mask = _case(S=256, valid=256)
    sinks = attention_layouts.table([{"pattern": "sink_local", "params": {"sinks": 1, "window": 1}}] * 8)
    scale = q.shape[-1] ** -0.5
    _, sel = da.selection(q, k, mask, sinks, 0.25, 16, scale)
    assert (sel.sum(-1) == 4).all()  # ⌈0.25 · 16⌉ blocks, sink and current among them
    assert (sel.view(2, 2, 4, 16) == sel.view(2, 2, 4, 16)[:, :, :1]).all()  # one choice per kv head
    dense = da.dense(q, k, v, mask, sinks, 0.0, 16, scale)
    torch.testing.assert_close(da.cpu(q, k, v, mask, sinks, 1.0, 16, scale), dense, rtol=1e-5, atol=1e-5)
