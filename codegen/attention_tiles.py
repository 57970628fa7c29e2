"""The torch fallback of ``block_sparse_attention`` (`attention_fallback`): a static layout cut into a few
large SDPA calls.

Why: SDPA's CPU flash kernel runs near GEMM speed when many queries share their keys and much slower
when every query block has its own few keys. Measured here (2-core Xeon, fp32, head dim 64): 4096
queries × 256 shared keys run at 202 GFLOP/s; 768 query blocks of 64, each with its own 384 gathered
keys, at 140, plus the gather's copy. Real layouts are mostly columns (sinks, vertical lines) and
diagonals (local windows, slashes), so each head's listed blocks are split, exactly (every listed
block in one tile), into

- ``Columns`` (r0, C): key blocks C listed by every query block from r0 on. One call: the queries
  r0·block… × the keys of C (a slice when C is contiguous, else a gather of |C|·block keys). A dense
  head is all columns. Causal: r0 is past the last column of the tile, so no element mask is needed
  (the blocks above r0 are left to the other tiles); a head listing the whole lower triangle is one
  ``is_causal`` call instead;
- ``Band`` (i0…i1, d0…d1): query blocks i0 ≤ i < i1 that each list the consecutive key blocks
  i+d0 … i+d1. One call per head, batched over the rows, whose keys are an overlapping strided view
  of K (no copy); window blocks another tile already took are masked per row (``excluded``) rather
  than cutting the band; a causal band that ends on the diagonal takes one [block, w·block] triangle
  mask shared by all rows;
- the rest: the general path (`attention_fallback._listed`), which gathers the listed blocks.

Columns tiles of heads that read as many keys from the same first row run in one call (keys
gathered per head, or one slice when they are the same) when the heads are evenly spaced, so q stays
a view. Every call also returns the log-sum-exp ℓ_t of its scores per query, and the partial results
merge exactly (the flash-attention identity), into an `Accumulator`:

    ℓ = log Σ_t e^{ℓ_t},        out = Σ_t e^{ℓ_t − ℓ} · out_t

A call whose keys are all masked (−∞) for a query row carries no mass there: ℓ_t = −∞. A tiling
depends only on the layout and the shapes, so it is computed once and cached.
"""

from __future__ import annotations

import collections
import itertools
import math
import threading
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from sparsegraph.attention_layouts import block_mask_from_layout, layout_from_block_mask

MIN_ROWS = 2  # a columns or band tile must cover at least this many query blocks
MIN_KEYS = 256  # a columns tile must read at least this many keys (measured: 4096 queries × 128 keys run at
#                 ~70% of the speed of × 256, and then splitting rows between tiles does not pay)
MAX_REST = 0.25  # a head whose tiles leave more of its rows than this to the gathered path: gather it all


