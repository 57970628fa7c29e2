"""Canonical forms: rewrites that make a captured graph read the way `sparsegraph.ir` reads graphs, or
run with fewer calls, computing bit for bit what the model computes.

`drop_identities` removes the nodes ``torch.export`` leaves that compute nothing: the dtype/device
assertions (``_assert_tensor_metadata``), slices over a whole axis, ``to`` the dtype or device a tensor
already has (or the ``alias`` export writes for it), and products by 1. Each is one Python-level ATen
call per node per run of the graph: in a decode step, where each call moves a few kilobytes, they are a
measurable share of the step (a Llama step graph: 195 calls for 2 layers, 50 of them identities). Their
users read the input instead, which holds the same values (the same memory, for the views); a node
whose users write in place (``…_`` ops) is left alone, so no write reaches a tensor it did not reach
before.

`share_kv_heads` folds grouped-query attention's key/value repeat into the attention call. Hugging Face
builds K and V for Hq query heads from Hkv < Hq cached heads with ``repeat_kv``: x [B, Hkv, S, D] →
``unsqueeze(2)`` → ``expand`` to [B, Hkv, n, S, D] → ``reshape`` to [B, Hkv·n, S, D], a copy of the
whole cache, n = Hq / Hkv times over, at every decode step (measured here: 15% of a TinyLlama-shaped
step at 192 slots, more than the attention itself). Query head h then reads kv head ⌊h / n⌋, which is
exactly ``scaled_dot_product_attention(…, enable_gqa=True)`` on x itself (torch ≥ 2.5): the same
products and sums, with no copy. Only that exact chain is folded (unsqueeze at dim 2 of a 4-d tensor,
expand of that new axis alone, reshape merging it into the heads, clones allowed); Hugging Face skips
the copy itself only when there is no attention mask, which a static cache always has.

`canonicalize`, at capture: Hugging Face's ``Conv1D`` (GPT-2 and its family) stores its weight W as
[in, out] and computes ``addmm(b, x.view(-1, in), W).view(*x.shape[:-1], out)``; it becomes
``linear(x, Wᵀ, b)``, the form of an ``nn.Linear``, so the site queries, the cost model and every pass
see a plain linear layer: weight [out, in], module path the Conv1D's.

Exact: given a bias and a contiguous input of rank ≥ 2, ATen's ``linear(x, weight, b)`` is
``addmm(b, x.view(-1, in), weight.t())`` viewed back to ``[*x.shape[:-1], out]`` (its fused path), and
with weight = W.t(), weight.t() is W itself: the same addmm call on the same operands. So the input must
be contiguous (read off the captured value) and the trailing view must restore x's leading sizes
(compared symbolically); any other ``addmm`` is left as it is.

Wᵀ is a view sharing W's memory, not a copy. It is registered as a buffer beside W on the captured
graph's own holder of the module's tensors (a plain ``nn.Module`` made when the export is unlifted, never
one of the user's modules), so its ``get_attr`` path names the module: ``transformer.h.0.mlp.c_fc.weight_t``.
"""

from __future__ import annotations

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true, sym_eq

from sparsegraph import ir, meta

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def canonicalize(gm: torch.fx.GraphModule) -> None:
    """Rewrite `gm` (a fresh capture, before shapes are propagated) into the canonical forms above."""
    transposed: dict[str, str] = {}  # weight target → target of its transposed view
    changed = False
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is aten.addmm.default:
            changed |= _conv1d_as_linear(gm, node, transposed)
    if changed:
        gm.graph.lint()
        gm.recompile()


_BIG = 2**62  # a slice end at or past this is "to the end" (export writes sys.maxsize)


def drop_identities(gm: torch.fx.GraphModule) -> int:
    """Remove the identity nodes described above from `gm` (shapes propagated); the number removed."""
    removed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten._assert_tensor_metadata.default and not node.users:
            gm.graph.erase_node(node)
            removed += 1
            continue
        same = _identity_input(node)
        if same is None or any(_writes(u) for u in node.users):
            continue
        node.replace_all_uses_with(same)
        gm.graph.erase_node(node)
        removed += 1
    if removed:
        gm.graph.lint()
        gm.recompile()
    return removed


_SDPA = aten.scaled_dot_product_attention.default


def share_kv_heads(gm: torch.fx.GraphModule) -> int:
    """Fold the ``repeat_kv`` copies feeding SDPA calls into ``enable_gqa`` (above); the number of calls
    folded."""
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not _SDPA or node.kwargs.get("enable_gqa"):
            continue
        q = ir.val(node.args[0])
        sources = [_repeated(a, q.shape[1] if isinstance(q, torch.Tensor) and q.dim() == 4 else None)
                   for a in node.args[1:3]]
        if None in sources:
            continue
        chains = node.args[1:3]
        node.args = (node.args[0], *sources, *node.args[3:])
        node.kwargs = {**node.kwargs, "enable_gqa": True}
        for chain in chains:
            _erase_unused(gm, chain)
        folded += 1
    if folded:
        gm.graph.lint()
        gm.recompile()
    return folded


