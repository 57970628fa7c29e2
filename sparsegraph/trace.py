"""Capture: a model and example inputs become one GraphModule, the IR every pass works on.

Order of attempts:

1. ``torch.export.export(strict=False)`` with dynamic batch and sequence dimensions (``Dim.AUTO``: export
   keeps a dimension dynamic where the model allows it and specialises it silently where not);
2. the same with static shapes, if the dynamic attempt failed on a shape constraint;
3. ``torch.fx.symbolic_trace`` (torch-level nodes instead of ATen; `sparsegraph.ir` reads both).

If all fail, `TraceError` lists what each attempt hit and what to try. The exported program is
unlifted (``ExportedProgram.module()``): parameters are ``get_attr`` nodes under the model's own module
paths, and the GraphModule takes the same arguments as the model's ``forward``.

Tracing runs the model in eval mode (sparsity is an inference optimisation) and, for Hugging Face
models, with ``config.use_cache`` off (the graph returns outputs, not a cache object): both are switched
for the capture and restored afterwards, so the user's model leaves exactly as it came.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.utils import _pytree as pytree

from sparsegraph import canonicalize, inputs, ir
from sparsegraph.errors import TraceError

__all__ = ["CAPTURE_LOCK", "dynamic_shapes_for", "trace"]

# torch.export is not re-entrant across threads (its pre-dispatch mode stack is one process-wide object:
# two at once fail with "Trying to pop empty mode stack"), torch.fx.symbolic_trace patches module calls
# process-wide, and `warnings.catch_warnings` swaps the process-wide filters: one capture (trace or ONNX
# export) at a time.
CAPTURE_LOCK = threading.RLock()


def trace(
    model: torch.nn.Module,
    example_inputs: tuple = (),
    example_kwargs: dict | None = None,
    *,
    dynamic: bool = True,
    dynamic_shapes: dict | None = None,
    root: str | None = None,
) -> torch.fx.GraphModule:
    """Capture `model` called as ``model(*example_inputs, **example_kwargs)`` into a GraphModule.

    With ``dynamic=True`` the batch dimension of every tensor input, and the sequence dimension of
    token-like inputs (integer or boolean 2-D tensors, float 3-D tensors), may vary at run time;
    ``dynamic_shapes`` (torch.export's spec, keyed by ``forward``'s parameter names) says exactly which
    instead, and the example must then be at least 2 along every dimension it makes dynamic.
    ``root`` names a submodule of `model` that the graph is *of*: `model` wraps it (as
    `sparsegraph.kv_cache.CacheStep` wraps a causal LM), and the graph's parameter and module paths drop
    the ``root.`` prefix, so site ids and the plan's fingerprint are those of the wrapped model.
    The returned graph carries our site annotations (`ir.annotate`) and concrete shapes at the example
    inputs in ``node.meta["val"]``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"expected a torch.nn.Module, got {type(model).__name__}; wrap callables in a "
                         "Module")
    example_inputs = _as_tuple(example_inputs)
    example_kwargs = dict(example_kwargs or {})
    # Checked up front: otherwise export fails on the mismatch, the fx fallback (which never calls the
    # model) succeeds, and the mismatch surfaces later as a bare TypeError from shape propagation.
    _bind(model.forward, example_inputs, example_kwargs)
    with CAPTURE_LOCK:
        return _capture(model, example_inputs, example_kwargs, dynamic, dynamic_shapes, root)


def _capture(model, example_inputs: tuple, example_kwargs: dict, dynamic: bool, dynamic_shapes: dict | None,
             root: str | None) -> torch.fx.GraphModule:
    attempts: list[tuple[str, BaseException]] = []
    gm = None
    with _eval_mode(model), _without_kv_cache(model):
        if dynamic_shapes is not None:
            gm = _try(attempts, "torch.export (the given dynamic shapes)",
                      lambda: _export_with(model, example_inputs, example_kwargs, dynamic_shapes))
        elif dynamic:
            gm = _try(attempts, "torch.export (dynamic batch/sequence)",
                      lambda: _export(model, example_inputs, example_kwargs, dynamic=True))
        if gm is None:
            gm = _try(attempts, "torch.export (static shapes)",
                      lambda: _export(model, example_inputs, example_kwargs, dynamic=False))
            if gm is not None and dynamic:
                warnings.warn(
                    "dynamic-shape export failed, so the graph is specialised to the example shapes: "
                    f"{_first_line(attempts[-1][1])}", stacklevel=4)
        if gm is None:
            gm = _try(attempts, "torch.fx.symbolic_trace", lambda: _symbolic_trace(model, example_kwargs))
    if gm is None:
        raise TraceError(_explain(model, attempts))
    if root is not None:
        _reroot(gm, root)
    inputs.record(gm, ir.flatten_inputs(gm, example_inputs, example_kwargs))
    canonicalize.canonicalize(gm)
    ir.propagate_shapes(gm, example_inputs, example_kwargs)
    ir.annotate(gm)
    return gm