@dataclass(frozen=True)
class Heads:
    """Query heads start, start + step, … (count of them): a strided slice, so every operand is a view."""

    start: int
    step: int
    count: int

    @property
    def slice(self) -> slice:
        return slice(self.start, self.start + self.step * (self.count - 1) + 1, self.step)

    @property
    def all(self) -> range:
        return range(self.start, self.start + self.step * self.count, self.step)

    def kv(self, group: int) -> Heads:
        """The kv heads read by these heads (GQA: h // group); step 0 when they share one."""
        return Heads(self.start // group, (self.start + self.step) // group - self.start // group, self.count)


@dataclass(frozen=True)
class Columns:
    """Query blocks first_row… of `heads` × key blocks cols[g] (head g of the group; same count each)."""

    heads: Heads
    first_row: int
    cols: tuple[tuple[int, ...], ...]
    causal: bool = False  # the whole lower triangle, run with is_causal


@dataclass(frozen=True)
class Band:
    """Query blocks i0 ≤ i < i1 of `heads` × key blocks i + d0 … i + d1, minus `excluded`
    (bool [G, i1 − i0, d1 − d0 + 1]: blocks another tile took, masked)."""

    heads: Heads
    rows: tuple[int, int]
    offsets: tuple[int, int]
    excluded: np.ndarray = field(compare=False)


@dataclass(frozen=True)
class Tiling:
    columns: tuple[Columns, ...]
    bands: tuple[Band, ...]
    rest: torch.Tensor  # [H, nq, nsel] layout of the blocks no tile took (−1 where none)

    @property
    def calls(self) -> int:
        return len(self.columns) + len(self.bands)


# ------------------------------------------------------------------------------------------ tiling

_cache: collections.OrderedDict = collections.OrderedDict()
_lock = threading.Lock()


def tiling(layout: torch.Tensor, L: int, S: int, block: int, causal: bool, group: int) -> Tiling:
    """The tiles of `layout` at query length L, key length S (cached by the layout's content)."""
    host = layout.detach().to("cpu", torch.int64).contiguous()
    key = (host.numpy().tobytes(), tuple(host.shape), L, S, block, causal, group)
    with _lock:
        found = _cache.get(key)
        if found is not None:
            _cache.move_to_end(key)
            return found
    found = _tile(host, L, S, block, causal, group)
    with _lock:  # concurrent callers may both tile a new layout; one of the equal results is kept
        found = _cache.setdefault(key, found)
        while len(_cache) > 256:
            _cache.popitem(last=False)
    return found


def untiled(layout: torch.Tensor, L: int, S: int, block: int, causal: bool, group: int) -> Tiling:
    """Every block left to the gathered path (causal: the blocks after the diagonal dropped)."""
    if causal:
        layout = torch.where(layout > torch.arange(layout.shape[1], device=layout.device)[None, :, None],
                             -1, layout)
    return Tiling((), (), layout)


def _tile(layout, L, S, block, causal, group) -> Tiling:
    H, nq = layout.shape[:2]
    nk = math.ceil(S / block)
    listed = block_mask_from_layout(layout, nk).numpy()
    if causal:
        listed = listed & np.tri(nq, nk, dtype=bool)
    left = listed.copy()  # blocks no tile has taken yet
    full_q = (np.arange(nq) + 1) * block <= L
    full_k = (np.arange(nk) + 1) * block <= S
    columns: dict[tuple, dict[int, tuple[int, ...]]] = {}
    bands: dict[tuple, dict[int, np.ndarray]] = {}
    for h in range(H):
        head_columns = _take_columns(left[h], causal, block)
        head_bands = _take_bands(listed[h], left[h], causal, full_q, full_k)
        if left[h].any(-1).sum() > MAX_REST * nq:  # the tiles would save little and cut rows in two
            left[h] = listed[h]
            continue
        for first_row, cols, whole in head_columns:
            keys = len(cols) * block - (block * nk - S if cols[-1] == nk - 1 else 0)
            columns.setdefault((first_row, keys, whole), {})[h] = cols
        for rows, offsets, excluded in head_bands:
            bands.setdefault((rows, offsets), {})[h] = excluded
    return Tiling(
        tuple(Columns(heads, first_row, tuple(per_head[h] for h in heads.all), whole)
              for (first_row, _, whole), per_head in columns.items()
              for heads in _strided(list(per_head), group)),
        tuple(Band(heads, rows, offsets, np.stack([per_head[h] for h in heads.all]))
              for (rows, offsets), per_head in bands.items() for heads in _strided(list(per_head), group)),
        layout_from_block_mask(torch.from_numpy(left)))


def _take_columns(a: np.ndarray, causal: bool, block: int) -> list[tuple]:
    """Columns tiles (first row, key blocks, whole lower triangle) of one head's remaining blocks `a`
    [nq, nk], cleared where taken."""
    nq, nk = a.shape
    if causal:
        if a.any() and (a == np.tri(nq, nk, dtype=bool)).all():
            a[:] = False
            return [(0, tuple(range(nk)), True)]
        # column j is seen by the rows after j; consecutive such columns share a tile from the row after them
        full = np.array([a[j + 1:, j].all() and nq - j - 1 >= MIN_ROWS for j in range(nk)])
        taken = []
        for start, stop in _runs(full):
            if nq - stop >= MIN_ROWS and (stop - start) * block >= MIN_KEYS:
                a[stop:, start:stop] = False
                taken.append((stop, tuple(range(start, stop)), False))
        return taken
    cols = np.flatnonzero(a.all(0))
    if len(cols) < nk and (len(cols) * block < MIN_KEYS or nq < MIN_ROWS):
        return []
    a[:, cols] = False
    return [(0, tuple(int(c) for c in cols), False)]


def _take_bands(listed: np.ndarray, a: np.ndarray, causal: bool, full_q: np.ndarray,
                full_k: np.ndarray) -> list[tuple]:
    """Band tiles (rows, offsets, excluded) of one head: diagonals of `listed` [nq, nk] taken from the
    remaining blocks `a` (cleared where taken); blocks of the window already taken are masked
    (`excluded`) rather than cutting the band. Runs of consecutive diagonals first (wider windows),
    then single diagonals on what is left."""
    nq, nk = a.shape
    rows = np.arange(nq)

    def window(d: int, of: np.ndarray) -> np.ndarray:
        j = rows + d
        jj = j.clip(0, nk - 1)
        return (j >= 0) & (j < nk) & full_q & full_k[jj] & of[rows, jj]

    offsets = [d for d in range(-(nq - 1), 1 if causal else nk)
               if any(stop - start >= MIN_ROWS for start, stop in _runs(window(d, a)))]
    taken = []

    def take(d0: int, d1: int) -> None:
        span = range(d0, d1 + 1)
        ok = np.logical_and.reduce([window(d, listed) for d in span])
        ok &= np.logical_or.reduce([window(d, a) for d in span])  # a row must add something
        for start, stop in _runs(ok):
            if stop - start >= MIN_ROWS:
                r = rows[start:stop]
                taken.append(((start, stop), (d0, d1), np.stack([~a[r, r + d] for d in span], -1)))
                for d in span:
                    a[r, r + d] = False

    for d0, d1 in _runs(np.isin(np.arange(-(nq - 1), nk), offsets), base=-(nq - 1)):
        take(d0, d1 - 1)
    for d in offsets:
        take(d, d)
    return taken


def _runs(flags: np.ndarray, base: int = 0) -> list[tuple[int, int]]:
    """[start, stop) of each run of True in `flags` (indices shifted by `base`)."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flags.astype(np.int8), [0]])))
    return [(int(s) + base, int(e) + base) for s, e in zip(edges[::2], edges[1::2], strict=True)]


def _strided(heads: list[int], group: int) -> list[Heads]:
    """Split ascending `heads` into runs that are evenly spaced, and whose kv heads are too (views)."""
    def even(xs: list[int]) -> bool:
        return all(b - a == xs[1] - xs[0] for a, b in itertools.pairwise(xs))

    out: list[Heads] = []
    i = 0
    while i < len(heads):
        j = i + 1
        while j < len(heads) and even(heads[i:j + 1]) and even([h // group for h in heads[i:j + 1]]):
            j += 1
        out.append(Heads(heads[i], heads[i + 1] - heads[i] if j - i > 1 else 1, j - i))
        i = j
    return out


# ------------------------------------------------------------------------------------------ running


class Accumulator:
    """The output being built: [B, H, nq·block, Ev] and its log-sum-exp, with which query blocks
    (head, block) some call has written. A call's result is assigned where nothing was written yet and
    merged elsewhere; rows nobody writes get "no mass" (0) at the end. The first call that covers every
    row becomes the buffer itself. Why so careful: a fresh multi-megabyte buffer costs page faults on
    first touch (~4 ms for 12 MB here), as much as a tile's compute, so none is allocated or zero-filled
    that is not needed.
    """

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device, block: int):
        self.shape, self.dtype, self.device, self.block = shape, dtype, device, block
        self.out = self.lse = None
        self.ready = torch.zeros(shape[1], shape[2] // block, dtype=torch.bool, device=device)

    def _alloc(self) -> None:
        if self.out is None:
            self.out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            self.lse = torch.empty(self.shape[:3], device=self.device)

    def put(self, heads: slice | int, first: int, o, ls) -> None:
        """Rows first·block… (as many as o has) of `heads`: o [B, (G,) rows, Ev], ls [B, (G,) rows]."""
        o = o.to(self.dtype)
        n = o.shape[-2]
        blocks = slice(first, first + math.ceil(n / self.block))
        done = self.ready[heads, blocks]
        if (self.out is None and first == 0 and o.shape == self.shape and o.is_contiguous()):
            self.out, self.lse = o, ls.contiguous()  # one call wrote every row: its output is the buffer
        else:
            self._alloc()
            rows = slice(first * self.block, first * self.block + n)
            region, region_lse = self.out[:, heads, rows], self.lse[:, heads, rows]
            if not bool(done.any()):
                region.copy_(o)
                region_lse.copy_(ls)
            else:
                if not bool(done.all()):
                    empty = ~done.repeat_interleave(self.block, -1)[..., :n]
                    region[:, empty], region_lse[:, empty] = 0, float("-inf")
                merge(region, region_lse, o, ls)
        self.ready[heads, blocks] = True

    def put_rows(self, rows: torch.Tensor, o, ls) -> None:
        """Query blocks `rows` (indices into H·nq): o [B, R, block, Ev], ls [B, R, block]."""
        self._alloc()
        B, H, Lp, Ev = self.shape
        out5, lse4 = (self.out.view(B, H, Lp // self.block, self.block, Ev),
                      self.lse.view(B, H, -1, self.block))
        h, i = rows // self.ready.shape[1], rows % self.ready.shape[1]
        done = self.ready[h, i]
        if not bool(done.any()):
            out5[:, h, i], lse4[:, h, i] = o.to(self.dtype), ls
        else:  # gathered, merged, written back
            acc, acc_lse = out5[:, h, i], lse4[:, h, i]
            acc[:, ~done], acc_lse[:, ~done] = 0, float("-inf")
            merge(acc, acc_lse, o.to(self.dtype), ls)
            out5[:, h, i], lse4[:, h, i] = acc, acc_lse
        self.ready[h, i] = True

    def result(self, L: int):
        self._alloc()
        B, H, _, Ev = self.shape
        h, i = (~self.ready).nonzero(as_tuple=True)
        if len(h):
            self.out.view(B, H, -1, self.block, Ev)[:, h, i] = 0
            self.lse.view(B, H, -1, self.block)[:, h, i] = float("-inf")
        return self.out[:, :, :L]


def run(t: Tiling, q, k, v, mask, block: int, causal: bool, scale: float, acc: Accumulator, *,
        whole: bool) -> None:
    """Compute tiles of `t` into `acc`: with `whole`, the columns tiles that cover their heads from
    row 0 (run first, so one of them may become the buffer), else all the others.

    `mask`: None or the additive mask as a [Mb, Mh, L, S] view (Mb ∈ {1, B}, Mh ∈ {1, H}; stride 0 over
    queries when it does not vary with the query, as a padding mask).
    """
    B, H, L, _ = q.shape
    S, group = k.shape[2], H // k.shape[1]
    for c in t.columns:
        if (c.first_row == 0) != whole:
            continue
        rows = slice(c.first_row * block, L)
        keys = _key_positions(c, block, S, group, q.device)
        if isinstance(keys, slice):  # the same contiguous keys for every head: views
            ks, vs = (_heads(x, c.heads.kv(group))[:, :, keys] for x in (k, v))
        else:
            kv_heads, pos = keys
            ks, vs = k[:, kv_heads[:, None], pos], v[:, kv_heads[:, None], pos]
        m = None if mask is None else _columns_mask(mask, c.heads, rows, keys)
        o, ls = attend(q[:, c.heads.slice, rows], ks, vs, m, scale, causal=c.causal, dead=dead_rows(m))
        if whole and c.heads.count == H and acc.shape[2] > L:  # padded to whole blocks: may become the buffer
            o, ls = F.pad(o, (0, 0, 0, acc.shape[2] - L)), F.pad(ls, (0, acc.shape[2] - L))
        acc.put(c.heads.slice, c.first_row, o, ls)
    if whole:
        return
    for band in t.bands:
        (i0, i1), (d0, d1) = band.rows, band.offsets
        n, width = i1 - i0, (d1 - d0 + 1) * block
        excluded = None
        if band.excluded.any():
            taken = torch.from_numpy(band.excluded).to(q.device).repeat_interleave(block, -1)[:, :, None, :]
            excluded = torch.zeros(taken.shape, dtype=q.dtype, device=q.device).masked_fill(
                taken, float("-inf"))
        for g, h in enumerate(band.heads.all):  # one call per head: measured faster than one over all
            # heads (each call's output is a fresh buffer, and small ones reuse freed memory, big ones fault)
            m = None if excluded is None else excluded[g:g + 1]
            qs = _windows(q, h, i0 * block, n, block, block)
            ks, vs = (_windows(x, h // group, (i0 + d0) * block, n, width, block) for x in (k, v))
            if mask is not None:
                padding = _band_mask(mask, h, i0, d0, n, width, block)
                m = padding if m is None else m + padding
            dead = dead_rows(m)
            if causal and d1 == 0:  # the last block of each window is the diagonal one: one shared triangle
                tri = torch.ones(block, width, dtype=torch.bool, device=q.device).triu(width - block + 1)
                m = (torch.zeros(block, width, dtype=q.dtype, device=q.device) if m is None
                     else m).masked_fill(tri, float("-inf"))
            o, ls = attend(qs, ks, vs, m, scale, dead=dead)
            acc.put(h, i0, o.reshape(B, n * block, -1), ls.reshape(B, n * block))


def attend(q, k, v, mask, scale: float, causal: bool = False, dead=None):
    """Attention over all of k with its log-sum-exp per query: (out [..., Lq, Ev], lse [..., Lq] fp32).

    `dead` (broadcastable to lse): rows whose keys are all masked, whose lse is −∞ (SDPA's CPU kernel
    returns 0 there). Off the CPU (the eager path on CUDA) the same is computed with plain matmuls.
    """
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal,
                                                                             attn_mask=mask, scale=scale)
    else:
        out, lse = attend_matmul(q, k, v, mask, scale, causal)
    if dead is not None:
        lse = lse.masked_fill(dead, float("-inf"))
    return out, lse


def attend_matmul(q, k, v, mask, scale: float, causal: bool = False):
    """`attend` with plain matmuls (any device), in fp32: a row with every key masked gets lse −∞, out 0."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask.float()
    if causal:
        above = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(above, float("-inf"))
    lse = torch.logsumexp(s, -1)
    return (torch.exp(s - lse[..., None]).nan_to_num(0.0) @ v.float()).to(q.dtype), lse


def merge(acc, lse, out, out_lse) -> None:
    """acc, lse ← the exact merge of (acc, lse) with a partial result (out, out_lse), in place.

    With ℓ = log(e^lse + e^out_lse) the weights e^{lse−ℓ} and e^{out_lse−ℓ} sum to 1, so the merge is one
    interpolation pass: acc + e^{out_lse−ℓ}·(out − acc).
    """
    new = torch.logaddexp(lse, out_lse)
    add = (out_lse - new).exp_().nan_to_num_(0.0)  # −∞ − (−∞): neither has mass → acc stays
    acc.lerp_(out.to(acc.dtype), add.unsqueeze(-1))
    lse.copy_(new)


def _key_positions(c: Columns, block: int, S: int, group: int, device):
    """The key positions of a columns tile: a slice when every head reads the same contiguous blocks,
    else (kv head [G], positions [G, P]) to gather."""
    first = c.cols[0]
    if all(cols == first for cols in c.cols) and first[-1] - first[0] == len(first) - 1:
        return slice(first[0] * block, min((first[-1] + 1) * block, S))
    blocks = torch.tensor(c.cols, device=device)  # [G, c]
    pos = (blocks[..., None] * block + torch.arange(block, device=device)).flatten(1)
    # a partial last block is the last one listed
    pos = pos[:, :int((pos[0] < S).sum())] if S % block else pos
    return torch.tensor([h // group for h in c.heads.all], device=device), pos


def _heads(x, heads: Heads):
    """x [B, Hx, T, E] at heads `heads` (step 0 allowed: GQA heads sharing one kv head): a view."""
    sB, sH, sT, sE = x.stride()
    return x.as_strided((x.shape[0], heads.count, x.shape[2], x.shape[3]), (sB, heads.step * sH, sT, sE),
                        x.storage_offset() + heads.start * sH)


def _windows(x, head: int, first: int, count: int, width: int, hop: int):
    """Overlapping windows x[:, head, first + r·hop : … + width] for r < count: a [B, count, width, E]
    view."""
    sB, sH, sT, sE = x.stride()
    return x.as_strided((x.shape[0], count, width, x.shape[3]), (sB, hop * sT, sT, sE),
                        x.storage_offset() + head * sH + first * sT)


def _columns_mask(mask, heads: Heads, rows: slice, keys):
    """The mask of a columns tile: [Mb, G or 1, Lq, P] (a view where the keys are a slice)."""
    m = mask[:, heads.slice if mask.shape[1] > 1 else slice(None), rows]
    if isinstance(keys, slice):
        return m[..., keys]
    pos = keys[1]
    constant = m.stride(2) == 0  # constant over queries: gather one row, not every query's
    src = m[:, :, :1] if constant else m
    G = pos.shape[0]
    src = src.expand(src.shape[0], G, *src.shape[2:])
    picked = torch.gather(src, 3, pos[None, :, None, :].expand(src.shape[0], G, src.shape[2], pos.shape[1]))
    return picked.expand(*picked.shape[:2], m.shape[2], pos.shape[1]) if constant else picked


def _band_mask(mask, head: int, i0: int, d0: int, count: int, width: int, block: int):
    """The mask seen by each row of a band of one head: [Mb, count, block, width] (a view)."""
    smb, smh, sl, ss = mask.stride()
    return mask.as_strided((mask.shape[0], count, block, width), (smb, block * (sl + ss), sl, ss),
                           mask.storage_offset() + (head * smh if mask.shape[1] > 1 else 0)
                           + i0 * block * sl + (i0 + d0) * block * ss)


def dead_rows(m):
    """Query rows whose keys in this call are all −∞ (None when the mask cannot have them)."""
    if m is None:
        return None
    if m.stride(-2) == 0:
        return (m[..., :1, :] == float("-inf")).all(-1)
    return (m == float("-inf")).all(-1)