def _repeated(node, heads) -> torch.fx.Node | None:
    """x when `node` is x [B, Hkv, S, D] repeated to `heads` heads by ``repeat_kv``'s exact chain, or None."""
    chain = []
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in (
            *_VIEWS, aten.clone.default, aten.expand.default, aten.unsqueeze.default):
        chain.append(node)
        node = node.args[0]
    ops = [n.target for n in reversed(chain)]  # from the source outwards
    if not (len(ops) >= 3 and ops[0] is aten.unsqueeze.default and ops[1] is aten.expand.default
            and all(t in (*_VIEWS, aten.clone.default) for t in ops[2:]) and ops[-1] in _VIEWS):
        return None
    unsqueeze, expand, out = chain[-1], chain[-2], chain[0]
    x, xu, xe, xo = (ir.val(n) for n in (node, unsqueeze, expand, out))
    if not all(isinstance(v, torch.Tensor) for v in (x, xu, xe, xo)) or x.dim() != 4 or heads is None:
        return None
    b, hkv, s, d = x.shape
    if unsqueeze.args[1] != 2 or len(unsqueeze.users) != 1 or len(expand.users) != 1:
        return None
    n = xe.shape[2]
    return node if (_same(xe.shape, (b, hkv, n, s, d)) and _same(xo.shape, (b, heads, s, d))
                    and _same((hkv * n,), (heads,))) else None


def _erase_unused(gm: torch.fx.GraphModule, node) -> None:
    """Erase `node` and the chain of single-input nodes above it that nothing else reads."""
    while isinstance(node, torch.fx.Node) and not node.users and node.op == "call_function":
        above = node.args[0]
        gm.graph.erase_node(node)
        node = above


def _identity_input(node: torch.fx.Node) -> torch.fx.Node | None:
    """The input `node` returns unchanged in value, dtype, device and shape, or None."""
    x = node.args[0] if node.args else None
    xv, out = (ir.val(x) if isinstance(x, torch.fx.Node) else None), ir.val(node)
    if not (isinstance(xv, torch.Tensor) and isinstance(out, torch.Tensor)):
        return None
    if (out.dtype, out.device) != (xv.dtype, xv.device) or not _same(out.shape, xv.shape):
        return None
    t, args = node.target, node.args
    if t is aten.slice.Tensor:
        start = args[2] if len(args) > 2 else node.kwargs.get("start", 0)
        end = args[3] if len(args) > 3 else node.kwargs.get("end")
        step = args[4] if len(args) > 4 else node.kwargs.get("step", 1)
        whole = end is None or (isinstance(end, int) and end >= _BIG)
        return x if start in (0, None) and step == 1 and whole else None
    if t in (aten.to.dtype, aten.to.device) and len(args) <= 3 and not set(node.kwargs) - {"non_blocking"}:
        return x  # no copy, no memory format asked: `to` returns its input
    if t is aten.alias.default:
        return x  # a view of all of x: the same memory
    if t is aten.mul.Tensor and len(args) == 2 and isinstance(args[1], (int, float)) and args[1] == 1:
        return x if xv.is_floating_point() else None
    return None


def _writes(node: torch.fx.Node) -> bool:
    """Whether `node` writes into one of its inputs (an in-place or out= ATen op)."""
    return bool(getattr(getattr(node.target, "_schema", None), "is_mutable", False))


def _conv1d_as_linear(gm: torch.fx.GraphModule, addmm: torch.fx.Node, transposed: dict[str, str]) -> bool:
    """Replace ``view(addmm(b, view(x, [-1, in]), W), [*lead, out])`` by ``linear(x, Wᵀ, b)`` where exact."""
    if addmm.kwargs or len(addmm.args) != 3 or len(addmm.users) != 1:
        return False
    bias, flat, w = addmm.args
    (unflat,) = addmm.users
    if not (_is_view(flat) and _is_view(unflat) and w.op == "get_attr"):
        return False
    x = flat.args[0]
    weight = ir.get_attr(gm, w.target)
    if not (isinstance(weight, torch.Tensor) and weight.dim() == 2 and _restores(x, flat, unflat, weight)):
        return False
    target = transposed.get(w.target) or _add_transposed(gm, w.target, weight)
    if target is None:
        return False
    transposed[w.target] = target
    with gm.graph.inserting_before(addmm):
        weight_t = gm.graph.get_attr(target)
        linear = gm.graph.call_function(aten.linear.default, (x, weight_t, bias))
    meta.copy_provenance(addmm, linear)
    unflat.replace_all_uses_with(linear)
    for node in (unflat, addmm, flat, w):
        if not node.users:
            gm.graph.erase_node(node)
    return True


def _is_view(node) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _VIEWS


def _restores(x: torch.fx.Node, flat: torch.fx.Node, unflat: torch.fx.Node, weight: torch.Tensor) -> bool:
    """Whether x [*lead, in] is contiguous, `flat` is x as [rows, in] and `unflat` gives [*lead, out]."""
    xv, fv, uv = (ir.val(n) if isinstance(n, torch.fx.Node) else None for n in (x, flat, unflat))
    if not all(isinstance(v, torch.Tensor) for v in (xv, fv, uv)) or xv.dim() < 2 or fv.dim() != 2:
        return False
    in_features, out_features = weight.shape
    return (xv.is_contiguous() and _same((fv.shape[1], xv.shape[-1]), (in_features, in_features))
            and _same(uv.shape, (*xv.shape[:-1], out_features)))


def _same(a, b) -> bool:
    """Whether two sizes (ints or symbolic) are provably equal."""
    return len(a) == len(b) and statically_known_true(sym_eq(tuple(a), tuple(b)))


def _add_transposed(gm: torch.fx.GraphModule, target: str, weight: torch.Tensor) -> str | None:
    """Register ``weight.t()`` (a view) beside the tensor at `target`; its target, or None where the holder
    is not the graph's own."""
    path, _, name = target.rpartition(".")
    holder = gm.get_submodule(path) if path else gm
    if holder is not gm and type(holder) is not torch.nn.Module:
        return None
    new, i = f"{name}_t", 1
    while hasattr(holder, new):
        new, i = f"{name}_t{i}", i + 1
    holder.register_buffer(new, weight.detach().t())
    return f"{path}.{new}" if path else new
