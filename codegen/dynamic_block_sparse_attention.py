"""``sparsegraph::dynamic_block_sparse_attention``: block-sparse attention whose blocks are chosen per input.

Inputs as ``block_sparse_attention`` (q [B, H, L, E], k, v [B, Hkv, S, ·], an additive ``mask``,
``block``, ``causal``, ``scale``, and its ``layout`` table: the blocks every input lists, for the
static heads; no blocks for the others) plus ``topk`` int64 [H]: for a head with topk[h] = t > 0, each
query block I also lists the t key blocks of highest *estimated* score for this input, estimated from
block means (the MInference / SpargeAttn estimate, one small matmul):

    q̄_I = (1/block) Σ_{i ∈ I} q_i,   k̄_J = (1/block) Σ_{j ∈ J} k_j   (zero-padded past L and S)
    est[b, h, I, J] = q̄_I · k̄_J · scale + max_{i ∈ I, j ∈ J} mask[b, h, i, j]

with the diagonal block J = I always chosen (+∞; a query sees its own neighbourhood) and the blocks
a causal query block cannot see, or whose keys are all masked, never chosen (−∞). Then

    out = block_sparse_attention(q, k, v, layout_b ∪ topk_t(est), mask, block, causal, scale)

per batch element b. The cost of the estimate is B·H·nq·nk·E multiply-adds, 1/block² of dense scores.

Backends: reference, CPU and Triton share the estimate (``estimate``) and fold the batch into the
heads (query head b·H + h, kv head b·Hkv + h // group) so the per-input layouts are one
[B·H, nq, ·] layout of the static kernels (on the CPU the compiled kernel, which takes any layout as
it comes; its torch fallback skips the tiling here, a new layout every call). ONNX: the same
estimate in standard ops (block sums: ``ReduceSum``, ``MatMul``, ``ReduceMax``, ``TopK`` with k read from
``topk``), the chosen blocks turned into a block mask, then dense masked attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from onnxscript import opset18 as op

from sparsegraph import attention_layouts, ir
from sparsegraph.codegen import block_sparse_attention as bsa
from sparsegraph.codegen.op import SparseOp

_INF = float("inf")


def estimate(q, k, mask, block: int, causal: bool, scale: float) -> torch.Tensor:
    """est [B, H, nq, nk] (fp32) as in the module docstring."""
    H, L = q.shape[1], q.shape[2]
    S = k.shape[2]
    nq, nk = math.ceil(L / block), math.ceil(S / block)
    est = _block_means(q, block) @ bsa.repeat_kv(_block_means(k, block), H).transpose(-1, -2) * scale
    if mask is not None:
        m = mask.float().reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        m = m.expand(*m.shape[:2], m.shape[2], S)
        rows = 1 if m.shape[2] == 1 else nq
        m = F.pad(m, (0, nk * block - S, 0, rows * block - m.shape[2] if rows > 1 else 0), value=-_INF)
        est = est + m.reshape(*m.shape[:2], rows, m.shape[2] // rows, nk, block).amax((3, 5))
    i, j = torch.arange(nq, device=q.device)[:, None], torch.arange(nk, device=q.device)[None, :]
    est = est.masked_fill((i == j) & (est > -_INF), _INF)
    return est.masked_fill(j > i, -_INF) if causal else est


def _block_means(x, block: int) -> torch.Tensor:
    """x [B, h, T, E] → fp32 [B, h, ⌈T / block⌉, E]: the sum over each block of rows / block (a partial
    last block counts its missing rows as 0), read in place (`block_sparse_attention.block_sums`)."""
    return bsa.block_sums(x, block) / block


def layouts(q, k, layout, topk, mask, block, causal, scale) -> torch.Tensor:
    """Per-input layouts [B, H, nq, n]: the static index lists `layout` [H, nq, ·] and each dynamic
    head's top-k."""
    B = q.shape[0]
    nk = math.ceil(k.shape[2] / block)
    topk = topk.to(q.device)
    t = min(int(topk.max()), nk) if topk.numel() else 0
    static = layout.to(q.device).expand(B, *layout.shape)
    if t == 0:
        return static
    values, chosen = estimate(q, k, mask, block, causal, scale).topk(t, -1)
    keep = (torch.arange(t, device=q.device) < topk[:, None, None]) & (values > -_INF)
    return torch.cat([static, torch.where(keep, chosen, -1)], -1)  # a block in both is listed twice


