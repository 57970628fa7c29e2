"""Small, shared graph edits for rewrite passes: add a constant tensor, replace a node by an op call.

New nodes get the replaced node's provenance (our site facts and torch's ``nn_module_stack`` etc.), and
new tensors become buffers of the GraphModule: copies owned by the compiled model, never the user's.
"""

from __future__ import annotations

import copy
import re

import torch
import torch.fx

from sparsegraph import ir, meta

ADDED = "sparsegraph.added"  # GraphModule.meta: names of the tensors `add_tensor` registered, in order


def add_tensor(gm: torch.fx.GraphModule, name: str, tensor: torch.Tensor,
               before: torch.fx.Node) -> torch.fx.Node:
    """Register `tensor` as a buffer of `gm` under a unique name derived from `name`; return its get_attr
    node. The name is listed in ``gm.meta[ADDED]``: a saved model stores these tensors on their own
    (`sparsegraph.artifact`)."""
    base = "sg_" + re.sub(r"\W", "_", name)
    unique, i = base, 1
    while hasattr(gm, unique):
        unique, i = f"{base}_{i}", i + 1
    gm.register_buffer(unique, tensor)
    gm.meta.setdefault(ADDED, []).append(unique)
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(unique)


def replace_with_call(node: torch.fx.Node, target, args: tuple, kwargs: dict | None = None) -> torch.fx.Node:
    """Insert ``target(*args, **kwargs)`` before `node`, move `node`'s users onto it, and erase `node`."""
    graph = node.graph
    with graph.inserting_before(node):
        new = graph.call_function(target, args, kwargs or {})
    meta.copy_provenance(node, new)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def linear_bias_node(node: torch.fx.Node) -> torch.fx.Node | None:
    """The node holding a linear node's bias (created as a get_attr for an ``nn.Linear`` call_module)."""
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(node.target)
        if module.bias is None:
            return None
        with node.graph.inserting_before(node):
            return node.graph.get_attr(f"{node.target}.bias")
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return bias if isinstance(bias, torch.fx.Node) else None


def replace_linear(gm: torch.fx.GraphModule, node: torch.fx.Node, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.fx.Node:
    """Replace a linear node by ``aten.linear(x, weight, bias)`` with new (copied) weight tensors."""
    parts = ir.linear_parts(node)
    w = add_tensor(gm, f"{parts.module_path}.weight", weight.detach().contiguous().clone(), node)
    b = (add_tensor(gm, f"{parts.module_path}.bias", bias.detach().contiguous().clone(), node)
         if bias is not None else None)
    return replace_with_call(node, torch.ops.aten.linear.default, (parts.x, w, b))


def _where_true(how: str) -> tuple[float, float]:
    """What a bool mask's True and False add to the scores: SDPA (and an added bool) keep True, a
    ``masked_fill(·, −inf)`` mask drops it."""
    return (0.0, float("-inf")) if how in ("add", "sdpa") else (float("-inf"), 0.0)


def additive_value(mask: torch.Tensor, how: str) -> torch.Tensor:
    """`additive_mask` on a value: the float mask added to the scores."""
    if how in ("add", "sdpa") and mask.dtype != torch.bool:
        return mask.float()
    return torch.where(mask.bool(), *_where_true(how))


def additive_mask(gm, mask: torch.fx.Node, how: str, before: torch.fx.Node) -> torch.fx.Node:
    """An additive float mask from an SDPA bool mask (True = keep) or a masked_fill mask (True = drop)."""
    val = ir.val(mask)
    if how in ("add", "sdpa") and val is not None and val.dtype != torch.bool:
        return mask
    keep, drop = _where_true(how)
    with gm.graph.inserting_before(before):
        node = gm.graph.call_function(torch.ops.aten.where.Scalar, (mask, keep, drop))
    meta.copy_provenance(before, node)
    return node


def attention_operands(gm: torch.fx.GraphModule, site, before: torch.fx.Node):
    """``(q, k, v, additive mask or None, scale)`` of an attention site as SDPA takes them.

    q [B, H, L, E], k and v [B, Hkv, S, E]; for an explicit chain k is transposed back from kᵀ (a node
    inserted before `before`) and its masks (added, or ``masked_fill``-ed) are summed into one additive
    mask. Returns None for sites that are not `readable` (other ops between the scores and the softmax).
    """
    g, out = gm.graph, site.out
    if not site.readable:
        return None
    q, k, v = site.q, site.k, site.v
    if site.key_transposed:
        with g.inserting_before(before):
            k = g.call_function(torch.ops.aten.transpose.int, (site.k, -1, -2))
        meta.copy_provenance(out, k)
    additive = None
    for node, how in site.masks:
        m = additive_mask(gm, node, how, before)
        if additive is None:
            additive = m
        else:
            with g.inserting_before(before):
                additive = g.call_function(torch.ops.aten.add.Tensor, (additive, m))
            meta.copy_provenance(out, additive)
    return q, k, v, additive, float(site.scale)


def sharing_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule with its own copy of `gm`'s graph (nodes, meta dicts, input/output handling) and the
    same tensors: rewriting one leaves the other's code alone, and neither copies a weight (passes add new
    tensors, never write into old ones)."""
    graph = torch.fx.Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    graph.output(graph.graph_copy(gm.graph, {}))
    copied = torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    copied.meta.update(gm.meta)
    return copied
