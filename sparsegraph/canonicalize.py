"""Canonical forms at capture: rewrites that make a captured graph read the way `sparsegraph.ir` reads
graphs, computing bit for bit what the model computes.

One today. Hugging Face's ``Conv1D`` (GPT-2 and its family) stores its weight W as [in, out] and computes
``addmm(b, x.view(-1, in), W).view(*x.shape[:-1], out)``; it becomes ``linear(x, Wᵀ, b)``, the form of an
``nn.Linear``, so the site queries, the cost model and every pass see a plain linear layer: weight
[out, in], module path the Conv1D's.

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
