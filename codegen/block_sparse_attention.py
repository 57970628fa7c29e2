"""``sparsegraph::block_sparse_attention``: attention over a static, per-head set of key blocks.

Inputs: q [B, H, L, E], k [B, Hkv, S, E], v [B, Hkv, S, Ev] (GQA: query head h reads kv head
h // (H / Hkv)); ``layout`` an int64 layout *table* [H, W] (`sparsegraph.attention_layouts`): per head a
pattern family's bands (diagonals and columns of the block grid, or dense), or a fixed block mask,
laid out at each call's lengths as index lists [H, nq, nsel], nq = ⌈L / block⌉ (cached per length); ``mask``
an optional *additive* float mask broadcastable to [B, H, L, S] (padding: 0 / −inf); ``block`` the
block size of queries and keys; ``causal`` (SDPA's top-left alignment: key j is seen by query i iff j ≤
i); ``scale`` the score scale (1/√E in SDPA). With M(h, i, j) = [key block of j is listed for the query
block of i in head h] ∧ (¬causal ∨ j ≤ i):

    out[b, h, i] = Σ_j softmax_j( q_i·k_j · scale + mask[b, h, i, j]  over j with M(h, i, j) ) · v_j

A query row with no allowed key gives 0 (SDPA would give NaN). L and S need not be multiples of
``block``: the last blocks are partial. Any sequence length runs: structured patterns are laid out at
it; a fixed head (``block_topk``, or a block mask given with ``fixed_table``) is sparse at its own
grid and dense elsewhere, with a `LayoutWarning`; a ``window_3d`` head exists at its token grid only
and raises `attention_layouts.ResolutionError` at another length (naming both and the fix).

**Pyramid heads** (the table's ``POOLED`` flag, `attention_layouts.pooled_heads`) also read every key
block J their list leaves out, through one pooled key: the block's mean key k̄_J and mean value v̄_J,
weighted by its n_J tokens (n_J = block, or fewer in a partial last block). With L(i) the listed keys
and F(i) the unlisted blocks of query i,

    out_i = (Σ_{j ∈ L(i)} e^{s_ij} v_j + Σ_{J ∈ F(i)} n_J e^{s̄_iJ} v̄_J)
            / (Σ_{j ∈ L(i)} e^{s_ij} + Σ_{J ∈ F(i)} n_J e^{s̄_iJ}),

    s_ij = q_i·k_j·scale,   s̄_iJ = q_i·k̄_J·scale:

a block's pooled term replaces Σ_{j ∈ J} e^{s_ij} v_j by what it is when the block's scores are equal
(n_J e^{s̄} ≤ Σ e^{s} by Jensen: far blocks are under-weighted where their scores spread). Pyramid heads
take no additive mask and no causal attention (a pooled key would mix keys the mask tells apart): such a
call is refused. The compiled CPU kernel reads the pooled keys after the listed blocks in the same
online softmax (nk more keys a query, 1 / block of dense); the torch fallback and Triton compute the
listed part with its log-sum-exp and the pooled part densely (``far``), merged exactly by log-sum-exp
(`with_far`); the reference appends the pooled keys to the keys (one softmax over both).

Why index lists inside: a kernel walks only the listed blocks, in place. ``layout_from_block_mask``
converts a bool [H, nq, nk] block mask into them.

Backends:

- reference: the dense score matrix with the layout expanded to an element mask (the oracle);
- CPU: the compiled C++ kernel (`cpu_kernels`, built at install time) when it is there: a
  flash-attention forward over the listed blocks, one pass, no gather (in a call without a mask, not
  causal, the heads that list every block go to SDPA instead: `_dense_heads`). Otherwise the torch fallback
  (`attention_fallback`: the layout cut into a few large SDPA calls, the rest gathered, merged exactly
  by log-sum-exp); figures for both in ``bench/results/attention-cpu.md``;
- Triton (`triton_kernels/block_sparse_attention.py`): flash-attention forward over the listed blocks
  of each query block with online softmax; fp32/fp16/bf16, fp32 accumulation;
- ONNX: the block mask is laid out from the same table at the run-time lengths (``onnx_table_mask``:
  the bands compared against ``Range`` grids, the fixed grid where the lengths match, window rows from
  their token-level mask reduced to blocks: `onnx_window_mask`), expanded to [H, L, S] with two
  ``Gather``s, then dense masked softmax attention, with the pooled keys of pyramid heads appended when
  the call has no mask and is not causal (for every head, masked off where it is not pooled). Exact, at
  dense speed. (A window row at another
  length than its grid's is not refused there: the ONNX file is exported at the traced size.)

Autograd: the reference differentiated (`op.by_reference`), the layout fixed: gradients to q, k, v and
an additive mask, exactly the oracle's, at the reference's memory (the dense [B, H, L, S] scores): fine
for recovery on calibration-length sequences, not a flash-attention backward.
"""