def _folded(kernel, q, k, v, layout, topk, mask, block, causal, scale, **kw):
    """Run a static-layout kernel (on index lists) on the per-input layouts, the batch folded into the
    heads (pyramid heads' flags with them)."""
    pooled = bsa.pooled_of(layout, mask, causal)
    layout = bsa.lists(q, k, v, layout, block, causal)
    B, H, L, _ = q.shape
    per_input = attention_layouts.layout_from_block_mask(attention_layouts.block_mask_from_layout(
        layouts(q, k, layout, topk, mask, block, causal, scale), math.ceil(k.shape[2] / block)))

    def fold(x):
        return x.reshape(1, B * x.shape[1], *x.shape[2:])

    if mask is not None:  # a mask constant over queries stays one row per (input, head) once folded
        m = bsa._full_mask(mask, B, H, L, k.shape[2])
        mask = fold((m[:, :, :1] if m.stride(2) == 0 else m).expand(B, H, -1, -1))
    out = kernel(fold(q), fold(k), fold(v), per_input.reshape(B * H, *per_input.shape[2:]), mask, block,
                 causal, scale, pooled=None if pooled is None else pooled.repeat(B), **kw)
    return out.reshape(B, H, L, -1)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: torch.Tensor, topk: torch.Tensor,
              mask: torch.Tensor | None, block: int, causal: bool, scale: float) -> torch.Tensor:
    return _folded(bsa.reference_lists, q, k, v, layout, topk, mask, block, causal, scale)


def cpu(q, k, v, layout, topk, mask, block, causal, scale):
    return _folded(bsa.cpu_lists, q, k, v, layout, topk, mask, block, causal, scale, tile=False)


def triton(q, k, v, layout, topk, mask, block, causal, scale):
    return _folded(bsa.triton_lists, q, k, v, layout, topk, mask, block, causal, scale)


def dense(q, k, v, layout, topk, mask, block, causal, scale):
    """Nothing skipped: dense SDPA (layout and topk ignored)."""
    return bsa.dense(q, k, v, layout, mask, block, causal, scale)


