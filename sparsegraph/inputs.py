"""What a traced graph takes, and the check every call of a compiled model passes first.

The capture records, per graph input, its name, dtype, rank and which sizes were traced dynamic
(torch.export leaves a symbol where a size may vary; the fx fallback records no sizes, so every size
may vary there). A call is checked against it before the graph runs, so a mistake is an `InputError`
that names the input and the fix, instead of a guard failure, a dtype clash deep in a matmul, or an
extra input dropped without a word:

- the inputs must bind as the example's did (positional count and keywords);
- a tensor input keeps its kind (floating point, integer, bool) and, when floating point, its dtype:
  a float16 image for a float32 model is refused with the cast to make (the weights are float32);
- its rank, and every size that was not traced dynamic, must be the example's.

Batch 0 and any size a dynamic dimension takes are left to the graph: batch 0 runs where the model
runs on it, and where the graph fails on it the compiled model says so (`empty`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from sparsegraph import ir
from sparsegraph.errors import InputError

KEY = "sparsegraph.inputs"  # where the signature lives: GraphModule.meta


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: torch.dtype | None  # None: not a tensor
    sizes: tuple[int | None, ...]  # None where the size may vary

    def describe(self) -> str:
        dims = ", ".join("·" if s is None else str(s) for s in self.sizes)
        return f"{self.name}: {str(self.dtype).replace('torch.', '')}[{dims}]"


def record(gm: torch.fx.GraphModule, example: list) -> None:
    """Store the signature of `gm` (called with flat inputs `example`) in ``gm.meta``, before shape
    propagation replaces the placeholders' symbolic sizes with the example's."""
    specs = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example):
        if not isinstance(value, torch.Tensor):
            specs.append(InputSpec(node.name, None, ()))
            continue
        traced = node.meta.get("val")
        if isinstance(traced, torch.Tensor):
            sizes = tuple(s if isinstance(s, int) else None for s in traced.shape)
        else:  # the fx fallback: no sizes recorded, every size may vary
            sizes = (None,) * value.dim()
        specs.append(InputSpec(node.name, value.dtype, sizes))
    gm.meta[KEY] = tuple(specs)


def check(gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> None:
    """Raise `InputError` when ``gm(*args, **kwargs)`` is not a call its graph was compiled for."""
    specs = gm.meta.get(KEY)
    if specs is None:
        return
    try:
        flat = ir.flatten_inputs(gm, args, kwargs)
    except (TypeError, ValueError) as e:
        raise InputError(f"the compiled model takes ({', '.join(s.describe() for s in specs)}): {e}") from e
    for spec, value in zip(specs, flat):
        if spec.dtype is None or not isinstance(value, torch.Tensor):
            if (spec.dtype is None) != (not isinstance(value, torch.Tensor)):
                raise InputError(f"input {spec.name!r} was {'a tensor' if spec.dtype else 'not a tensor'} "
                                 f"when compiled, got {type(value).__name__}")
            continue
        _check_tensor(spec, value)


def empty(args: tuple, kwargs: dict) -> bool:
    """Whether any tensor of a call has a dimension of size 0 (batch 0): then a failure inside the graph
    is the input's doing, and is reported as such."""
    return any(t.numel() == 0 for t in ir.tensors((args, kwargs)))


def _check_tensor(spec: InputSpec, value: torch.Tensor) -> None:
    if _kind(value.dtype) != _kind(spec.dtype) or (value.is_floating_point() and value.dtype != spec.dtype):
        raise InputError(f"input {spec.name!r} is {value.dtype}, the model was compiled with {spec.dtype}: "
                         f"cast it (x.to({spec.dtype})), or compile the model with {value.dtype} inputs "
                         "and weights")
    if value.dim() != len(spec.sizes):
        raise InputError(f"input {spec.name!r} has {value.dim()} dimensions {tuple(value.shape)}, the model "
                         f"was compiled for {len(spec.sizes)} ({spec.describe()})")
    fixed = [(d, want, got) for d, (want, got) in enumerate(zip(spec.sizes, value.shape))
             if want is not None and want != got]
    if fixed:
        d, want, got = fixed[0]
        raise InputError(f"input {spec.name!r} has size {got} in dimension {d}, the graph was traced with "
                         f"{want} there and only the sizes marked · may vary ({spec.describe()}); compile "
                         "with an example of this shape: sparsegraph.compile(model, plan=cm.plan, "
                         "example_inputs=...) replays the same decisions without calibrating again")


def _kind(dtype: torch.dtype) -> str:
    if dtype.is_floating_point:
        return "float"
    return "bool" if dtype == torch.bool else "integer"