from __future__ import annotations

import math

import torch
from onnxscript import opset18 as op

from sparsegraph import attention_layouts as layouts
from sparsegraph import ir
from sparsegraph.attention_layouts import block_mask_from_layout
from sparsegraph.codegen import attention_fallback, attention_tiles, cpu_kernels
from sparsegraph.codegen.op import SparseOp, by_reference

# ----------------------------------------------------------------------------------------- layouts


def block_counts(L: int, S: int, block: int) -> tuple[int, int]:
    return math.ceil(L / block), math.ceil(S / block)


def lists(q, k, v, layout, block, causal) -> torch.Tensor:
    """Check the operands; the layout table laid out at this call's lengths: int64 [H, nq, nsel]."""
    H = q.shape[1]
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape[2] != v.shape[2] or k.shape[1] != v.shape[1] \
            or k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"block_sparse_attention: q {tuple(q.shape)}, k {tuple(k.shape)} and v "
                         f"{tuple(v.shape)} must be [B, H, L, E], [B, Hkv, S, E] and [B, Hkv, S, Ev]")
    if H % k.shape[1]:
        raise ValueError(f"block_sparse_attention: {H} query heads are not a multiple of {k.shape[1]} "
                         "kv heads")
    layouts.check_table(layout, H)
    return layouts.layout(layout, *block_counts(q.shape[2], k.shape[2], block), causal, q.device)


def _element_mask(layout, L, S, block, causal):
    """bool [H, L, S]: which (query, key) pairs the layout (and causality) allow."""
    nk = math.ceil(S / block)
    bm = block_mask_from_layout(layout, nk)
    qb = torch.arange(L, device=layout.device) // block
    kb = torch.arange(S, device=layout.device) // block
    allowed = bm[:, qb][:, :, kb]
    if causal:
        allowed = allowed & (torch.arange(S, device=layout.device)[None, :]
                             <= torch.arange(L, device=layout.device)[:, None])
    return allowed


