"""The cost model: multiply-accumulates and bytes moved, per node, per site and for the whole model.

Counted at the example input shapes (``node.meta["val"]``):

- linear ``y = x Wᵀ``: rows(x) · in · out MACs, rows = product of x's leading dims;
- matmul ``[..., M, K] @ [..., K, N]``: batch · M · K · N;
- convolution: numel(output) · (C_in / groups) · prod(kernel);
- scaled_dot_product_attention, q [B, H, L, E], v [B, H, S, Eᵥ]: B · H · L · S · (E + Eᵥ)
  (the two matmuls QKᵀ and PV; softmax is not a MAC);
- a ``sparsegraph::`` op: its own cost rule, e.g. n/m of dense for N:M (each op registers its rule and
  its dense form here when it is defined: `register`, so this model needs no import of the ops);
- a call to an op's dense form (a site ``speed_check`` put back): the form traced at the node's shapes
  and costed by these same rules (`dense_form_cost`);
- everything else: 0 MACs (elementwise, norms, softmax, embedding lookups).

An embedding lookup reads its indices and one table row per index, not the whole table.

Bytes moved by a compute node are the bytes of every tensor it reads (parameters included) and writes.
View-like ops (``kind == "shape"``) move nothing. This is the memory traffic of an unfused eager run,
an upper bound for fused code, and the figure that bounds batch-1 decoding.

ViT-B/16 at 224×224 comes to 17.56 GMACs (the usual figure), MiniLM at sequence S to
6 · (4·S·d² + 2·S²·d + 2·S·d·I) with d = 384, I = 1536.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from sparsegraph import ir


@dataclass(frozen=True)
class NodeCost:
    macs: int
    bytes: int


_RULES: dict[object, Callable[[torch.fx.Node], tuple[int, int]]] = {}  # op target → (macs, bytes) rule
_DENSE: set = set()  # dense forms of the ops: costed by tracing them


def register(target, rule: Callable[[torch.fx.Node], tuple[int, int]] | None, dense: Callable | None) -> None:
    """Cost `target`'s nodes with `rule` (None: by the dense form), and calls of `dense` by tracing it."""
    if rule is not None:
        _RULES[target] = rule
    if dense is not None:
        _DENSE.add(dense)


def node_cost(node: torch.fx.Node) -> NodeCost:
    """MACs and bytes of one node at its example shapes."""
    if node.op not in ("call_function", "call_module", "call_method"):
        return NodeCost(0, 0)
    if node.op == "call_function" and node.target in _RULES:
        return NodeCost(*_RULES[node.target](node))
    if node.op == "call_function" and node.target in _DENSE:
        return dense_form_cost(node, node.target)
    k = ir.kind(node)
    if k in ("shape", "sym_size") or ir.val(node) is None:
        return NodeCost(0, 0)
    return NodeCost(_macs(node, k), _bytes(node))


def dense_form_cost(node: torch.fx.Node, dense: Callable) -> NodeCost:
    """Cost of calling `dense` (a sparse op's dense form) with `node`'s arguments: the form is traced
    (make_fx) at the node's example shapes and its nodes costed by the rules above."""
    args = [torch.zeros(ir.val(a).shape, dtype=ir.val(a).dtype) if isinstance(a, torch.fx.Node) else a
            for a in node.args]
    dense_gm = make_fx(dense)(*args)
    ir.propagate_shapes(dense_gm, tuple(args))
    return total_cost(dense_gm)


def roofline(cost: NodeCost) -> float:
    """One number for a cost: max(MACs, bytes / 4), a crude roofline at 4 bytes per MAC (compute-bound
    nodes count their MACs, memory-bound ones their traffic)."""
    return max(cost.macs, cost.bytes / 4)


def graph_costs(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, NodeCost]:
    return {n: node_cost(n) for n in gm.graph.nodes}


def site_costs(gm: torch.fx.GraphModule) -> dict[str, NodeCost]:
    """Cost summed over the annotated nodes of each site."""
    totals: dict[str, NodeCost] = {}
    for site, nodes in ir.site_nodes(gm).items():
        costs = [node_cost(n) for n in nodes]
        totals[site] = NodeCost(sum(c.macs for c in costs), sum(c.bytes for c in costs))
    return totals


def total_cost(gm: torch.fx.GraphModule) -> NodeCost:
    costs = graph_costs(gm).values()
    return NodeCost(sum(c.macs for c in costs), sum(c.bytes for c in costs))


def _macs(node: torch.fx.Node, k: str | None) -> int:
    out = ir.val(node)
    if k == "linear":
        parts = ir.linear_parts(node)
        return math.prod(out.shape[:-1]) * parts.in_features * parts.out_features
    if k == "matmul":
        a, b = (ir.val(x) for x in node.args[:2])
        if a.dim() < 2 or b.dim() < 2:
            return out.numel() * a.shape[-1]
        return math.prod(out.shape[:-2]) * a.shape[-2] * a.shape[-1] * b.shape[-1]
    if k == "conv":
        weight = ir.val(node.args[1]) if node.op != "call_module" else ir.get_attr(
            node.graph.owning_module, node.target).weight
        return out.numel() * math.prod(weight.shape[1:])
    if k == "sdpa":
        q, _, v = (ir.val(x) for x in node.args[:3])
        return math.prod(q.shape[:-1]) * v.shape[-2] * (q.shape[-1] + v.shape[-1])
    return 0


def _bytes(node: torch.fx.Node) -> int:
    written = ir.tensors(ir.val(node))
    if ir.kind(node) == "embedding":  # a lookup reads the indices and one table row per index
        indices = ir.tensors(ir.val(node.args[1] if node.op == "call_function" else node.args[0]))
        return sum(t.numel() * t.element_size() for t in (*indices, *written, *written))
    read = [t for a in node.all_input_nodes for t in ir.tensors(ir.val(a) if a.op != "get_attr" else
                                                                _attr(a))]
    if node.op == "call_module":
        read += list(node.graph.owning_module.get_submodule(node.target).parameters())
    return sum(t.numel() * t.element_size() for t in (*read, *written))


def _attr(node: torch.fx.Node):
    value = ir.get_attr(node.graph.owning_module, node.target)
    return value if isinstance(value, torch.Tensor) else None
