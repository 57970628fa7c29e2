"""ONNX export of a (compiled) GraphModule, and a runner that calls the exported file like the model.

Export re-captures the graph with torch.export (`capture`: dynamic batch and sequence axes, as in
`trace`) and converts it with ``torch.onnx.export``, handing it every sparse op's onnxscript translation
(`sparsegraph.codegen.onnx_translations`). The file is checked with ``onnx.checker`` and then, by default,
numerically (`validate_onnx`, as Hugging Face Optimum validates its exports): onnxruntime and PyTorch run the
example inputs and every output must agree within ``ATOL · max(1, max |PyTorch output|)`` (``ATOL`` =
1e-4: float32 kernels summing in another order differ by about 1e-6 relative, so this leaves two orders of
magnitude for accumulation over deep graphs and still catches a wrong translation, whose errors are of
the order of the outputs themselves); integer and boolean outputs must be equal.

`OnnxModel` runs the file in onnxruntime: it takes the same arguments as the model (flattened the way
the graph's placeholders are) and returns the same output structure, as torch tensors.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch.export._tree_utils import reorder_kwargs
from torch.utils import _pytree as pytree

from sparsegraph import codegen, ir
from sparsegraph.errors import ExportError
from sparsegraph.trace import CAPTURE_LOCK, dynamic_shapes_for, widen

_TWO_GB = 2**31
ATOL = 1e-4  # validation: |onnxruntime - PyTorch| <= ATOL * max(1, max |PyTorch output|), per output


def capture(gm: torch.nn.Module, args: tuple, kwargs: dict, *, dynamic: bool = True,
            dynamic_shapes: dict | None = None) -> torch.export.ExportedProgram:
    """`gm` called as ``gm(*args, **kwargs)`` captured by ``torch.export`` (non-strict), with dynamic batch
    and sequence axes as `trace` makes them (size-1 axes widened first, or ``dynamic_shapes``, or none with
    ``dynamic=False``), one capture at a time."""
    shapes = dynamic_shapes if dynamic else None
    if dynamic and shapes is None:
        args, kwargs = pytree.tree_map(widen, (args, kwargs))
        shapes = dynamic_shapes_for(gm.forward, args, kwargs)
    # no_grad: a graph that writes into an input (a KV cache) is refused by autograd otherwise
    with CAPTURE_LOCK, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return torch.export.export(gm, args, kwargs, strict=False, dynamic_shapes=shapes)


def export_onnx(gm: torch.nn.Module, path: str | os.PathLike, args: tuple, kwargs: dict | None = None,
                *, dynamic: bool = True, opset: int = 18, dynamic_shapes: dict | None = None,
                output_names: list[str] | None = None, validate: bool = True) -> Path:
    """Write `gm` (called as ``gm(*args, **kwargs)``) to `path` as ONNX; return the path.

    ``dynamic_shapes`` (torch.export's spec) replaces the default dynamic axes (batch, and the sequence of
    token-like inputs); ``output_names`` names the graph's outputs in order. With ``validate`` the file
    is run in onnxruntime at `args`/`kwargs` and compared with `gm` (module docstring); a mismatch is an
    `ExportError` naming the output and the difference."""
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
        ep = capture(gm, args, kwargs, dynamic=dynamic, dynamic_shapes=dynamic_shapes)
        with CAPTURE_LOCK, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
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
    if validate:
        validate_onnx(path, gm, args, kwargs, ep.call_spec.in_spec)
    return path


def validate_onnx(path: Path, gm: torch.nn.Module, args: tuple, kwargs: dict, in_spec) -> None:
    """Refuse the ONNX file at `path` (`ExportError`) unless onnxruntime gives `gm(*args, **kwargs)`'s
    outputs within the tolerance of the module docstring. The file's inputs are the call's tensors in the
    order of the exported program's `in_spec`. `gm` runs on clones of the inputs: a graph that writes into
    an input (a KV cache) must not change what onnxruntime is fed."""
    flat = pytree.tree_leaves((tuple(args), reorder_kwargs(kwargs, in_spec) if kwargs else {}))
    feeds = [x for x in flat if isinstance(x, torch.Tensor)]
    session = _session(path)
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(feeds):
        raise ExportError(f"cannot validate {path}: the ONNX model takes {len(names)} inputs {names}, the "
                          f"example call gives {len(feeds)} tensors; export with validate=False (CLI "
                          "--no-validate) to skip the check")
    got = session.run(None, {name: x.detach().cpu().numpy() for name, x in zip(names, feeds)})
    # under the capture lock: a non-strict torch.export of the same module in another thread swaps its
    # tensors for fake ones while it traces, and an eager run meanwhile would read them
    with CAPTURE_LOCK, torch.no_grad():
        clone = lambda x: x.clone() if isinstance(x, torch.Tensor) else x  # noqa: E731
        expected = pytree.tree_leaves(gm(*pytree.tree_map(clone, tuple(args)),
                                         **pytree.tree_map(clone, dict(kwargs))))
    outputs = [o.name for o in session.get_outputs()]
    if len(got) != len(expected):
        raise ExportError(f"ONNX validation failed for {path}: onnxruntime gives {len(got)} outputs "
                          f"{outputs}, PyTorch {len(expected)}. The file does not compute what the model "
                          "does; export with validate=False (CLI --no-validate) to keep it unchecked")
    for name, ours, theirs in zip(outputs, got, expected):
        problem = _mismatch(np.asarray(ours), theirs)
        if problem:
            raise ExportError(f"ONNX validation failed for {path} at the example inputs: output {name!r} "
                              f"{problem}. The file is written but does not compute what the model does: "
                              "an op's ONNX translation (ours in codegen/, or torch.onnx's) is wrong; export "
                              "with validate=False (CLI --no-validate) to keep it unchecked")


def _mismatch(got: np.ndarray, expected) -> str | None:
    """How onnxruntime's output `got` differs from PyTorch's `expected` beyond the tolerance, or None."""
    if not isinstance(expected, torch.Tensor):
        expected = torch.as_tensor(expected)
    expected = expected.detach().cpu()
    if tuple(got.shape) != tuple(expected.shape):
        return f"has shape {list(got.shape)} in onnxruntime and {list(expected.shape)} in PyTorch"
    ours = torch.from_numpy(got.copy())
    if not (expected.is_floating_point() or expected.is_complex()):
        differ = int((ours.to(expected.dtype) != expected).sum())
        return f"differs from PyTorch in {differ} of {expected.numel()} values (exact)" if differ else None
    ours, expected = ours.double(), expected.double()
    finite = expected[torch.isfinite(expected)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    tol = ATOL * max(1.0, scale)
    close = torch.isclose(ours, expected, rtol=0.0, atol=tol, equal_nan=True)
    if bool(close.all()):
        return None
    worst = float((ours - expected).abs()[~close].nan_to_num(nan=float("inf")).max())
    return (f"differs from PyTorch by {worst:.3g} at most ({int((~close).sum())} of {expected.numel()} "
            f"values beyond the tolerance {tol:.3g} = {ATOL:g} x max(1, largest |output| {scale:.3g}))")


def _session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session for the file at `path` whose threads do not spin-wait (`OnnxModel`)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxModel:
    """An exported model in onnxruntime, called like the original: ``OnnxModel(path, gm)(*args)``.

    ``threads`` sets onnxruntime's intra-op threads. Its threads do not spin-wait between runs
    (``allow_spinning = 0``): spinning threads keep cores busy after a run returns, which on a small
    machine starves whatever runs next (another model in a side-by-side benchmark, or the caller).
    """

    def __init__(self, path: str | os.PathLike, gm: torch.fx.GraphModule, threads: int | None = None):
        self.session = _session(path, threads)
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