def repeat_kv(x, heads):
    """GQA: [B, Hkv, S, E] → [B, heads, S, E], kv head h // (heads / Hkv) for query head h."""
    return x.repeat_interleave(heads // x.shape[1], dim=1) if x.shape[1] != heads else x


def onnx_repeat_kv(x, q):
    """`repeat_kv` in onnxscript, to the head count of q (both shapes read at run time)."""
    group = op.Div(op.Shape(q, start=1, end=2), op.Shape(x, start=1, end=2))
    ones = op.Constant(value_ints=[1, 1])
    x5 = op.Expand(op.Unsqueeze(x, op.Constant(value_ints=[2])), op.Concat(ones, group, ones, axis=0))
    return op.Reshape(x5, op.Concat(op.Shape(q, start=0, end=2), op.Shape(x, start=2), axis=0))


def pooled_of(table: torch.Tensor, mask, causal: bool) -> torch.Tensor | None:
    """bool [H]: the table's pyramid heads (None when it has none); refuses them with a mask or causal."""
    pooled = layouts.pooled_heads(table)
    if not bool(pooled.any()):
        return None
    if causal or mask is not None:
        raise ValueError(f"block_sparse_attention: {int(pooled.sum())} pyramid head(s) read far key blocks "
                         f"pooled, which needs attention without an additive mask and not causal; this call "
                         f"is {'causal' if causal else 'masked'}. Fit that site without the pyramid family "
                         "(head_patterns' patterns)")
    return pooled


def block_sums(x: torch.Tensor, block: int, dtype=torch.float32) -> torch.Tensor:
    """x [B, h, T, E] → [B, h, ⌈T / block⌉, E] in `dtype`: the sum of each block of rows (a partial last
    block sums the rows it has). Read in place: splitting the row axis is a view, so no padded copy of x
    is made."""
    full = x.shape[2] // block * block
    sums = x[:, :, :full].unflatten(2, (-1, block)).sum(3, dtype=dtype)
    if full < x.shape[2]:
        sums = torch.cat([sums, x[:, :, full:].sum(2, keepdim=True, dtype=dtype)], 2)
    return sums


def pooled_keys(k: torch.Tensor, v: torch.Tensor, block: int):
    """The pooled keys of every key block: k̄ [B, Hkv, nk, E], v̄ [B, Hkv, nk, Ev] (block means, at least
    fp32) and log n_J [nk] (module docstring)."""
    wide = torch.promote_types(k.dtype, torch.float32)
    S = k.shape[2]
    nk = math.ceil(S / block)
    counts = torch.full((nk,), float(block), dtype=wide, device=k.device)
    counts[-1] = S - (nk - 1) * block
    return (block_sums(k, block, wide) / counts[:, None], block_sums(v, block, wide) / counts[:, None],
            counts.log())


def far(q, k, v, lists_: torch.Tensor, heads: torch.Tensor, block: int, scale: float, rows: int = 4096):
    """The pooled part of pyramid heads `heads` (indices into q's heads): attention of each query over the
    pooled keys of the blocks its list [H, nq, nsel] leaves out, as (out [B, P, L, Ev], lse [B, P, L]),
    fp32, `rows` queries at a time (memory O(rows · nk) a head)."""
    H, L = q.shape[1], q.shape[2]
    nk, group = math.ceil(k.shape[2] / block), H // k.shape[1]
    kbar, vbar, logn = pooled_keys(k, v, block)
    kh = kbar[:, heads // group].transpose(-1, -2)  # [B, P, E, nk]
    vh = vbar[:, heads // group]  # [B, P, nk, Ev]
    listed = block_mask_from_layout(lists_.to(q.device)[heads], nk)  # [P, nq, nk]
    rows = max(block, rows // block * block)
    outs, lses = [], []
    for r0 in range(0, L, rows):
        qs = q[:, heads, r0:r0 + rows].to(kh.dtype) * scale
        near = listed[:, r0 // block:math.ceil((r0 + qs.shape[2]) / block)].repeat_interleave(block, 1)
        s = (qs @ kh + logn).masked_fill(near[:, :qs.shape[2]], float("-inf"))
        lse = torch.logsumexp(s, -1)
        outs.append((s - lse[..., None]).exp().nan_to_num(0.0) @ vh)  # a row with no far block: 0
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def with_far(exact, q, k, v, lists_, mask, block, causal, scale, pooled, **kw):
    """`exact` (a kernel on index lists) and, for `pooled` heads (bool [H] or None), its result merged
    with their pooled part (`far`) by log-sum-exp."""
    if pooled is None:
        return exact(q, k, v, lists_, mask, block, causal, scale, **kw)
    out, lse = exact(q, k, v, lists_, mask, block, causal, scale, lse=True, **kw)
    heads = pooled.nonzero().view(-1).to(q.device)
    o_far, lse_far = far(q, k, v, lists_, heads, block, scale)
    wide = torch.promote_types(out.dtype, o_far.dtype)  # fp32 at least (fp64 stays fp64)
    o, ls = out[:, heads].to(wide), lse[:, heads].to(wide)
    attention_tiles.merge(o, ls, o_far.to(wide), lse_far.to(wide))
    out[:, heads] = o.to(out.dtype)
    return out


# ----------------------------------------------------------------------------------------- kernels


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: torch.Tensor,
              mask: torch.Tensor | None, block: int, causal: bool, scale: float) -> torch.Tensor:
    return reference_lists(q, k, v, lists(q, k, v, layout, block, causal), mask, block, causal, scale,
                           pooled_of(layout, mask, causal))


def reference_lists(q, k, v, layout, mask, block, causal, scale, pooled=None):
    """`reference` on index lists [H, nq, nsel] (the oracle of every kernel); `pooled` (bool [H] or None):
    pyramid heads, whose pooled keys are appended to the keys (module docstring)."""
    H, L, S = q.shape[1], q.shape[2], k.shape[2]
    wide = torch.promote_types(q.dtype, torch.float32)  # fp32 at least; fp64 stays fp64 (gradcheck)
    s = (q.to(wide) * scale) @ repeat_kv(k, H).to(wide).transpose(-1, -2)
    if mask is not None:
        s = s + mask.to(wide)
    s = s.masked_fill(~_element_mask(layout, L, S, block, causal), float("-inf"))
    values = repeat_kv(v, H).to(wide)
    if pooled is None:
        return (torch.softmax(s, -1).nan_to_num(0.0) @ values).to(q.dtype)  # rows with no allowed key: 0
    kbar, vbar, logn = pooled_keys(k.to(wide), v.to(wide), block)
    listed = block_mask_from_layout(layout, kbar.shape[2]).repeat_interleave(block, 1)[:, :L]  # [H, L, nk]
    s_far = (q.to(wide) * scale) @ repeat_kv(kbar, H).transpose(-1, -2) + logn
    return attend_with_pooled(s, values, s_far, repeat_kv(vbar, H), listed, pooled.to(q.device)).to(q.dtype)


def attend_with_pooled(s, v, s_far, v_far, listed, pooled):
    """Softmax attention over keys and pooled keys at once (the reference's form): s [B, H, r, S] the
    scores of the keys (−∞ where not allowed), v [B, H, S, Ev]; s_far [B, H, r, nk] the pooled keys'
    (log n_J included), v_far [B, H, nk, Ev]; listed bool [H, r, nk] each row's listed blocks, pooled
    bool [H]: a pooled key counts for a row of a pyramid head whose list leaves its block out."""
    far_ok = ~listed & pooled[:, None, None]
    logits = torch.cat([s, s_far.masked_fill(~far_ok, float("-inf"))], -1)
    return torch.softmax(logits, -1).nan_to_num(0.0) @ torch.cat([v, v_far], -2)  # rows with no key: 0


def cpu(q, k, v, layout, mask, block, causal, scale):
    return cpu_lists(q, k, v, lists(q, k, v, layout, block, causal), mask, block, causal, scale,
                     pooled=pooled_of(layout, mask, causal))


def triton(q, k, v, layout, mask, block, causal, scale):
    return triton_lists(q, k, v, lists(q, k, v, layout, block, causal), mask, block, causal, scale,
                        pooled_of(layout, mask, causal))


def triton_lists(q, k, v, layout, mask, block, causal, scale, pooled=None):
    """The Triton kernel on index lists, with the pooled part of `pooled` heads (`with_far`)."""
    from sparsegraph.codegen.triton_kernels.block_sparse_attention import block_sparse_attention

    return with_far(block_sparse_attention, q, k, v, layout, mask, block, causal, scale, pooled)


def cpu_lists(q, k, v, layout, mask, block, causal, scale, tile: bool = True, pooled=None):
    """The CPU path on index lists (module docstring): the compiled kernel when it is built (pyramid heads'
    pooled keys in the same pass), else the torch fallback (`attention_fallback`, pooled part by
    `with_far`); `tile` False there gathers every block (for layouts new at every call, whose tiling
    would cost more than it saves)."""
    B, H, L, _ = q.shape
    mask = None if mask is None else _full_mask(mask.to(q.dtype), B, H, L, k.shape[2])
    if q.device.type == "cpu" and cpu_kernels.library() is not None:
        dense_heads = _dense_heads(layout, k.shape[2], block, pooled) if mask is None and not causal else None
        sparse = layout if dense_heads is None else _without(layout, dense_heads)
        far_keys = None if pooled is None else (*pooled_keys(k, v, block), pooled)
        out = cpu_kernels.block_sparse_attention(q, k, v, sparse, mask, block, causal, scale, far_keys)
        if dense_heads is not None:  # the kernel gave them 0 (no block listed): SDPA's dense kernel instead
            kv = dense_heads // (H // k.shape[1])
            out[:, dense_heads] = torch.nn.functional.scaled_dot_product_attention(
                q[:, dense_heads].float(), k[:, kv].float(), v[:, kv].float(), scale=scale)
        return out.to(q.dtype)
    return with_far(attention_fallback.attention, q, k, v, layout, mask, block, causal, scale, pooled,
                    tile=tile)


def _dense_heads(lists: torch.Tensor, S: int, block: int, pooled) -> torch.Tensor | None:
    """Indices of the heads whose lists [H, nq, nsel] hold every key block in every row (dense heads of a
    site; not a pyramid's), None when there are none.

    Why: the compiled kernel walks a dense head's blocks one by one; SDPA's flash kernel runs it faster.
    Measured on a 2-core AMD EPYC (AVX2), 32 channels, 16k tokens, median of 5: one dense head 0.465 s in
    the kernel, 0.416 s in SDPA; two dense heads and four 3-D windows 1.10–1.13 s all in the kernel,
    0.92–1.01 s with the dense two in SDPA (at 8k the two are within noise)."""
    nk = math.ceil(S / block)
    full = (lists >= 0).sum((1, 2)) == lists.shape[1] * nk
    if pooled is not None:
        full &= ~pooled.to(full.device)
    if not bool(full.any()):
        return None
    return full.nonzero().view(-1)


def _without(lists: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """`lists` with `heads` listing no block, trimmed to the longest remaining list (ascending, −1-padded)."""
    out = lists.clone()
    out[heads] = -1
    width = max(int((out >= 0).sum(-1).max()), 1)
    return out[:, :, :width].contiguous()


def _full_mask(mask, B, H, L, S):
    """The additive mask as a [Mb, Mh, L, S] view (Mb ∈ {1, B}, Mh ∈ {1, H}), with stride 0 over the
    queries when it does not vary with them (a key-padding mask, even one HF expanded over queries)."""
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)) if mask.dim() < 4 else mask
    m = m.expand(*m.shape[:2], L, S)
    if m.stride(2) != 0 and torch.equal(m, m[:, :, :1].expand_as(m)):
        m = m[:, :, :1].expand_as(m)
    return m


def dense(q, k, v, layout, mask, block, causal, scale):
    """Nothing skipped: dense SDPA (the layout ignored), what ``speed_check`` compares with and restores."""
    H, L, S = q.shape[1], q.shape[2], k.shape[2]
    bias = mask
    if causal:  # key j is seen by query i when j ≤ i, as in the reference
        upper = ~torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        causal_bias = torch.zeros(L, S, dtype=q.dtype, device=q.device).masked_fill(upper, float("-inf"))
        bias = causal_bias if bias is None else bias + causal_bias
    return torch.nn.functional.scaled_dot_product_attention(q, repeat_kv(k, H), repeat_kv(v, H),
                                                            attn_mask=bias, scale=scale)


def fake(q, k, v, layout, mask, block, causal, scale):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def onnx_sizes(q, k, block: int):
    """(L, S, nq, nk, 0, 1, block) as onnxscript scalars, read from q and k at run time."""
    L, S = op.Squeeze(op.Shape(q, start=2, end=3)), op.Squeeze(op.Shape(k, start=2, end=3))
    zero, one, size = op.Constant(value_int=0), op.Constant(value_int=1), op.Constant(value_int=block)
    return (L, S, op.Div(op.Sub(op.Add(L, size), one), size), op.Div(op.Sub(op.Add(S, size), one), size),
            zero, one, size)


def onnx_block_attention(q, k, v, block_mask, mask, block: int, causal: bool, scale: float, pooled=None):
    """Dense masked attention over the (query, key) pairs whose blocks `block_mask` lists (float
    [..., nq, nk], > 0 where listed; leading dims broadcast against [B, H]); rows with no key give 0.
    `pooled` (None, or from `onnx_pooled`: bool [H, 1, 1]): the pooled keys of the blocks a pyramid head
    does not list are appended to its keys (`reference_lists`)."""
    L, S, _, nk, zero, one, size = onnx_sizes(q, k, block)
    qpos, kpos = op.Range(zero, L, one), op.Range(zero, S, one)
    listed_rows = op.Gather(block_mask, op.Div(qpos, size), axis=-2)  # [..., L, nk]
    allowed = op.Gather(listed_rows, op.Div(kpos, size), axis=-1)
    allowed = op.Greater(allowed, op.Constant(value_float=0.0))  # [..., L, S]
    if causal:
        allowed = op.And(allowed, op.LessOrEqual(op.Unsqueeze(kpos, op.Constant(value_ints=[0])),
                                                 op.Unsqueeze(qpos, op.Constant(value_ints=[1]))))
    s = op.MatMul(op.Mul(q, op.CastLike(op.Constant(value_float=scale), q)),
                  op.Transpose(onnx_repeat_kv(k, q), perm=[0, 1, 3, 2]))
    if mask is not None:
        s = op.Add(s, op.CastLike(mask, s))
    s = op.Where(allowed, s, op.CastLike(op.Constant(value_float=float("-inf")), s))
    values = onnx_repeat_kv(v, q)
    if pooled is not None:
        kbar, vbar, logn = _onnx_pooled_keys(k, v, S, nk, size)
        s_far = op.Add(op.MatMul(op.Mul(q, op.CastLike(op.Constant(value_float=scale), q)),
                                 op.Transpose(onnx_repeat_kv(kbar, q), perm=[0, 1, 3, 2])),
                       op.CastLike(logn, q))
        far_ok = op.And(pooled, op.Not(op.Greater(listed_rows, op.Constant(value_float=0.0))))  # [.., L, nk]
        s = op.Concat(s, op.Where(far_ok, s_far, op.CastLike(op.Constant(value_float=float("-inf")), s)),
                      axis=-1)
        values = op.Concat(values, onnx_repeat_kv(vbar, q), axis=-2)
    p = op.Softmax(s, axis=-1)
    p = op.Where(op.IsNaN(p), op.CastLike(op.Constant(value_float=0.0), p), p)
    return op.MatMul(p, values)


def onnx_pooled(table):
    """bool [H, 1, 1]: the table's pyramid heads (kind ≥ ``POOLED``), in onnxscript."""
    first = op.Constant(value_ints=[0])
    kind = op.Slice(table, first, op.Constant(value_ints=[1]), op.Constant(value_ints=[1]))  # [H, 1]
    return op.Unsqueeze(op.GreaterOrEqual(kind, op.Constant(value_int=layouts.POOLED)),
                        op.Constant(value_ints=[2]))


def onnx_block_sums(x, n, length, size):
    """`block_sums` in onnxscript: x [B, h, length, E] zero-padded to n blocks of `size` rows → the sum of
    each block's rows [B, h, n, E] (n, length, size: int64 scalars)."""
    def ints(*xs):
        return op.Constant(value_ints=list(xs))

    pad = op.Concat(ints(0, 0, 0, 0, 0, 0), op.Unsqueeze(op.Sub(op.Mul(n, size), length), ints(0)), ints(0),
                    axis=0)
    shape = op.Concat(op.Shape(x, start=0, end=2), op.Unsqueeze(n, ints(0)), op.Unsqueeze(size, ints(0)),
                      ints(-1), axis=0)
    return op.ReduceSum(op.Reshape(op.Pad(x, pad), shape), ints(3), keepdims=0)


def _onnx_pooled_keys(k, v, S, nk, size):
    """`pooled_keys` in onnxscript: the block means of k and v (each block's sum over its n_J tokens) and
    log n_J [nk]."""
    starts = op.Mul(op.Range(op.Constant(value_int=0), nk, op.Constant(value_int=1)), size)
    counts = op.Cast(op.Min(op.Sub(S, starts), size), to=1)  # [nk] float
    column = op.Unsqueeze(counts, op.Constant(value_ints=[1]))

    def means(x):
        return op.Div(onnx_block_sums(x, nk, S, size), op.CastLike(column, x))

    return means(k), means(v), op.Log(counts)


def onnx_block_mask(lists, nk):
    """Index lists [..., nsel] (−1 = none) → float block mask [..., nk] (`Equal` against `Range` +
    `ReduceMax`)."""
    hit = op.Equal(op.Unsqueeze(lists, op.Constant(value_ints=[-1])),
                   op.Range(op.Constant(value_int=0), nk, op.Constant(value_int=1)))
    return op.ReduceMax(op.Cast(hit, to=1), op.Constant(value_ints=[-2]), keepdims=0)


def onnx_window_mask(table, kind, nq, nk, block: int):
    """``window_3d`` rows in onnxscript: float [H, nq, nk], from the token-level window over the nq · block
    (padded) tokens, reduced to blocks (`ReduceMax`): the blocks `window_block_mask` lists, at [H, L, L]
    memory (ONNX is the exact, dense-speed path). A table without window rows computes it at 0 × 0
    blocks (the grid is scaled by "any window row") and pads zeros: no cost for other models. Rows of
    other kinds get a harmless 1 × 1 × 1 grid; their result is not used."""
    def ints(*xs):
        return op.Constant(value_ints=list(xs))

    heads = op.Shape(table, start=0, end=1)
    # the 7 parameter slots; a table narrower than that (no window row) is widened with zeros
    wide = op.Concat(table, op.Expand(ints(0), op.Concat(heads, ints(layouts.WINDOW_SLOTS), axis=0)), axis=1)
    params = op.Slice(wide, ints(layouts.HEADER), ints(layouts.HEADER + layouts.WINDOW_SLOTS), ints(1))
    kinds = op.Mod(op.Slice(table, ints(0), ints(1), ints(1)), op.Constant(value_int=layouts.POOLED))
    is_window = op.Equal(kinds, op.Constant(value_int=layouts.WINDOW))  # [H, 1] (a pyramid's near window too)
    safe = op.Where(is_window, params, ints(0, 0, 0, 1, 1, 1, block))
    present = op.Cast(op.ReduceMax(op.Cast(is_window, to=7), keepdims=0), to=7)  # 1 if any window row
    nqw, nkw = op.Mul(nq, present), op.Mul(nk, present)

    def param(i):  # [H, 1, 1]
        return op.Unsqueeze(op.Slice(safe, ints(i), ints(i + 1), ints(1)), ints(2))

    at, ah, aw, hh, ww = param(0), param(1), param(2), param(4), param(5)
    n = op.Range(op.Constant(value_int=0), op.Mul(nqw, op.Constant(value_int=block)),
                 op.Constant(value_int=1))
    t = op.Div(n, op.Mul(hh, ww))  # [H, 1, L]
    h = op.Mod(op.Div(n, ww), hh)
    w = op.Mod(n, ww)
    real = op.Less(n, op.Mul(op.Mul(param(3), hh), ww))  # padding tokens of the last block see nothing

    def near(x, a):
        return op.LessOrEqual(op.Abs(op.Sub(op.Transpose(x, perm=[0, 2, 1]), x)), a)

    seen = op.And(op.And(near(t, at), near(h, ah)), op.And(near(w, aw), op.And(
        op.Transpose(real, perm=[0, 2, 1]), real)))  # [H, L, L]
    shape = op.Concat(heads, op.Unsqueeze(nqw, ints(0)), ints(block), op.Unsqueeze(nkw, ints(0)),
                      ints(block), axis=0)  # zeros when no window row: allowzero keeps them zeros
    blocks = op.ReduceMax(op.Reshape(op.Cast(seen, to=1), shape, allowzero=1), ints(2, 4),
                          keepdims=0)  # [H, nqw, nkw]
    pads = op.Concat(ints(0, 0, 0, 0), op.Unsqueeze(op.Sub(nq, nqw), ints(0)),
                     op.Unsqueeze(op.Sub(nk, nkw), ints(0)), axis=0)
    return op.Pad(blocks, pads)


def onnx_table_mask(table, nq, nk, causal: bool, block: int | None = None):
    """`attention_layouts.block_mask` in onnxscript: the table laid out at the run-time grid nq × nk
    (int64 scalars), as a float block mask [H, nq, nk] (1 where listed); with `block`, ``window_3d``
    rows too (`onnx_window_mask`; without it they would be read as bands)."""
    def ints(*xs):
        return op.Constant(value_ints=list(xs))

    def column(i, n=None):  # table[:, i : i + n] ([H, 1] when n is None); i, n int64 [1] or Python ints
        start = ints(i) if isinstance(i, int) else i
        end = op.Add(start, ints(1) if n is None else n)
        return op.Slice(table, start, end, ints(1))

    def scalar(i):  # table[0, i] as [1]
        return op.Reshape(op.Slice(column(i), ints(0), ints(1), ints(0)), ints(1))

    n_diag, n_col, nq0, nk0 = scalar(3), scalar(4), scalar(1), scalar(2)
    nq1, nk1 = op.Unsqueeze(nq, ints(0)), op.Unsqueeze(nk, ints(0))
    diagonals = column(layouts.HEADER, n_diag)  # [H, D]
    columns = column(op.Add(ints(layouts.HEADER), n_diag), n_col)  # [H, C]
    zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
    rows, cols = op.Range(zero, nq, one), op.Range(zero, nk, one)
    rel = op.Sub(op.Add(op.Unsqueeze(rows, ints(1)), op.Sub(nk, nq)), op.Unsqueeze(cols, ints(0)))  # [nq, nk]
    on_diagonal = op.ReduceMax(op.Cast(op.Equal(op.Unsqueeze(rel, ints(0, 3)),
                                                op.Unsqueeze(diagonals, ints(1, 2))),
                                       to=1), ints(3), keepdims=0)  # [H, nq, nk]
    on_column = op.ReduceMax(op.Cast(op.Equal(op.Unsqueeze(cols, ints(0, 2)),
                                              op.Unsqueeze(columns, ints(1))), to=1),
                             ints(2), keepdims=1)  # [H, nk, 1]
    kind = op.Unsqueeze(op.Mod(column(0), op.Constant(value_int=layouts.POOLED)), ints(2))  # [H, 1, 1]
    dense = op.Cast(op.Equal(kind, op.Constant(value_int=layouts.DENSE)), to=1)
    banded = op.Max(on_diagonal, op.Transpose(on_column, perm=[0, 2, 1]), dense)
    bits = column(op.Add(ints(layouts.HEADER), op.Add(n_diag, n_col)), op.Mul(nq0, nk0))
    bits = op.Cast(op.Reshape(bits, op.Concat(ints(-1), nq0, nk0, axis=0)), to=1)  # [H, nq0, nk0]
    grown = op.Pad(bits, op.Concat(ints(0, 0, 0, 0), op.Max(ints(0), op.Sub(nq1, nq0)),
                                   op.Max(ints(0), op.Sub(nk1, nk0)), axis=0))
    at_grid = op.Slice(grown, ints(0, 0), op.Concat(nq1, nk1, axis=0), ints(1, 2))  # [H, nq, nk]
    same_grid = op.And(op.Equal(nq1, nq0), op.Equal(nk1, nk0))
    fixed = op.Where(same_grid, at_grid, op.Constant(value_float=1.0))  # another grid: dense
    mask = op.Where(op.Equal(kind, op.Constant(value_int=layouts.FIXED)), fixed, banded)
    if block is not None:
        window = onnx_window_mask(table, kind, nq, nk, block)
        mask = op.Where(op.Equal(kind, op.Constant(value_int=layouts.WINDOW)), window, mask)
    if causal:  # J ≤ I + (nk − nq)
        mask = op.Mul(mask, op.Cast(op.GreaterOrEqual(rel, op.Constant(value_int=0)), to=1))
    return mask


def onnx(q, k, v, layout, mask, block: int, causal: bool, scale: float):
    _, _, nq, nk, _, _, _ = onnx_sizes(q, k, block)
    return onnx_block_attention(q, k, v, onnx_table_mask(layout, nq, nk, causal, block), mask, block, causal,
                                scale, None if mask is not None or causal else onnx_pooled(layout))


def cost(node: torch.fx.Node) -> tuple[int, int]:
    """MACs and bytes of the listed blocks only: 2·B·H·(listed key positions per query)·E, and of a
    pyramid head's pooled keys (nk a query)."""
    q, k, v = (ir.val(a) for a in node.args[:3])
    B, H, L, E = q.shape
    S, Ev = k.shape[2], v.shape[3]
    block = int(node.args[5])
    listed = None
    layout_node = node.args[3]
    if isinstance(layout_node, torch.fx.Node) and layout_node.op == "get_attr":
        table = ir.get_attr(node.graph.owning_module, layout_node.target)
        lists_ = layouts.layout(table, *block_counts(L, S, block), bool(node.args[6]))
        listed = int((lists_ >= 0).sum()) * block * block  # (query, key) pairs in listed blocks
        listed += int(layouts.pooled_heads(table).sum()) * L * math.ceil(S / block)  # and pooled keys
    if listed is None:
        listed = H * L * S
    listed = min(listed, H * math.ceil(L / block) * block * S)
    macs = int(B * listed * (E + Ev) * min(L, math.ceil(L / block) * block) / (math.ceil(L / block) * block))
    moved = sum(t.numel() * t.element_size() for t in (q, k, v)) + q.numel() // E * Ev * q.element_size()
    return macs, moved


_setup_context, _backward = by_reference(reference, differentiable=(0, 1, 2, 4))  # q, k, v, mask

OP = SparseOp("block_sparse_attention", reference, fake=fake, cpu=cpu, onnx=onnx, cost=cost, dense=dense,
              triton="sparsegraph.codegen.block_sparse_attention:triton",
              backward=_backward, setup_context=_setup_context)
