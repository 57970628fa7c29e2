"""``sparsegraph::token_select``: keep the first tokens and the top-k others by score (EViT-style).

Inputs: ``x`` [B, N, D] (the residual stream, token axis 1), ``scores`` [B, N] (higher = more
important; −inf never wins over a finite score), ``keep`` the fraction of the non-protected tokens to
keep, ``protect`` how many leading tokens are always kept (the class token), ``fuse`` whether the
dropped tokens are folded into one extra token. With n = N − protect,

    k       = max(1, round(n · keep))     (keep to 1/1000, integer arithmetic: also symbolic / ONNX)
    kept    = {0 … protect−1} ∪ top-k_j (scores[b, protect + j]), in ascending position order
    out[b]  = x[b, kept]                                      [B, protect + k (+1), D]
    fused   = Σ_{j dropped} s_j x_j / Σ_{j dropped} s_j       (EViT: scores as weights, s ≥ 0)

``k`` is computed from the *runtime* length N, so one compiled graph (and its ONNX file) serves every
sequence length. ``keep = 0`` instead keeps every token whose score is finite (k = the largest such
count in the batch, so a row with fewer is topped up with its best others): with `roi_scores` that is
"the RoI tokens only", a data-dependent length, for eager PyTorch (no ONNX translation for it). Kept
tokens stay in their original order (a class token stays at position 0; relative order matters to
anything positional downstream). The second output ``index`` [B, k'] holds the kept positions, so
tensors aligned with the old tokens (attention masks, pooling weights) follow with `token_gather`;
with ``fuse`` the fused token's index is the best dropped token's.

Backends: reference (a full stable ranking by ``argsort``, membership mask, ``nonzero``: a different
algorithm from the fast path); CPU (``topk`` of the n scores, sort of k indices, one ``gather``);
ONNX (``Shape`` → k in integer ops, ``TopK`` with that dynamic k, ascending ``TopK`` of the indices,
``GatherElements``). No Triton kernel: it is a gather, the same code runs on CUDA.
"""

from __future__ import annotations

import torch
from onnxscript import opset18 as op

from sparsegraph import ir
from sparsegraph.codegen.op import SparseOp


def kept_count(n: int | torch.SymInt, keep: float, protect: int) -> int | torch.SymInt:
    """Tokens kept (without a fused token) from a length-n sequence; integer maths, so SymInt-safe."""
    permille = round(keep * 1000)
    rest = ((n - protect) * permille + 500) // 1000
    return protect + (torch.sym_max(rest, 1) if isinstance(rest, torch.SymInt) else max(rest, 1))


def _check(x, scores, keep, protect):
    if x.dim() != 3 or scores.shape != x.shape[:2]:
        raise ValueError(f"token_select: x {tuple(x.shape)} must be [B, N, D] and scores "
                         f"{tuple(scores.shape)} [B, N]")
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"token_select: keep={keep} must be in [0, 1] (0: every finite score)")
    if protect >= x.shape[1]:
        raise ValueError(f"token_select: protect={protect} leaves no token to choose from {x.shape[1]}")


def _fused(x, scores, index):
    """The EViT fused token [B, 1, D] of the tokens not in `index`, and the best dropped position [B, 1]."""
    dropped = torch.ones_like(scores, dtype=torch.bool).scatter(1, index, False)
    w = torch.where(dropped, scores.clamp_min(0), torch.zeros_like(scores))
    token = (w.unsqueeze(-1) * x).sum(1, keepdim=True) / w.sum(1).clamp_min(1e-12)[:, None, None]
    best = torch.where(dropped, scores, torch.full_like(scores, float("-inf"))).argmax(1, keepdim=True)
    return token.to(x.dtype), best


def _finish(x, scores, index, fuse):
    out = x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    if fuse:
        token, best = _fused(x, scores, index)
        out, index = torch.cat([out, token], 1), torch.cat([index, best], 1)
    return out, index


def _chosen(scores: torch.Tensor, keep: float, protect: int) -> int:
    """How many non-protected tokens a call keeps."""
    if keep > 0:
        return kept_count(scores.shape[1], keep, protect) - protect
    return max(1, int(torch.isfinite(scores[:, protect:]).sum(1).max()))


