"""ONNX export of a (compiled) GraphModule, and a runner that calls the exported file like the model.

Export re-captures the graph with torch.export (dynamic batch and sequence axes, as in `trace`) and
converts it with ``torch.onnx.export``, handing it every sparse op's onnxscript translation
(`sparsegraph.codegen.onnx_translations`). The file is checked with ``onnx.checker``.

`OnnxModel` runs the file in onnxruntime: it takes the same arguments as the model (flattened the way
the graph's placeholders are) and returns the same output structure, as torch tensors.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import onnx
import torch
from torch.utils import _pytree as pytree

from sparsegraph import codegen, ir
from sparsegraph.errors import ExportError
from sparsegraph.trace import CAPTURE_LOCK, dynamic_shapes_for, widen

_TWO_GB = 2**31



def export_onnx(gm: torch.nn.Module, path: str | os.PathLike, args: tuple, kwargs: dict | None = None,
                *, dynamic: bool = True, opset: int = 18, dynamic_shapes: dict | None = None,
                output_names: list[str] | None = None) -> Path:
    """Write `gm` (called as ``gm(*args, **kwargs)``) to `path` as ONNX; return the path.

    ``dynamic_shapes`` (torch.export's spec) replaces the default dynamic axes (batch, and the sequence of
    token-like inputs); ``output_names`` names the graph's outputs in order."""
    path = Path(path)
    kwargs = dict(kwargs or {})
    graphs = [m.graph for m in gm.modules() if isinstance(m, torch.fx.GraphModule)]
    eager_only = sorted({op.name for g in graphs for n in g.nodes
                         if (op := codegen.op_of(n)) is not None and op.onnx is None})
    refused = sorted({f"{op.name}: {why}" for g in graphs for n in g.nodes
                      if (op := codegen.op_of(n)) is not None and op.onnx_refuses is not None
                      and (why := op.onnx_refuses(n))})
    if refused:
        raise ExportError(f"no ONNX translation for {refused}; compile without them to export")
    if eager_only:
        raise ExportError(f"ops {eager_only} have no ONNX translation (they run in PyTorch only; roi_scores: "
                          "RoI-only token selection has a data-dependent length); compile without them "
                          "to export")
    try:
        shapes = dynamic_shapes if dynamic else None
        if dynamic and shapes is None:
            args, kwargs = pytree.tree_map(widen, (args, kwargs))
            shapes = dynamic_shapes_for(gm.forward, args, kwargs)
        # no_grad: a graph that writes into an input (a KV cache) is refused by autograd otherwise
        with CAPTURE_LOCK, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            ep = torch.export.export(gm, args, kwargs, strict=False, dynamic_shapes=shapes)
            program = torch.onnx.export(ep, dynamo=True, opset_version=opset, verbose=False,
                                        custom_translation_table=codegen.onnx_translations())
    except Exception as e:
        raise ExportError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0][:400]}. "
                          "If an op has no ONNX translation, add one to its codegen module; "
                          "if the graph is specialised, retry with dynamic=False") from e
    for value, name in zip(program.model.graph.outputs, output_names or ()):
        value.name = name
    path.parent.mkdir(parents=True, exist_ok=True)
    size = sum(t.numel() * t.element_size() for t in gm.state_dict().values())
    program.save(str(path), external_data=size >= _TWO_GB)
    onnx.checker.check_model(str(path))
    return path


class OnnxModel:
    """An exported model in onnxruntime, called like the original: ``OnnxModel(path, gm)(*args)``.

    ``threads`` sets onnxruntime's intra-op threads. Its threads do not spin-wait between runs
    (``allow_spinning = 0``): spinning threads keep cores busy after a run returns, which on a small
    machine starves whatever runs next (another model in a side-by-side benchmark, or the caller).
    """

    def __init__(self, path: str | os.PathLike, gm: torch.fx.GraphModule, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.gm = gm
        self.input_names = [i.name for i in self.session.get_inputs()]
        info = getattr(gm.graph._codegen, "pytree_info", None)
        self.out_spec = info.out_spec if info is not None else None

    def feeds(self, *args, **kwargs) -> dict:
        flat = [x for x in ir.flatten_inputs(self.gm, args, kwargs) if isinstance(x, torch.Tensor)]
        if len(flat) != len(self.input_names):
            raise ExportError(f"the ONNX model takes {len(self.input_names)} inputs {self.input_names}, "
                              f"got {len(flat)} tensors")
        return {name: x.detach().cpu().numpy() for name, x in zip(self.input_names, flat)}

    def run_feeds(self, feeds: dict) -> list:
        return self.session.run(None, feeds)

    def __call__(self, *args, **kwargs):
        outputs = [torch.from_numpy(o) for o in self.run_feeds(self.feeds(*args, **kwargs))]
        if self.out_spec is not None:
            return pytree.tree_unflatten(outputs, self.out_spec)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)
