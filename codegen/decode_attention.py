"""``sparsegraph::decode_attention``: one decode step's attention over a static KV cache, reading only some of
its blocks.

Inputs: q [B, H, 1, E] (the new token's queries), k, v [B, Hkv, S, E] the whole cache (GQA: query head h
reads kv head h // (H / Hkv)), ``mask`` the step's *additive* mask broadcastable to [B, 1, 1, S] (0 where
a slot holds a token the query may read, the dtype's lowest value elsewhere: `sparsegraph.kv_cache`), a
layout *table* [H, W] (`sparsegraph.attention_layouts`), ``keep`` (the share of blocks chosen per step,
0: static only), ``block`` and ``scale``.

Only the first n = 1 + (the last slot any row may read) slots hold tokens; they form nk = ⌈n / block⌉
key blocks, and the query sits in the last one. Head h reads the blocks

    static:   the table's bands laid out at the grid 1 × nk (one query block, aligned at the end: diagonal
              d is block nk − 1 − d, i.e. the local window counts back from the current token; column c
              is block c, a sink), plus always block nk − 1 (the query's own);
    dynamic:  with keep > 0, up to ⌈keep · nk⌉ blocks in all: the static ones, then those of highest
              estimated score (Quest / NOSA style, from block means, one small product per step), chosen
              per kv head g for the group G(g) of query heads that shares it (GQA: one gather serves
              the group):
                  est[b, g, J] = max_{h ∈ G(g)} q_h · k̄_J · scale + max_{j ∈ J} mask[b, j],
                  k̄_J = (1/block) Σ_{j ∈ J} k_j

and out[b, h] = Σ_j softmax_j(q·k_j·scale + mask[b, j], j in its blocks) · v_j: exact attention restricted
to the listed blocks (every listed slot the mask allows), so a head that lists every block is SDPA.

Why a decode op of its own: a decode step is a GEMV over the cache, memory-bound, one query row. When
every head reads the same blocks (static bands shared by the heads: sink + local), the CPU path joins
the runs of consecutive listed slots (a few slices) and runs one SDPA with ``enable_gqa``; otherwise it
gathers, per kv head, the union of the blocks its query heads list (one copy of the listed slots: 10% of
the cache at 10% of the blocks) and runs one SDPA with ``enable_gqa`` on them, with the other heads'
blocks masked; so a step reads the listed blocks (and, for dynamic heads, the keys once
for their block means) instead of the whole cache, and never materialises the GQA repeat of the cache
that a dense step does (Hugging Face's ``repeat_kv`` copies all of it every step).

Backends: reference (dense scores over the n slots with the selection expanded to a slot mask, the
oracle), CPU (the gather above), ONNX for static heads (keep = 0): the same selection in standard
ops, then dense masked attention over the n slots (exact, at dense speed); with keep > 0 export
refuses, naming the op.
"""

from __future__ import annotations

import itertools
import math
import weakref

import torch
import torch.nn.functional as F
from onnxscript import opset18 as op

from sparsegraph import attention_layouts, ir
from sparsegraph.codegen import block_sparse_attention as bsa
from sparsegraph.codegen.dynamic_block_sparse_attention import _block_means
from sparsegraph.codegen.op import SparseOp

_INF = float("inf")


def valid_length(mask: torch.Tensor, S: int) -> int:
    """1 + the last slot any row may read (the mask's allowed entries are 0, the rest the lowest value)."""
    allowed = (mask.reshape(-1, mask.shape[-1]) > torch.finfo(mask.dtype).min / 2).any(0)
    found = allowed.nonzero()
    return int(found.max()) + 1 if len(found) else S


