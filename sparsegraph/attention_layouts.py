"""Block layouts of sparse attention, as functions of the sequence length.

Attention over L queries and S keys is cut into nq = ⌈L / block⌉ query blocks I and nk = ⌈S / block⌉
key blocks J. A head's *pattern* says which blocks (I, J) it computes. Every pattern family that
`head_patterns` offers, except ``block_topk``, is a union of *bands*, which makes it a function of
(nq, nk) rather than a list fitted at one length:

    diagonals D:  rel(I, J) = I + (nk − nq) − J ∈ D      (offsets from the diagonal, aligned at the end)
    columns C:    J ∈ C                                   (key blocks counted from the start: sinks)

- ``dense``: every block;
- ``local`` (w): D = {−(w−1) … w−1} (a causal site keeps those it allows: {0 … w−1});
- ``sink_local`` (s, w): C = {0 … s−1} and the local diagonals;
- ``multi_diagonal`` (D), ``vertical_slash`` (C, D): as stored;
- ``skip`` and ``dynamic_topk``: no static block (their blocks are chosen per input, or none);
- ``block_topk``: the fitted blocks, which exist only at the grid [nq0, nk0] they were fitted at;
- ``window_3d`` (extent [a_t, a_h, a_w], grid [T, H, W]): video tokens on a T × H × W grid in frame-major
  order (n = t·H·W + h·W + w, as a Conv3d patch embedding flattens them); query token (t, h, w) sees key
  token (t', h', w') iff |t − t'| ≤ a_t, |h − h'| ≤ a_h and |w − w'| ≤ a_w (a frame neighbourhood in time
  × space, PSA / Sparse-vDiT style). A block (I, J) is listed iff some query token of I sees some key
  token of J (`window_block_mask`), so the token window is kept whole;
- ``pyramid`` (``near``: ``local`` or ``window_3d``, with that family's parameters): the near pattern's
  blocks exactly, and every other key block through one *pooled* key (module `sparsegraph.codegen.
  block_sparse_attention`: its mean key and value, weighted by its token count). Its block mask is the
  near pattern's; the table marks the row ``POOLED`` (below). A two-level pyramid (tokens near, blocks
  far); why not more levels: the pooled level costs nk keys per query, 1 / block of dense attention,
  so a coarser third level could save at most that.

**Why the 3-D window is a kind of its own, not bands.** In frame-major order the window is *almost*
a set of diagonals: the key rows of query row (t, h) sit at token offsets Δt·H·W + Δh·W + [−a_w, a_w],
so with the block holding whole rows the block offsets are Δt·(H·W / block) + d. But those diagonals
wrap: at the top and bottom rows of a frame they list rows of the neighbouring frame's other edge
(h − a_h < 0 continues at h = H − 1 of frame t − 1), and when H·W is not a multiple of the block the
offsets of one frame pair are not one diagonal at all. Bands then list more blocks than the window
(`bench dit` reports how many more per head; `tests/test_window_layouts.py` shows one case) and are
tied to one H·W (a diagonal offset of "one frame back" means another frame at another canvas). The
window is laid out from its own parameters, exact at every grid and in grid units, which is what lets
a plan fitted on small clips be re-specialised to long ones (docs/diffusion.md).

Causal attention lists only J ≤ I + (nk − nq) (`allowed_blocks`).

**The table.** A rewrite stores a site's heads as one int64 table [H, W], which the ops lay out at the
lengths of each call (`layout`, cached per length), so one compiled graph serves every sequence
length, in PyTorch and in ONNX alike (the ONNX translation reads the same table). Row layout::

    [kind, nq0, nk0, n_diag, n_col, d_1 … d_n_diag, c_1 … c_n_col, bits of the fixed grid (nq0·nk0)]

``kind`` is ``BANDS``, ``DENSE``, ``FIXED`` or ``WINDOW``, plus ``POOLED`` (a flag: kind | 4) for a
``pyramid`` head, whose far blocks are read pooled (`pooled_heads`); every row holds the site's fixed grid
nq0 × nk0 (1 × 1 when no head is fixed: no slice of the table is ever empty) and the slot counts;
unused diagonal slots hold ``NO_DIAGONAL`` (matches no offset), unused column slots −1. A ``FIXED``
head (``block_topk``, or a layout given as a block mask) is sparse at its own grid only: at any other
grid it computes every block (dense, exact) and `LayoutWarning` says so once per length. A ``WINDOW``
head's diagonal slots hold ``a_t, a_h, a_w, T, H, W, block`` in that order (at least 7 slots then): it
exists at one token grid, so laying it out at another length than T·H·W (another grid than
⌈T·H·W / block⌉ blocks) raises `ResolutionError` naming both and the fix (replay the plan at the new
size: `sparse_attention` re-specialises the window to the grid it traces there). Nothing else needs
refitting at another length.
"""

