"""Canonical forms (`sparsegraph.canonicalize`): the graph each produces, the values it keeps, what it
folds and what it leaves alone."""

import pytest
import torch
import torch.nn.functional as F

from sparsegraph.canonicalize import drop_identities, share_kv_heads
from sparsegraph.trace import trace

aten = torch.ops.aten


class GroupedAttention(torch.nn.Module):
    """Hugging Face's ``repeat_kv`` (or a tiling ``repeat``) before a masked SDPA: 8 query heads, 2 kv."""

    def __init__(self, tile: bool = False):
        super().__init__()
        self.tile = tile

    def forward(self, q, k, v, mask):
        n = q.shape[1] // k.shape[1]
        if self.tile:  # head h reads kv head h mod Hkv: not what enable_gqa computes
            k, v = k.repeat(1, n, 1, 1), v.repeat(1, n, 1, 1)
        else:
            b, h, s, d = k.shape
            k = k[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)
            v = v[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _inputs():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 1, 16, generator=g)
    k, v = (torch.randn(2, 2, 24, 16, generator=g) for _ in range(2))
    mask = torch.zeros(2, 1, 1, 24)
    mask[1, ..., :5] = float("-inf")  # a left-padded row
    return q, k, v, mask


def _calls(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def test_repeat_kv_folds_into_enable_gqa_with_the_same_output():
    args = _inputs()
    gm = trace(GroupedAttention(), args, dynamic=False)
    drop_identities(gm)
    assert len(_calls(gm, aten.expand.default)) == 2
    expected = gm(*args)

    assert share_kv_heads(gm) == 1
    (sdpa,) = _calls(gm, aten.scaled_dot_product_attention.default)
    assert sdpa.kwargs["enable_gqa"] is True
    assert [a.op for a in sdpa.args[1:3]] == ["placeholder", "placeholder"]  # the kv heads themselves
    assert not _calls(gm, aten.expand.default) and not _calls(gm, aten.unsqueeze.default)
    torch.testing.assert_close(gm(*args), expected, rtol=0, atol=1e-6)
    assert share_kv_heads(gm) == 0  # nothing left to fold


def test_a_tiling_repeat_is_left_alone():
    args = _inputs()
    gm = trace(GroupedAttention(tile=True), args, dynamic=False)
    expected = gm(*args)
    assert share_kv_heads(gm) == 0
    (sdpa,) = _calls(gm, aten.scaled_dot_product_attention.default)
    assert not sdpa.kwargs.get("enable_gqa", False)
    assert torch.equal(gm(*args), expected)


def test_identities_go_and_values_stay():
    class Identities(torch.nn.Module):
        def forward(self, x):
            return (x[:, :] * 1).to(torch.float32) + 1

    x = torch.randn(3, 4)
    gm = trace(Identities(), (x,), dynamic=False)
    before = sum(n.op == "call_function" for n in gm.graph.nodes)
    removed = drop_identities(gm)
    assert removed >= 2  # the whole-axis slice and the product by 1 at least
    assert sum(n.op == "call_function" for n in gm.graph.nodes) == before - removed
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [aten.add.Tensor]
    assert torch.equal(gm(x), x + 1)


@pytest.mark.parametrize("heads", [1, 4])
def test_no_group_no_fold(heads):
    """Equal query and kv heads (or one of each): there is no repeat to fold."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, heads, 6, 8, generator=g) for _ in range(3))

    class Plain(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    gm = trace(Plain(), (q, k, v), dynamic=False)
    assert share_kv_heads(gm) == 0