def selection(q, k, mask, layout, keep: float, block: int, scale: float) -> tuple[int, torch.Tensor]:
    """``(n, sel)``: the slots holding tokens and which of their blocks each head reads, bool [B, H, nk]."""
    B, H = q.shape[:2]
    n = valid_length(mask, k.shape[2])
    nk = math.ceil(n / block)
    sel = _static_blocks(layout, nk, q.device).expand(B, H, nk).clone()
    sel[..., nk - 1] = True  # the query's own block
    want = min(nk, math.ceil(keep * nk)) if keep > 0 else 0
    extra = want - int(sel.sum(-1).min())
    if extra > 0:  # chosen per kv head (the group of query heads sharing it reads the same blocks)
        Hkv = k.shape[1]
        means = _block_means(k[:, :, :n], block)  # [B, Hkv, nk, E]
        est = (q.float() @ bsa.repeat_kv(means, H).transpose(-1, -2))[:, :, 0] * scale  # [B, H, nk]
        est = est.view(B, Hkv, H // Hkv, nk).amax(2)
        m = F.pad(mask.float().reshape(mask.shape[0], -1)[:, :n], (0, nk * block - n), value=-_INF)
        est = est + m.reshape(m.shape[0], 1, nk, block).amax(-1)
        group = sel.view(B, Hkv, H // Hkv, nk).all(2)  # blocks every head of the group reads already
        values, chosen = est.masked_fill(group, -_INF).topk(min(extra, nk), -1)
        rank = torch.arange(chosen.shape[-1], device=q.device)
        take = (rank < want - group.sum(-1, keepdim=True)) & (values > -_INF)  # up to the budget
        picked = torch.zeros_like(group).scatter_(-1, chosen, take)
        sel |= picked.repeat_interleave(H // Hkv, 1)
    return n, sel


_STATIC: dict[int, tuple] = {}  # id(laid-out lists) → (weak ref to them, their block mask [H, nk])


def _static_blocks(layout: torch.Tensor, nk: int, device) -> torch.Tensor:
    """The table's static blocks at a 1 × nk grid, bool [H, nk]: laid out once per table and length (the
    lists are `attention_layouts.layout`'s cached tensor; their mask is cached beside them here, so a
    step does not rebuild a mask over the grid)."""
    lists = attention_layouts.layout(layout, 1, nk, False, device)  # [H, 1, nsel], the same object per key
    found = _STATIC.get(id(lists))
    if found is None or found[0]() is not lists:
        ident = id(lists)
        found = _STATIC[ident] = (weakref.ref(lists, lambda _, ident=ident: _STATIC.pop(ident, None)),
                                  attention_layouts.block_mask_from_layout(lists, nk)[:, 0])
    return found[1]


def _runs(blocks: torch.Tensor) -> list[tuple[int, int]]:
    """Ascending block indices as runs of consecutive blocks, ``[(first, last + 1), …]``."""
    ids = blocks.tolist()
    runs, start = [], ids[0]
    for prev, cur in itertools.pairwise(ids):
        if cur != prev + 1:
            runs.append((start, prev + 1))
            start = cur
    runs.append((start, ids[-1] + 1))
    return runs


def _runs_attention(q, k, v, mask, blocks: torch.Tensor, n: int, block: int, scale: float) -> torch.Tensor:
    """Attention of every head over the same listed `blocks` (bool [nk]): the runs of consecutive listed
    slots sliced out of the cache and joined (a copy of the listed slots only, no index gather), then one
    SDPA with ``enable_gqa``."""
    runs = [(a * block, min(b * block, n)) for a, b in _runs(blocks.nonzero().flatten())]
    m = mask.reshape(mask.shape[0], 1, 1, -1).to(q.dtype)
    kg, vg, add = (torch.cat([t[..., a:b, :] if i < 2 else t[..., a:b] for a, b in runs], -2 if i < 2 else -1)
                   for i, t in enumerate((k, v, m)))
    return F.scaled_dot_product_attention(q, kg, vg, attn_mask=add, scale=scale, enable_gqa=True)


def _slot_mask(mask, n: int, sel: torch.Tensor, block: int) -> torch.Tensor:
    """Additive [B, H, 1, n]: the step's mask where the head reads the slot's block, −∞ elsewhere."""
    blocks = torch.arange(n, device=sel.device) // block
    m = mask.reshape(mask.shape[0], 1, 1, -1)[..., :n].float()
    return m.masked_fill(~sel[:, :, None, blocks], -_INF)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, layout: torch.Tensor,
              keep: float, block: int, scale: float) -> torch.Tensor:
    H = q.shape[1]
    n, sel = selection(q, k, mask, layout, keep, block, scale)
    s = q.float() @ bsa.repeat_kv(k[:, :, :n], H).float().transpose(-1, -2) * scale + _slot_mask(mask, n, sel,
                                                                                                  block)
    return (s.softmax(-1) @ bsa.repeat_kv(v[:, :, :n], H).float()).to(q.dtype)


def cpu(q, k, v, mask, layout, keep: float, block: int, scale: float) -> torch.Tensor:
    B, H = q.shape[:2]
    Hkv = k.shape[1]
    n, sel = selection(q, k, mask, layout, keep, block, scale)
    nk = sel.shape[-1]
    if bool((sel == sel[:1, :1]).all()):  # every row and head reads the same blocks
        return _runs_attention(q, k, v, mask, sel[0, 0], n, block, scale)
    group = sel.view(B, Hkv, H // Hkv, nk)
    union = group.any(2)  # [B, Hkv, nk]: blocks some head of the group reads
    count = union.sum(-1)
    width = int(count.max())
    # the listed blocks first (in ascending order: a stable sort), then filler that `listed` masks out
    blocks = union.float().sort(dim=-1, descending=True, stable=True).indices[..., :width]
    listed = torch.arange(width, device=q.device) < count[..., None]
    slots = (blocks[..., None] * block + torch.arange(block, device=q.device)).flatten(-2)  # [B, Hkv, T]
    real = (slots < n) & listed.repeat_interleave(block, -1)
    slots = slots.clamp(max=n - 1)
    kg = k.gather(2, slots[..., None].expand(-1, -1, -1, k.shape[-1]))
    vg = v.gather(2, slots[..., None].expand(-1, -1, -1, v.shape[-1]))
    step = mask.reshape(mask.shape[0], 1, -1).float().expand(B, Hkv, -1).gather(-1, slots)
    if bool((group == group[:, :, :1]).all()):  # each group's heads read the same blocks (dynamic mode)
        add = step.masked_fill(~real, -_INF)[:, :, None, None].expand(B, Hkv, H // Hkv, 1, -1)
        add = add.reshape(B, H, 1, -1)
    else:  # per query head: the step's mask at the gathered slots where its own blocks are listed
        reads = group.gather(-1, blocks[:, :, None, :].expand(-1, -1, H // Hkv, -1))  # [B, Hkv, G, width]
        reads = reads.repeat_interleave(block, -1) & real[:, :, None]
        add = step[:, :, None].masked_fill(~reads, -_INF).reshape(B, H, 1, -1)
    return F.scaled_dot_product_attention(q, kg, vg, attn_mask=add.to(q.dtype), scale=scale, enable_gqa=True)


def dense(q, k, v, mask, layout, keep, block, scale):
    """Every slot: the dense step's attention (the mask still hides what is not a token)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), scale=scale, enable_gqa=True)


def fake(q, k, v, mask, layout, keep, block, scale):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def onnx(q, k, v, mask, layout, keep: float, block: int, scale: float):
    """Static heads in standard ops: n from the mask (``ReduceMax`` of the allowed slots' positions),
    the cache and mask sliced to n, the table laid out at 1 × ⌈n / block⌉ (`bsa.onnx_table_mask`) with
    the current block added, then dense masked attention over the listed blocks. Exact, at dense speed."""
    def ints(*xs):
        return op.Constant(value_ints=list(xs))

    S = op.Shape(k, start=2, end=3)
    allowed = op.Greater(op.Reshape(mask, op.Concat(ints(-1), S, axis=0)),
                         op.CastLike(op.Constant(value_float=torch.finfo(torch.float32).min / 2), mask))
    one = op.Constant(value_int=1)
    positions = op.Range(one, op.Add(op.Squeeze(S), one), one)  # 1 … S
    n = op.ReduceMax(op.Mul(op.Cast(allowed, to=7), positions), keepdims=0)  # int64, scalar
    end = op.Unsqueeze(n, ints(0))
    k, v = (op.Slice(x, ints(0), end, ints(2)) for x in (k, v))
    mask = op.Slice(mask, ints(0), end, ints(3))
    size = op.Constant(value_int=block)
    nk = op.Div(op.Sub(op.Add(n, size), one), size)
    listed = bsa.onnx_table_mask(layout, one, nk, False)  # [H, 1, nk]
    current = op.Cast(op.Equal(op.Range(op.Constant(value_int=0), nk, one), op.Sub(nk, one)), to=1)
    return bsa.onnx_block_attention(q, k, v, op.Max(listed, current), mask, block, False, scale)


def onnx_refuses(node: torch.fx.Node) -> str | None:
    if node.args[5] > 0:
        return "keep > 0 (blocks chosen per step) has no ONNX translation yet; use mode: static to export"
    return None


def cost(node: torch.fx.Node) -> tuple[int, int]:
    """At the traced cache length: the static blocks (or ⌈keep·nk⌉ of them) of every head."""
    q, k, v = (ir.val(a) for a in node.args[:3])
    layout = ir.get_attr(node.graph.owning_module, node.args[4].target)
    keep, block = node.args[5], node.args[6]
    B, H, _, E = q.shape
    nk = math.ceil(k.shape[2] / block)
    listed = attention_layouts.block_mask_from_layout(attention_layouts.layout(layout, 1, nk, False), nk)
    density = max(float(listed.float().mean()), min(1.0, keep), 1 / nk)
    slots = density * k.shape[2]
    macs = int(B * H * slots * (E + v.shape[-1]))
    moved = int(B * k.shape[1] * slots * (E + v.shape[-1]) * k.element_size())
    return macs, moved


OP = SparseOp("decode_attention", reference, fake=fake, cpu=cpu, onnx=onnx, cost=cost, dense=dense,
              onnx_refuses=onnx_refuses)