def fake(q, k, v, layout, topk, mask, block, causal, scale):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def onnx(q, k, v, layout, topk, mask, block: int, causal: bool, scale: float):
    def ints(*xs):
        return op.Constant(value_ints=list(xs))

    L, S, nq, nk, zero, one, size = bsa.onnx_sizes(q, k, block)

    def block_means(x, n, length):  # [B, h, length, E] zero-padded to n·block → [B, h, n, E]
        return op.Div(bsa.onnx_block_sums(x, n, length, size), op.CastLike(size, x))

    qm, km = block_means(q, nq, L), bsa.onnx_repeat_kv(block_means(k, nk, S), q)
    est = op.Mul(op.MatMul(op.Cast(qm, to=1), op.Transpose(op.Cast(km, to=1), perm=[0, 1, 3, 2])),
                 op.Constant(value_float=scale))
    inf = op.Constant(value_float=_INF)
    if mask is not None:  # + the block max of the mask (padded with −∞), the mask first made 4-d
        rank4 = op.Slice(op.Concat(ints(1, 1, 1, 1), op.Shape(mask), axis=0), ints(-4), ints(2**62))
        m = op.Reshape(op.Cast(mask, to=1), rank4)
        rows = op.Shape(m, start=2, end=3)
        per_query = op.Equal(rows, ints(1))
        qrows = op.Where(per_query, ints(1), op.Unsqueeze(op.Mul(nq, size), ints(0)))
        blocks_q = op.Where(per_query, ints(1), op.Unsqueeze(nq, ints(0)))
        m = op.Expand(m, op.Concat(op.Shape(m, start=0, end=2), rows, op.Unsqueeze(S, ints(0)), axis=0))
        pad = op.Concat(ints(0, 0, 0, 0, 0, 0), op.Sub(qrows, rows),
                        op.Unsqueeze(op.Sub(op.Mul(nk, size), S), ints(0)), axis=0)
        shape = op.Concat(op.Shape(m, start=0, end=2), blocks_q, ints(-1), op.Unsqueeze(nk, ints(0)),
                          ints(block), axis=0)
        est = op.Add(est, op.ReduceMax(op.Reshape(op.Pad(m, pad, op.Neg(inf)), shape), ints(3, 5),
                                       keepdims=0))
    qi, kj = op.Unsqueeze(op.Range(zero, nq, one), ints(1)), op.Unsqueeze(op.Range(zero, nk, one), ints(0))
    est = op.Where(op.And(op.Equal(qi, kj), op.Greater(est, op.Neg(inf))), inf, est)
    if causal:
        est = op.Where(op.Greater(kj, qi), op.Neg(inf), est)
    t = op.Min(op.ReduceMax(topk, keepdims=1), op.Unsqueeze(nk, ints(0)))
    values, chosen = op.TopK(est, t, axis=-1)
    keep = op.And(op.Less(op.Range(zero, op.Squeeze(t, ints(0)), one), op.Unsqueeze(topk, ints(1, 2))),
                  op.Greater(values, op.Neg(inf)))
    dynamic = op.Where(keep, chosen, op.Constant(value_int=-1))  # [B, H, nq, t]
    static = op.Unsqueeze(bsa.onnx_table_mask(layout, nq, nk, causal, block), ints(0))  # [1, H, nq, nk]
    block_mask = op.Max(static, bsa.onnx_block_mask(dynamic, nk))  # [B, H, nq, nk]
    return bsa.onnx_block_attention(q, k, v, block_mask, mask, block, causal, scale,
                                    None if mask is not None or causal else bsa.onnx_pooled(layout))


def cost(node: torch.fx.Node) -> tuple[int, int]:
    """MACs of the static blocks, of topk blocks per query block of each dynamic head, and of the estimate."""
    q, k, v = (ir.val(a) for a in node.args[:3])
    B, H, L, E = q.shape
    S, Ev = k.shape[2], v.shape[3]
    block = int(node.args[6])
    nq, nk = math.ceil(L / block), math.ceil(S / block)
    listed = H * nq * nk
    layout_node, topk_node = node.args[3], node.args[4]
    if all(isinstance(n, torch.fx.Node) and n.op == "get_attr" for n in (layout_node, topk_node)):
        table = ir.get_attr(node.graph.owning_module, layout_node.target)
        layout = attention_layouts.layout(table, nq, nk, bool(node.args[7]))
        topk = ir.get_attr(node.graph.owning_module, topk_node.target)
        listed = min(listed, int((layout >= 0).sum()) + int(topk.clamp(max=nk).sum()) * nq)
        listed += int(attention_layouts.pooled_heads(table).sum()) * nq * nk / block  # pooled keys, in blocks
    macs = B * listed * block * block * (E + Ev) + B * H * nq * nk * E
    moved = sum(t.numel() * t.element_size() for t in (q, k, v)) + q.numel() // E * Ev * q.element_size()
    return int(macs), moved


OP = SparseOp("dynamic_block_sparse_attention", reference, fake=fake, cpu=cpu, onnx=onnx, cost=cost,
              dense=dense, triton="sparsegraph.codegen.dynamic_block_sparse_attention:triton")
