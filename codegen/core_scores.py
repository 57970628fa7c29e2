"""``sparsegraph::core_scores``: token importance from the core (hot) neurons of the previous MLP.

CoreMatching's observation, turned around: the neurons a sequence mostly uses (its *core* neurons,
the ``hot`` set ``activation_profile`` measures) are driven by a few tokens; those tokens matter. With
the MLP's intermediate activations a [B, N, F], the hot neuron indices H and their centres c,

    s[b, t] = Σ_{j ∈ H} |a[b, t, j] − c_j|

and padding tokens (keys at ≤ −1e4 in the optional additive mask, as in `token_scores`) get −inf.
Backends: reference (mask over all F neurons); CPU (``index_select`` of the H columns); ONNX
(``Gather`` + ``Sub`` + ``Abs`` + ``ReduceSum``).
"""

from __future__ import annotations

import torch
from onnxscript import opset18 as op

from sparsegraph import ir
from sparsegraph.codegen.op import SparseOp
from sparsegraph.codegen.token_scores import _finish, _key_mask, onnx_key_padding


def reference(a: torch.Tensor, hot: torch.Tensor, centre: torch.Tensor,
              mask: torch.Tensor | None) -> torch.Tensor:
    chosen = torch.zeros(a.shape[-1], dtype=torch.bool, device=a.device)
    chosen[hot] = True
    s = torch.where(chosen, (a.float() - centre.float()).abs(),
                    torch.zeros_like(a, dtype=torch.float32)).sum(-1)
    return _finish(s, _key_mask(mask, a.shape[0], a.shape[1]))


def cpu(a, hot, centre, mask):
    s = (a.index_select(-1, hot).float() - centre.index_select(0, hot).float()).abs().sum(-1)
    return _finish(s, _key_mask(mask, a.shape[0], a.shape[1]))


def fake(a, hot, centre, mask):
    return a.new_empty(a.shape[:2], dtype=torch.float32)


def onnx(a, hot, centre, mask):
    s = op.ReduceSum(op.Abs(op.Sub(op.Cast(op.Gather(a, hot, axis=-1), to=1),
                                   op.Cast(op.Gather(centre, hot), to=1))),
                     op.Constant(value_ints=[-1]), keepdims=0)  # [B, N]
    if mask is None:
        return s
    return op.Where(onnx_key_padding(mask, op.Shape(s)), op.Constant(value_float=float("-inf")), s)


def cost(node: torch.fx.Node) -> tuple[int, int]:
    a, hot = ir.val(node.args[0]), ir.val(node.args[1])
    rows = a.numel() // a.shape[-1]
    return 0, rows * hot.numel() * a.element_size()


OP = SparseOp("core_scores", reference, fake=fake, cpu=cpu, onnx=onnx, cost=cost)
