"""The facts sparsegraph keeps on graph nodes.

All of them live under one namespaced key, ``node.meta["sparsegraph"]``, as a frozen `NodeInfo`.
The site queries in `sparsegraph.ir` write them once after capture (`ir.annotate`); rewrites copy them
(and torch's own provenance keys) onto the nodes they create, so that later passes, the cost model and
the report can say which site a node belongs to even after its neighbours were replaced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx

KEY = "sparsegraph"

# torch's provenance keys that a rewrite copies onto the nodes it creates.
PROVENANCE_KEYS = ("nn_module_stack", "stack_trace", "from_node", "source_fn_stack")

ROLES = frozenset({
    # attention
    "attn.q", "attn.k", "attn.v", "attn.qkv", "attn.core", "attn.qk", "attn.softmax", "attn.pv", "attn.out",
    # MLP
    "mlp.up", "mlp.gate", "mlp.act", "mlp.mul", "mlp.down",
    # pointwise (1x1) convolution
    "conv.1x1",
})


@dataclass(frozen=True)
class NodeInfo:
    """What a node is, seen from the sparsity sites.

    site: stable id of the site (``"attn:encoder.layer.0.attention"``, ``"mlp:model.layers.3.mlp"``);
    role: the node's part in the site, one of `ROLES`;
    layer: index of the site among the sites of its kind, in graph order;
    module_path: dotted path of the module the node came from (``""`` when unknown);
    density: for a data-dependent sparse op, the fraction of its dense work expected to run, measured
    on calibration data by the pass that inserted it (the cost model reads it); None elsewhere.
    """

    site: str
    role: str
    layer: int
    module_path: str
    density: float | None = None

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}; roles are {sorted(ROLES)}")


def get(node: torch.fx.Node) -> NodeInfo | None:
    return node.meta.get(KEY)


def set_info(node: torch.fx.Node, info: NodeInfo) -> None:
    node.meta[KEY] = info


def copy_provenance(src: torch.fx.Node, dst: torch.fx.Node) -> None:
    """Copy our facts and torch's provenance from `src` to a node a rewrite created in its place."""
    for key in (KEY, *PROVENANCE_KEYS):
        if key in src.meta:
            dst.meta[key] = src.meta[key]


def check(gm: torch.fx.GraphModule) -> list[str]:
    """Problems with our meta key on any node of `gm` (empty when well-formed)."""
    problems = []
    for node in gm.graph.nodes:
        value = node.meta.get(KEY)
        if value is not None and not isinstance(value, NodeInfo):
            problems.append(f"node {node.name}: meta[{KEY!r}] is {type(value).__name__}, expected NodeInfo")
    return problems
