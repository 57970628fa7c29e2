"""Triton kernel for ``sparsegraph::block_sparse_attention``: flash-attention over the listed key blocks.

One program per (query block i, batch·head). It loads its query tile [BLOCK, E] once, then walks
``layout[h, i, :]``: for each listed key block (−1 ends nothing, it is skipped) it loads the K and V
tiles of kv head h // group, computes the scores with ``tl.dot``, applies the key-tail, causal and
additive masks, and folds them into the running softmax (online softmax: running max m, running sum
l, accumulator rescaled by exp(m_old − m_new)). Blocks not listed are never read. Accumulation is fp32
whatever the input dtype; a row that saw no allowed key writes 0 (as the reference does).

With ``lse=True`` it also writes each row's log-sum-exp of its allowed scores, m + log(l) (the
softmax's normaliser; −inf for a row with no allowed key), fp32 [B, H, L] (``HAS_LSE``: compiled out
otherwise).

The additive mask is passed with its broadcast strides (stride 0 on broadcast dimensions), so a
[B, 1, 1, S] padding mask is read in place, never expanded.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _kernel(q_ptr, k_ptr, v_ptr, lay_ptr, m_ptr, o_ptr, lse_ptr, H, GROUP, L, S, NSEL, scale,
            sqb, sqh, sql, skb, skh, sks, svb, svh, svs, sob, soh, sol, smb, smh, sml, sms,
            E, EV, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_LSE: tl.constexpr,
            BLOCK: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr):
    qblock = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kvh = h // GROUP
    nq = tl.cdiv(L, BLOCK)
    rq = qblock * BLOCK + tl.arange(0, BLOCK)
    re = tl.arange(0, BLOCK_E)
    rev = tl.arange(0, BLOCK_EV)
    q = tl.load(q_ptr + b * sqb + h * sqh + rq[:, None] * sql + re[None, :],
                mask=(rq[:, None] < L) & (re[None, :] < E), other=0.0).to(tl.float32)
    q = q * scale
    m_i = tl.full((BLOCK,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK,), tl.float32)
    acc = tl.zeros((BLOCK, BLOCK_EV), tl.float32)
    row = lay_ptr + (h * nq + qblock) * NSEL
    for j in range(0, NSEL):
        kb = tl.load(row + j)
        if kb >= 0:
            rk = kb * BLOCK + tl.arange(0, BLOCK)
            kt = tl.load(k_ptr + b * skb + kvh * skh + rk[None, :] * sks + re[:, None],
                         mask=(rk[None, :] < S) & (re[:, None] < E), other=0.0).to(tl.float32)
            s = tl.dot(q, kt, input_precision="ieee")
            ok = (rk[None, :] < S) & (rq[:, None] >= 0)
            if CAUSAL:
                ok = ok & (rk[None, :] <= rq[:, None])
            if HAS_MASK:
                s += tl.load(m_ptr + b * smb + h * smh + rq[:, None] * sml + rk[None, :] * sms,
                             mask=(rq[:, None] < L) & (rk[None, :] < S), other=0.0).to(tl.float32)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vt = tl.load(v_ptr + b * svb + kvh * svh + rk[:, None] * svs + rev[None, :],
                         mask=(rk[:, None] < S) & (rev[None, :] < EV), other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, vt, input_precision="ieee")
            m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + b * sob + h * soh + rq[:, None] * sol + rev[None, :], out.to(o_ptr.dtype.element_ty),
             mask=(rq[:, None] < L) & (rev[None, :] < EV))
    if HAS_LSE:  # contiguous [B, H, L]; l_i sums exp(s − m_i), so m_i + log(l_i) = log Σ exp(s)
        lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + bh * L + rq, lse, mask=rq < L)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: torch.Tensor,
                           mask: torch.Tensor | None, block: int, causal: bool, scale: float, *,
                           lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The kernel on index lists layout [H, nq, nsel] (the op's table already laid out at these lengths).
    With `lse`, (out, lse): lse fp32 [B, H, L], each row's log-sum-exp (module docstring)."""
    if block < 16 or block & (block - 1):
        raise ValueError(f"block_sparse_attention (Triton): block {block} must be a power of two ≥ 16 "
                         "(tl.dot)")
    B, H, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    lay = layout.to(device=q.device, dtype=torch.int32).contiguous()
    out = torch.empty(B, H, L, Ev, device=q.device, dtype=q.dtype)
    lse_out = torch.empty(B, H, L, device=q.device, dtype=torch.float32) if lse else out  # unread if not
    if mask is not None:
        m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(B, H, L, S)
        mstrides = m.stride()
    else:
        m, mstrides = q, (0, 0, 0, 0)
    grid = (triton.cdiv(L, block), B * H)
    _kernel[grid](q, k, v, lay, m, out, lse_out, H, H // Hkv, L, S, lay.shape[-1], float(scale),
                  q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                  v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
                  *mstrides, E, Ev, HAS_MASK=mask is not None, CAUSAL=bool(causal), HAS_LSE=bool(lse),
                  BLOCK=block, BLOCK_E=max(16, triton.next_power_of_2(E)),
                  BLOCK_EV=max(16, triton.next_power_of_2(Ev)))
    return (out, lse_out) if lse else out