from __future__ import annotations

import threading
import warnings
import weakref

import torch

from sparsegraph import ir

FAMILIES = ("dense", "local", "sink_local", "window_3d", "multi_diagonal", "vertical_slash", "block_topk",
            "dynamic_topk", "pyramid", "skip")
BANDS, DENSE, FIXED, WINDOW = 0, 1, 2, 3
POOLED = 4  # a flag on a row's kind: the head also reads its unlisted key blocks pooled (``pyramid``)
PYRAMID_NEAR = ("local", "window_3d")  # what a pyramid's exact near part may be
WINDOW_SLOTS = 7  # a_t, a_h, a_w, T, H, W, block
NO_DIAGONAL = -(2**40)
HEADER = 5  # kind, nq0, nk0, n_diag, n_col


class LayoutWarning(UserWarning):
    """A length-bound (fixed) head ran dense at a sequence length it was not fitted for."""


class ResolutionError(ValueError):
    """A 3-D window head was asked for at a token count its grid does not have (another resolution)."""


def allowed_blocks(nq: int, nk: int, causal: bool) -> torch.Tensor:
    """bool [nq, nk]: the blocks a pattern may list (causal: J ≤ I + (nk − nq), aligned at the end)."""
    if not causal:
        return torch.ones(nq, nk, dtype=torch.bool)
    return torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + (nk - nq)


def bands(pattern: str, params: dict) -> tuple[list[int], list[int], int]:
    """``(diagonals, columns, kind)`` of a pattern family (module docstring); ``FIXED`` for block_topk; a
    pyramid's is its near part's, with the ``POOLED`` flag."""
    if pattern == "dense":
        return [], [], DENSE
    if pattern in ("local", "sink_local"):
        w = int(params["window"])
        return list(range(-(w - 1), w)), list(range(int(params.get("sinks", 0)))), BANDS
    if pattern == "multi_diagonal":
        return [int(d) for d in params["diagonals"]], [], BANDS
    if pattern == "vertical_slash":
        return [int(d) for d in params["diagonals"]], [int(c) for c in params["columns"]], BANDS
    if pattern in ("skip", "dynamic_topk"):
        return [], [], BANDS
    if pattern == "block_topk":
        return [], [], FIXED
    if pattern == "window_3d":
        return [int(x) for x in params["extent"]] + [int(x) for x in params["grid"]], [], WINDOW
    if pattern == "pyramid":
        near = params.get("near")
        if near not in PYRAMID_NEAR:
            raise ValueError(f"a pyramid head's near part is {near!r}; it must be one of "
                             f"{list(PYRAMID_NEAR)}")
        diagonals, columns, kind = bands(near, params)
        return diagonals, columns, kind | POOLED
    raise ValueError(f"unknown attention pattern {pattern!r}")


