"""The torch fallback of ``block_sparse_attention`` on the CPU, where the compiled kernel is not built.

No dense score matrix. The layout is cut into tiles (`attention_tiles`): columns listed by every query
block (sinks, vertical lines, dense heads) run as one SDPA call over all those queries, diagonal bands
as one call over overlapping strided views of K, and what is left (`_listed`) is gathered: rows (head,
query block) are grouped by how many blocks they list, their K/V blocks gathered at once
(``index_select`` into a reused workspace) into [B, R, c·block, E], one batched SDPA call per group.
Causal: blocks after the diagonal are dropped; the diagonal block (and a partial last block) is sorted
first in its row, so one small [block, c·block] mask shared by the whole group covers it. Partial
results merge exactly by their log-sum-exp (`attention_tiles.Accumulator`); with ``lse``, `attention`
returns the merged one too: each query's log-sum-exp of its allowed scores, −inf where it has none. Work
and memory are ∝ the listed blocks; figures in ``bench/results/attention-cpu.md``.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F

from sparsegraph.codegen import attention_tiles


def attention(q, k, v, layout, mask, block: int, causal: bool, scale: float, tile: bool = True, *,
              lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The op on index lists `layout` [H, nq, nsel] with `mask` None or a `_full_mask` view. With `lse`,
    (out, lse): lse fp32 [B, H, L], log Σ_j e^{score} over each query's allowed keys (the softmax's
    normaliser; −inf for a query with no allowed key)."""
    B, H, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    nq, nk = math.ceil(L / block), math.ceil(S / block)
    tiles = (attention_tiles.tiling if tile else attention_tiles.untiled)(layout, L, S, block, causal,
                                                                          H // Hkv)
    wide = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype  # merge precision
    acc = attention_tiles.Accumulator((B, H, nq * block, Ev), wide, q.device, block)
    attention_tiles.run(tiles, q, k, v, mask, block, causal, scale, acc, whole=True)
    if bool((tiles.rest >= 0).any()):
        qb = _pad_seq(q, nq * block).reshape(B, H * nq, block, E)
        kblocks = _pad_seq(k, nk * block).reshape(B * Hkv * nk, block, E)
        vblocks = _pad_seq(v, nk * block).reshape(B * Hkv * nk, block, Ev)
        for rows, o, ls in _listed(tiles.rest.to(q.device), mask, causal,
                                   (qb, kblocks, vblocks, B, H, Hkv, S, nq, nk, block, scale)):
            if isinstance(rows, int):
                acc.put(slice(None), rows, o.reshape(B, H, -1, Ev), ls.reshape(B, H, -1))
            else:
                acc.put_rows(rows, o, ls)
    attention_tiles.run(tiles, q, k, v, mask, block, causal, scale, acc, whole=False)
    out = acc.result(L).to(q.dtype)  # a row with no allowed key: 0, lse −inf (unwritten blocks: result)
    if not lse:
        return out
    return out, acc.lse[:, :, :L].to(torch.float32).contiguous()


def _listed(layout, mask, causal, parts):
    """Attention of (head, query block) rows over their listed key blocks, gathered: yields per group of
    rows the output [B, R, block, Ev] and log-sum-exp [B, R, block]. A group's rows are given as an int a
    when they are every head's query blocks a… (then no gather of q: views), else as indices into H·nq.

    Each row's blocks are sorted descending, so the only blocks that need an element mask (the causal
    diagonal block i, the partial last block nk − 1) can only come first. Rows are grouped by (number
    of blocks, diagonal first, last block first); within a group the mask is one small [block, c·block]
    pattern shared by all rows (SDPA runs as fast with it as without), and each group is one batched
    SDPA call over its gathered K/V blocks: no padding, no per-row loop. With a mask the mask values
    are gathered per row instead.
    """
    qb, kblocks, vblocks, B, H, Hkv, S, nq, nk, block, scale = parts
    E, Ev, dev = qb.shape[-1], vblocks.shape[-1], qb.device
    layout = layout.sort(-1, descending=True).values  # listed blocks first (largest first), −1 last
    counts = (layout >= 0).sum(-1).view(-1)  # [H·nq]
    first = layout[..., 0].reshape(-1)
    row_block = torch.arange(nq, device=dev).repeat(H)
    key = counts * 4
    if mask is None:
        if causal:
            key = key + 2 * (first == row_block)
        if S % block:
            key = key + (first == nk - 1)
    masks = None if mask is None else _mask_blocks(mask, nq, block)
    group = H // Hkv
    for g in key.unique().tolist():
        c, diagonal, tail = g // 4, bool(g & 2), bool(g & 1)
        if c == 0:
            continue
        rows = (key == g).nonzero().view(-1)
        h, i = rows // nq, rows % nq
        idx = layout[h, i, :c]  # [R, c]
        R = idx.shape[0]
        flat = ((torch.arange(B, device=dev)[:, None, None] * Hkv + (h // group)[None, :, None]) * nk
                + idx[None]).reshape(-1)
        kg = torch.index_select(kblocks, 0, flat, out=_workspace("k", (flat.numel(), block, E), kblocks))
        vg = torch.index_select(vblocks, 0, flat, out=_workspace("v", (flat.numel(), block, Ev), vblocks))
        kg, vg = kg.view(B, R, c * block, E), vg.view(B, R, c * block, Ev)
        start = nq - R // H
        if R % H == 0 and torch.equal(rows, (torch.arange(H, device=dev)[:, None] * nq
                                             + torch.arange(start, nq, device=dev)).view(-1)):
            qs, rows = qb.view(B, H, nq, block, E)[:, :, start:], start  # every head's tail: a view of q
            qs = qs.reshape(B, R, block, E) if B > 1 or start == 0 else qs[0]
            kg, vg = (x if B > 1 or start == 0 else x.view(H, R // H, c * block, -1) for x in (kg, vg))
        else:
            qs = qb[:, rows]
        if masks is not None:
            attn_mask = _row_mask(masks, h, i, idx, S, block, causal)
            if qs.shape[0] != B:
                attn_mask = attn_mask.reshape(H, R // H, *attn_mask.shape[2:])
        else:
            attn_mask = _shared_mask(c, block, diagonal, S - (nk - 1) * block if tail else block,
                                     qb.dtype, dev)
        o, ls = attention_tiles.attend(qs, kg, vg, attn_mask, scale,
                                       dead=attention_tiles.dead_rows(attn_mask))
        yield rows, o.reshape(B, R, block, Ev), ls.reshape(B, R, block)


def _shared_mask(c, block, diagonal, first_len, dtype, device):
    """Additive [block, c·block] mask for rows whose first listed block is causal-diagonal and/or partial."""
    if not diagonal and first_len == block:
        return None
    allowed = torch.ones(block, c * block, dtype=torch.bool, device=device)
    cols = torch.arange(block, device=device)
    first = cols[None, :] < first_len
    if diagonal:
        first = first & (cols[None, :] <= cols[:, None])
    allowed[:, :block] = first
    return torch.zeros(block, c * block, dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))


def _row_mask(masks, h, i, idx, S, block, causal):
    """The mask's values for rows (h, i) over their listed key blocks idx [R, c], with the causal and
    past-the-end keys set to −∞."""
    R, c = idx.shape
    kpos = (idx[..., None] * block + torch.arange(block, device=idx.device)).view(R, c * block)
    bad = (kpos >= S)[:, None, :] if S % block else None
    if causal:
        late = kpos[:, None, :] > (i[:, None] * block + torch.arange(block, device=idx.device))[:, :, None]
        bad = late if bad is None else bad | late
    attn_mask = _gather_mask(masks, h, i, kpos.clamp(max=S - 1))
    return attn_mask if bad is None else attn_mask.masked_fill(bad, float("-inf"))


def _pad_seq(x, length):
    return x if x.shape[2] == length else F.pad(x, (0, 0, 0, length - x.shape[2]))


_workspaces = threading.local()


def _workspace(name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A reused scratch buffer for the gathered K/V blocks (one per thread, name, dtype and device).

    Why: a fresh multi-megabyte tensor per call is a fresh ``mmap``, and first-touch page faults made
    the gather cost 8x more than the copy itself (measured: 27 ms vs 3.3 ms for 75 MB at seq 4096).
    The buffers only live inside one call (their content never escapes), so reusing them is safe; they
    grow to the largest size seen.
    """
    cache = getattr(_workspaces, "buffers", None)
    if cache is None:
        cache = _workspaces.buffers = {}
    key = (name, like.dtype, like.device)
    numel = math.prod(shape)
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # usable both inside and outside inference mode
            buf = cache[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buf[:numel].view(shape)


def _mask_blocks(m, nq, block):
    """A `_full_mask` view as [Mb, Mh, nq | 1, block | 1, S] (query dimensions of size 1 when constant)."""
    Mb, Mh, L, S = m.shape
    if m.stride(2) == 0:
        return m[:, :, :1].reshape(Mb, Mh, 1, 1, S)
    return F.pad(m, (0, 0, 0, nq * block - L)).reshape(Mb, Mh, nq, block, S)


def _gather_mask(m, h, i, kpos):
    """The mask's values for rows (h, i) at key positions kpos [R, W]: [Mb, R, block | 1, W]."""
    Mb, Mh, mq, bq = m.shape[:4]
    rows = m[:, h if Mh > 1 else torch.zeros_like(h), i if mq > 1 else torch.zeros_like(i)]  # [Mb, R, bq, S]
    index = kpos[None, :, None, :].expand(Mb, kpos.shape[0], bq, kpos.shape[1])
    return torch.gather(rows, -1, index)