def dynamic_shapes_for(fn: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A ``dynamic_shapes`` spec for torch.export / torch.onnx.export, keyed by ``fn``'s parameter names.

    Batch (dim 0) of every tensor is dynamic; so is dim 1 of integer/boolean 2-D tensors (token ids,
    masks) and of float 3-D tensors (embeddings). ``Dim.AUTO`` lets export keep a dimension static where
    the model fixes it instead of failing.
    """
    auto = torch.export.Dim.AUTO

    def spec(x):
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return None
        dims = {0: auto}
        token_like = x.dim() == 2 and not torch.is_floating_point(x)
        if token_like or (x.dim() == 3 and torch.is_floating_point(x)):
            dims[1] = auto
        return dims

    bound = _bind(fn, args, kwargs)
    return {name: pytree.tree_map(spec, value) for name, value in bound.items()}


# ---------------------------------------------------------------------------------------------------------


def _export(model, args, kwargs, *, dynamic: bool) -> torch.fx.GraphModule:
    if not dynamic:
        return _export_with(model, args, kwargs, None)
    # A size-1 dimension would be specialised to 1 by export's 0/1 rule: trace at size 2 instead.
    wide_args, wide_kwargs = pytree.tree_map(widen, (args, kwargs))
    shapes = dynamic_shapes_for(model.forward, wide_args, wide_kwargs)
    gm = _export_with(model, wide_args, wide_kwargs, shapes)
    _check_widened(gm, ir.flatten_inputs(gm, args, kwargs), ir.flatten_inputs(gm, wide_args, wide_kwargs))
    return gm


def _check_widened(gm: torch.fx.GraphModule, example: list, wide: list) -> None:
    """Fail the dynamic attempt when export fixed a dimension that was widened from 1 to 2 (``Dim.AUTO``
    specialises silently: Mochi loops over its batch): that graph would take size 2 only, not the
    example's 1, so the static attempt traces at the example's own shapes instead."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, x, w in zip(placeholders, example, wide):
        traced = node.meta.get("val")
        if not isinstance(x, torch.Tensor) or not isinstance(traced, torch.Tensor):
            continue
        for dim, (size, widened) in enumerate(zip(x.shape, w.shape)):
            if size != widened and is_concrete_int(traced.shape[dim]):
                raise ValueError(f"the model fixes dimension {dim} of input {node.name!r} (traced at "
                                 f"{widened} to keep it dynamic, the example has {size}); tracing at the "
                                 "example's shapes instead")


def _export_with(model, args, kwargs, shapes) -> torch.fx.GraphModule:
    # Under no_grad: a graph that writes into an input (a KV cache) would otherwise fail autograd's
    # check on in-place writes; the captured ops are the same.
    with torch.no_grad():
        ep = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=shapes)
    return ep.module()


def _reroot(gm: torch.fx.GraphModule, root: str) -> None:
    """Make submodule `root` of `gm` its top: its children become `gm`'s, and every parameter path and
    module path recorded in the graph drops the ``root.`` prefix."""
    inner, prefix = gm.get_submodule(root), root + "."
    for name, child in inner.named_children():
        setattr(gm, name, child)
    for name, tensor in [*inner.named_parameters(recurse=False), *inner.named_buffers(recurse=False)]:
        setattr(gm, name, tensor)
    delattr(gm, root)
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target.startswith(prefix):
            node.target = node.target.removeprefix(prefix)
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {
                key: (path.removeprefix(prefix) if isinstance(path, str) else path, kind)
                for key, (path, kind) in stack.items()}
    gm.recompile()


def _symbolic_trace(model, kwargs) -> torch.fx.GraphModule:
    # Non-tensor keyword arguments (flags such as use_cache=False) are fixed at their example values.
    concrete = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
    return torch.fx.symbolic_trace(model, concrete_args=concrete or None)


def widen(x):
    """`x` with a size-1 batch (and token) dimension doubled, so that export does not specialise it."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return x
    if x.shape[0] == 1:
        x = torch.cat([x, x], dim=0)
    if x.dim() >= 2 and x.shape[1] == 1 and (not torch.is_floating_point(x) or x.dim() == 3):
        x = torch.cat([x, x], dim=1)
    return x


def _bind(fn, args, kwargs) -> dict[str, Any]:
    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
    except TypeError as e:
        raise TraceError(f"the example inputs do not match the signature of forward: {e}") from e
    return dict(bound.arguments)


def _try(attempts, label, fn):
    try:
        return fn()
    except Exception as e:  # every failure is reported, none is swallowed: see _explain
        attempts.append((label, e))
        return None


def _explain(model, attempts) -> str:
    lines = [f"could not capture {type(model).__name__} into a graph."]
    text = ""
    for label, err in attempts:
        lines.append(f"  - {label}: {type(err).__name__}: {_first_line(err)}")
        text += f"{type(err).__name__} {err}\n"
    lines.append("What to try:")
    if "Cache" in text or "pytree" in text.lower():
        lines.append("  - the model returns a cache object export cannot flatten: call it with "
                     "use_cache=False (example_kwargs={'use_cache': False}) or wrap it so it returns "
                     "tensors only")
    if "data-dependent" in text.lower() or "GuardOnDataDependent" in text:
        lines.append("  - the model branches on tensor values: make the branch static, use torch.cond, "
                     "or trace with dynamic=False")
    if "Constraint" in text or "specializ" in text.lower():
        lines.append("  - a dynamic dimension was fixed by the model: trace with dynamic=False")
    lines.append("  - pass keyword inputs through example_kwargs, positional ones through example_inputs")
    lines.append("  - wrap the model in a torch.nn.Module whose forward takes and returns tensors only")
    return "\n".join(lines)


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or repr(err)
    return text.splitlines()[0][:300]


def _as_tuple(x) -> tuple:
    if isinstance(x, tuple):
        return x
    if isinstance(x, list):
        return tuple(x)
    return (x,)


@contextlib.contextmanager
def _without_kv_cache(model: torch.nn.Module) -> Iterator[None]:
    """Hugging Face models return a cache object when their config says ``use_cache`` (the default of
    every causal LM): the captured graph is a function of its inputs, so it is traced with the flag off
    (it returns the logits and no cache). The flag is put back afterwards, on every config object of the
    model."""
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None
               and getattr(c, "use_cache", None) is True}
    try:
        for c in configs.values():
            c.use_cache = False
        yield
    finally:
        for c in configs.values():
            c.use_cache = True


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, training in flags:
            m.training = training