def window_block_mask(extent, grid, block: int, nq: int | None = None, nk: int | None = None) -> torch.Tensor:
    """bool [nq, nk]: the blocks of a 3-D window (module docstring) over frame-major tokens of `grid`.

    Exact and cheap: a query block is a run of consecutive tokens, i.e. at most ⌈block / W⌉ + 1 row
    segments (t, h, w0 … w1). Each segment's window is the box t ± a_t, h ± a_h, w0 − a_w … w1 + a_w,
    i.e. (2a_t + 1)(2a_h + 1) key row segments, each a run of consecutive keys: their first and last
    key block bound a run of listed blocks, marked with a difference array. Cost O(nq · rows · (2a_t+1)
    (2a_h+1)), never the L × L token mask (`tests/test_window_layouts.py` checks against that mask)."""
    at, ah, aw = (int(x) for x in extent)
    T, H, W = (int(x) for x in grid)
    L = T * H * W
    n_blocks = -(-L // block)
    if (nq is not None and nq != n_blocks) or (nk is not None and nk != n_blocks):
        raise ResolutionError(
            f"a window_3d head was laid out for a token grid of {T}×{H}×{W} = {L} tokens ({n_blocks} "
            f"blocks of {block}); this call has {nq}×{nk} blocks (another resolution or clip length). Replay "
            "the plan at the new size (sparsegraph.compile(model, plan=..., example_inputs=<inputs at that "
            "size>)): sparse_attention re-specialises window_3d heads to the grid it traces")
    starts = torch.arange(n_blocks) * block
    ends = torch.clamp(starts + block, max=L) - 1  # last token of each query block
    per = -(-block // W) + 1  # rows a block can touch
    row = (starts // W)[:, None] + torch.arange(per)[None, :]  # [nq, R] global rows t·H + h
    valid = row <= (ends // W)[:, None]
    w0 = torch.where(row == (starts // W)[:, None], (starts % W)[:, None], torch.zeros_like(row))
    w1 = torch.where(row == (ends // W)[:, None], (ends % W)[:, None], torch.full_like(row, W - 1))
    t, h = row // H, row % H
    dt, dh = torch.meshgrid(torch.arange(-at, at + 1), torch.arange(-ah, ah + 1), indexing="ij")
    kt, kh = t[..., None] + dt.reshape(-1), h[..., None] + dh.reshape(-1)  # [nq, R, K]
    ok = valid[..., None] & (kt >= 0) & (kt < T) & (kh >= 0) & (kh < H)
    base = (kt * H + kh) * W
    first = (base + (w0 - aw).clamp(min=0)[..., None]) // block
    last = (base + (w1 + aw).clamp(max=W - 1)[..., None]) // block
    diff = torch.zeros(n_blocks, n_blocks + 1, dtype=torch.int32)
    rows_ = torch.arange(n_blocks)[:, None, None].expand_as(first)
    one = ok.to(torch.int32)
    diff.index_put_((rows_[ok], first[ok]), one[ok], accumulate=True)
    diff.index_put_((rows_[ok], last[ok] + 1), -one[ok], accumulate=True)
    return diff.cumsum(1)[:, :n_blocks] > 0


def pattern_mask(pattern: str, params: dict, nq: int, nk: int, causal: bool,
                 block: int | None = None) -> torch.Tensor:
    """bool [nq, nk] block mask of one head's pattern at a grid of nq query and nk key blocks (the
    single-head form of `block_mask`, which lays out a whole table; head_patterns fits with this one).
    `block` is needed by ``window_3d`` only (its grid is in tokens)."""
    diagonals, columns, kind = bands(pattern, params)
    kind = base_kind(kind)  # a pyramid's listed blocks are its near part's
    if kind == WINDOW:
        if block is None:
            raise ValueError("window_3d heads need the block size: pattern_mask(..., block=...)")
        mask = window_block_mask(params["extent"], params["grid"], block, nq, nk)
    elif kind == DENSE:
        mask = torch.ones(nq, nk, dtype=torch.bool)
    elif kind == FIXED:
        mask = _fixed_bits(params)
        if tuple(mask.shape) != (nq, nk):
            raise ValueError(f"block_topk layout was fitted at {list(mask.shape)} blocks, not {[nq, nk]}")
    else:
        rel = torch.arange(nq)[:, None] + (nk - nq) - torch.arange(nk)[None, :]
        mask = torch.isin(rel, torch.tensor(diagonals, dtype=torch.long))
        mask |= torch.isin(torch.arange(nk), torch.tensor(columns, dtype=torch.long))[None, :]
    return mask & allowed_blocks(nq, nk, causal)


def token_grid(gm, site) -> tuple[int, int, int] | None:
    """The (T, H, W) token grid of an attention site's sequence, found at trace time: the output
    [B, C, T, H, W] of a 3-D convolution (a video patch embedding) whose T·H·W is the site's query
    length, when exactly one such grid exists in the graph (None otherwise: give head_patterns' option
    ``grid``). The tokens are taken as the convolution flattens them, frame-major."""
    q = ir.shape(site.q)
    if q is None:
        return None
    found = set()
    for node in gm.graph.nodes:
        shape = ir.shape(node) if ir.kind(node) == "conv" else None
        if shape is not None and len(shape) == 5 and shape[2] * shape[3] * shape[4] == q[2]:
            found.add(tuple(int(x) for x in shape[2:]))
    return found.pop() if len(found) == 1 else None


# ------------------------------------------------------------------------------------------ tables


def table(heads: list[dict], block: int | None = None) -> torch.Tensor:
    """The int64 [H, W] table of heads given as ``{"pattern", "params"}`` (module docstring); `block`, the
    op's block size, is needed (and stored) only when a head is ``window_3d``."""
    rows = [bands(h["pattern"], h["params"]) for h in heads]
    if any(base_kind(kind) == WINDOW for _, _, kind in rows):
        if block is None:
            raise ValueError("window_3d heads need the block size of the site: table(heads, block=...)")
        rows = [([*d, int(block)], c, kind) if base_kind(kind) == WINDOW else (d, c, kind)
                for d, c, kind in rows]
    fixed = [_fixed_bits(h["params"]) if kind == FIXED else None for h, (_, _, kind) in zip(heads, rows)]
    return _pack(rows, fixed)


def fixed_table(block_mask_: torch.Tensor) -> torch.Tensor:
    """The table of explicit per-head block masks bool [H, nq, nk]: ``FIXED`` heads at that grid."""
    bm = block_mask_.bool().cpu()
    return _pack([([], [], FIXED)] * bm.shape[0], list(bm))


def _fixed_bits(params: dict) -> torch.Tensor:
    nq0, nk0 = params["shape"]
    bm = torch.zeros(nq0, nk0, dtype=torch.bool)
    for i, cols in enumerate(params["blocks"]):
        bm[i, cols] = True
    return bm


def _pack(rows: list[tuple[list[int], list[int], int]], fixed: list[torch.Tensor | None]) -> torch.Tensor:
    grids = {tuple(f.shape) for f in fixed if f is not None}
    if len(grids) > 1:
        raise ValueError(f"fixed heads of one site must share one grid, got {sorted(grids)}")
    nq0, nk0 = grids.pop() if grids else (1, 1)  # never empty: keeps every slice of the table non-empty
    n_diag = max([1] + [len(d) for d, _, _ in rows])
    n_col = max([1] + [len(c) for _, c, _ in rows])
    out = torch.zeros(len(rows), HEADER + n_diag + n_col + nq0 * nk0, dtype=torch.int64)
    for h, ((diagonals, columns, kind), bits) in enumerate(zip(rows, fixed)):
        out[h, :HEADER] = torch.tensor([kind, nq0, nk0, n_diag, n_col])
        if base_kind(kind) == WINDOW:  # parameters in order, not a set of offsets
            padded = diagonals + [NO_DIAGONAL] * (n_diag - len(diagonals))
            out[h, HEADER:HEADER + n_diag] = torch.tensor(padded)
            out[h, HEADER + n_diag:HEADER + n_diag + n_col] = -1
            continue
        out[h, HEADER:HEADER + n_diag] = torch.tensor(sorted(set(diagonals))
                                                      + [NO_DIAGONAL] * (n_diag - len(set(diagonals))))
        out[h, HEADER + n_diag:HEADER + n_diag + n_col] = torch.tensor(sorted(set(columns))
                                                                       + [-1] * (n_col - len(set(columns))))
        if bits is not None:
            out[h, HEADER + n_diag + n_col:] = bits.reshape(-1).long()
    return out


def check_table(t: torch.Tensor, heads: int) -> None:
    """Raise ValueError naming the problem when `t` is not a layout table for `heads` heads."""
    if t.dim() != 2 or t.dtype != torch.int64 or t.shape[0] != heads or t.shape[1] < HEADER + 2:
        raise ValueError(f"layout table {tuple(t.shape)} {t.dtype} is not an int64 [heads={heads}, ≥ "
                         f"{HEADER + 2}] table (sparsegraph.attention_layouts.table / fixed_table "
                         "build one)")
    n_diag, n_col, nq0, nk0 = (int(t[0, i]) for i in (3, 4, 1, 2))
    if t.shape[1] != HEADER + n_diag + n_col + nq0 * nk0 or min(n_diag, n_col, nq0, nk0) < 1:
        raise ValueError(f"layout table of width {t.shape[1]} does not match its header "
                         f"({n_diag} diagonals, {n_col} columns, fixed grid {nq0}×{nk0})")
    if not bool(((t[:, 0] >= BANDS) & (t[:, 0] <= (WINDOW | POOLED))).all()):
        raise ValueError(f"layout table kinds {sorted(set(t[:, 0].tolist()))} are not all in 0 … 7 (0–3, "
                         "plus 4 for pooled far blocks)")
    if bool((base_kind(t[:, 0]) == WINDOW).any()) and n_diag < WINDOW_SLOTS:
        raise ValueError(f"layout table has window_3d rows but {n_diag} < {WINDOW_SLOTS} parameter slots")


def block_mask(t: torch.Tensor, nq: int, nk: int, causal: bool) -> torch.Tensor:
    """bool [H, nq, nk]: the blocks each head of table `t` lists at a grid of nq × nk blocks."""
    mask, note = _laid_out(t, nq, nk, causal)
    if note:
        warnings.warn(LayoutWarning(note), stacklevel=2)
    return mask


def _laid_out(t: torch.Tensor, nq: int, nk: int, causal: bool) -> tuple[torch.Tensor, str | None]:
    """`block_mask`, and the warning to give when fixed heads run dense at this grid (else None)."""
    t = t.cpu()
    n_diag, n_col = int(t[0, 3]), int(t[0, 4])
    diagonals = t[:, HEADER:HEADER + n_diag]
    columns = t[:, HEADER + n_diag:HEADER + n_diag + n_col]
    rel = torch.arange(nq)[:, None] + (nk - nq) - torch.arange(nk)[None, :]
    mask = (rel[None, :, :, None] == diagonals[:, None, None, :]).any(-1)
    mask |= (torch.arange(nk)[None, :, None] == columns[:, None, :]).any(-1)[:, None, :]
    kind = base_kind(t[:, 0])  # the listed blocks; the pooled flag adds none
    mask |= (kind == DENSE)[:, None, None]
    for h in (kind == WINDOW).nonzero().view(-1).tolist():
        p = t[h, HEADER:HEADER + WINDOW_SLOTS].tolist()
        mask[h] = window_block_mask(p[0:3], p[3:6], p[6], nq, nk)
    fixed = (kind == FIXED).nonzero().view(-1).tolist()
    note = None
    if fixed:
        nq0, nk0 = int(t[0, 1]), int(t[0, 2])
        if (nq0, nk0) == (nq, nk):
            bits = t[fixed, HEADER + n_diag + n_col:HEADER + n_diag + n_col + nq0 * nk0]
            mask[fixed] = bits.view(len(fixed), nq, nk).bool()
        else:
            mask[fixed] = True
            note = (f"{len(fixed)} attention head(s) have block_topk layouts fitted at {nq0}×{nk0} blocks; "
                    f"at {nq}×{nk} blocks they run dense (exact, not sparse). Calibrate at this length, or "
                    "leave block_topk out of head_patterns' patterns for length-independent layouts")
    return mask & allowed_blocks(nq, nk, causal), note


def base_kind(kind):
    """A row's kind without the `POOLED` flag: the kind of its listed blocks (a pyramid's near part).
    Takes an int or an int tensor of kinds (ONNX, which has no bitwise and before opset 18, writes it
    as ``Mod(kind, POOLED)``: the flag is the highest bit)."""
    return kind & ~POOLED


def pooled_heads(t: torch.Tensor) -> torch.Tensor:
    """bool [H]: the heads of table `t` that read their unlisted key blocks pooled (``pyramid``)."""
    return (t[:, 0] & POOLED) != 0


def layout_from_block_mask(bm: torch.Tensor) -> torch.Tensor:
    """Bool [H, nq, nk] block mask → int64 [H, nq, nsel] index lists (ascending, padded with −1)."""
    bm = bm.bool()
    nk = bm.shape[-1]
    nsel = max(1, int(bm.sum(-1).max())) if bm.numel() else 1
    cols = torch.arange(nk, device=bm.device).expand_as(bm)
    keyed = torch.where(bm, cols, nk + cols)  # listed blocks first, in ascending order
    order = keyed.sort(-1).values[..., :nsel]
    return torch.where(order < nk, order, -1).to(torch.int64).contiguous()


def block_mask_from_layout(layout: torch.Tensor, nk: int) -> torch.Tensor:
    """int64 [H, nq, nsel] index lists → bool [H, nq, nk] block mask."""
    hit = layout[..., None] == torch.arange(nk, device=layout.device)
    return hit.any(-2)


# ------------------------------------------------------------------------------------------ per-length cache

_lock = threading.RLock()  # re-entrant: a freed table's eviction may run inside a locked section
_cache: dict[int, tuple[weakref.ref, int, dict]] = {}


def layout(t: torch.Tensor, nq: int, nk: int, causal: bool,
           device: torch.device | None = None) -> torch.Tensor:
    """Index lists int64 [H, nq, nsel] of table `t` at a grid of nq × nk blocks, cached per table and length.

    The cache is keyed by the table object (a graph buffer: the same tensor at every call) and its
    version counter, so an edited table is laid out again; entries go when the table is freed.
    Thread-safe: concurrent calls may both compute a missing entry, and one of the equal results is
    kept. Fixed heads laid out dense at this grid warn at every call (`LayoutWarning`).
    """
    device = device or t.device
    key = (nq, nk, bool(causal), str(device))
    version = 0 if t.is_inference() else t._version  # inference tensors keep no version counter
    with _lock:
        entry = _cache.get(id(t))
        found = (entry[2].get(key) if entry is not None and entry[0]() is t and entry[1] == version
                 else None)
    if found is None:
        mask, note = _laid_out(t, nq, nk, causal)
        found = (layout_from_block_mask(mask).to(device), note)
        with _lock:
            entry = _cache.get(id(t))
            if entry is None or entry[0]() is not t or entry[1] != version:
                ident = id(t)
                entry = _cache[ident] = (weakref.ref(t, lambda _, ident=ident: _evict(ident)), version, {})
            found = entry[2].setdefault(key, found)
    if found[1]:
        warnings.warn(LayoutWarning(found[1]), stacklevel=3)
    return found[0]


def _evict(ident: int) -> None:
    with _lock:
        entry = _cache.get(ident)
        if entry is not None and entry[0]() is None:
            del _cache[ident]
