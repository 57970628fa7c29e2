"""Codegen: the ``sparsegraph::`` op vocabulary and its kernels (see codegen/README.md for the table).

`OPS` names every op and its module; `ops()` imports them all (cheap: Triton kernels load lazily) and
returns them by name. `onnx_translations()` is the ``custom_translation_table`` for ``torch.onnx.export``;
`op_of(node)` is the op a graph node calls.
"""

from __future__ import annotations

import importlib

import torch

from sparsegraph.codegen.op import KERNEL_BACKENDS, SparseOp, triton_available, use_backend

__all__ = ["KERNEL_BACKENDS", "OPS", "SparseOp", "onnx_translations", "op_of", "ops", "triton_available",
           "use_backend"]

OPS: dict[str, str] = {
    "nm_linear": "sparsegraph.codegen.nm_linear",
    "sparse_linear": "sparsegraph.codegen.sparse_linear",
    "core_linear": "sparsegraph.codegen.core_linear",
    "block_sparse_attention": "sparsegraph.codegen.block_sparse_attention",
    "dynamic_block_sparse_attention": "sparsegraph.codegen.dynamic_block_sparse_attention",
    "decode_attention": "sparsegraph.codegen.decode_attention",
    "token_scores": "sparsegraph.codegen.token_scores",
    "core_scores": "sparsegraph.codegen.core_scores",
    "token_select": "sparsegraph.codegen.token_select",
    "token_gather": "sparsegraph.codegen.token_gather",
    "roi_scores": "sparsegraph.codegen.roi_scores",
    "sparse_conv1x1": "sparsegraph.codegen.sparse_conv1x1",
}


def ops() -> dict[str, SparseOp]:
    return {name: importlib.import_module(module).OP for name, module in OPS.items()}


def onnx_translations() -> dict:
    return {op.overload: op.onnx for op in ops().values() if op.onnx is not None}


def op_of(node: torch.fx.Node) -> SparseOp | None:
    """The SparseOp a graph node calls, or None."""
    if node.op != "call_function":
        return None
    return next((op for op in ops().values() if node.target is op.overload), None)