def reference(x: torch.Tensor, scores: torch.Tensor, keep: float, protect: int,
              fuse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x, scores, keep, protect)
    B, N = scores.shape
    k = _chosen(scores, keep, protect)
    order = torch.argsort(scores[:, protect:], dim=1, descending=True, stable=True)
    member = torch.zeros(B, N, dtype=torch.bool, device=x.device)
    member[:, :protect] = True
    member.scatter_(1, order[:, :k] + protect, True)
    index = member.nonzero()[:, 1].reshape(B, protect + k)
    return _finish(x, scores, index, fuse)


def cpu(x, scores, keep, protect, fuse):
    _check(x, scores, keep, protect)
    B = scores.shape[0]
    k = _chosen(scores, keep, protect)
    top = scores[:, protect:].topk(k, dim=1, sorted=False).indices.sort(1).values + protect
    head = torch.arange(protect, device=x.device).expand(B, protect)
    return _finish(x, scores, torch.cat([head, top], 1), fuse)


def fake(x, scores, keep, protect, fuse):
    if keep > 0:
        k = kept_count(x.shape[1], keep, protect) + int(fuse)
    else:  # data-dependent: a fresh size under export; the upper bound N for plain shape propagation
        try:
            k = torch.library.get_ctx().new_dynamic_size() + int(fuse)
        except (RuntimeError, AttributeError):
            k = x.shape[1] + int(fuse)
    return x.new_empty(x.shape[0], k, x.shape[2]), x.new_empty(x.shape[0], k, dtype=torch.int64)


def onnx(x, scores, keep: float, protect: int, fuse: bool):
    if keep <= 0:
        raise NotImplementedError("token_select with keep=0 (RoI tokens only) has a data-dependent length "
                                  "and no ONNX translation; use a keep ratio for ONNX export")

    def ints(*xs):
        return op.Constant(value_ints=list(xs))

    permille = round(keep * 1000)
    n = op.Sub(op.Shape(x, start=1, end=2), ints(protect))
    k = op.Max(op.Div(op.Add(op.Mul(n, ints(permille)), ints(500)), ints(1000)), ints(1))  # [1], n ≥ 0
    rest = op.Slice(scores, ints(protect), ints(2**62), ints(1))
    _, top = op.TopK(rest, k, axis=1, largest=1, sorted=0)
    top, _ = op.TopK(top, k, axis=1, largest=0, sorted=1)  # the chosen positions, ascending
    top = op.Add(top, ints(protect))
    if protect > 0:
        head = op.Expand(op.Unsqueeze(op.Range(op.Constant(value_int=0), op.Constant(value_int=protect),
                                               op.Constant(value_int=1)), ints(0)),
                         op.Concat(op.Shape(x, start=0, end=1), ints(protect), axis=0))
        index = op.Concat(head, top, axis=1)
    else:
        index = top
    out = op.GatherElements(x, op.Expand(op.Unsqueeze(index, ints(-1)),
                                         op.Concat(op.Shape(index), op.Shape(x, start=2), axis=0)), axis=1)
    if fuse:
        zero = op.CastLike(op.Constant(value_float=0.0), scores)
        ones = op.Expand(op.CastLike(op.Constant(value_float=1.0), scores), op.Shape(scores))
        zeros = op.Expand(zero, op.Shape(index))
        dropped = op.Cast(op.ScatterElements(ones, index, zeros, axis=1), to=9)  # True = dropped
        w = op.Where(dropped, op.Max(scores, zero), zero)
        total = op.Max(op.ReduceSum(w, ints(1), keepdims=1), op.CastLike(op.Constant(value_float=1e-12), w))
        token = op.Div(op.ReduceSum(op.Mul(op.Unsqueeze(w, ints(-1)), x), ints(1), keepdims=1),
                       op.Unsqueeze(total, ints(-1)))
        masked = op.Where(dropped, scores, op.CastLike(op.Constant(value_float=float("-inf")), scores))
        best = op.ArgMax(masked, axis=1, keepdims=1)
        out, index = op.Concat(out, op.CastLike(token, x), axis=1), op.Concat(index, best, axis=1)
    return out, index


def cost(node: torch.fx.Node) -> tuple[int, int]:
    """No MACs; reads the scores and writes the kept tokens."""
    out, scores = ir.val(node)[0], ir.val(node.args[1])
    return 0, scores.numel() * scores.element_size() + 2 * out.numel() * out.element_size()


# No ``dense`` form: downstream shapes were specialised to the kept length, so a site cannot be put
# back by swapping this one call (speed_check leaves token_select alone).
OP = SparseOp("token_select", reference, fake=fake, cpu=cpu, onnx=onnx, cost=cost)
