"""The sparse-op mechanism: each op of the ``sparsegraph::`` vocabulary is one `SparseOp`.

A `SparseOp` bundles, for one operator ``sparsegraph::<name>`` defined with ``torch.library``
(``Library.define`` + ``impl``, not ``torch.library.custom_op``: see *Dispatch cost* below):

- ``reference``: clear and slow, the oracle of every test; its signature (type-annotated) is the op's
  schema;
- ``fake``: shapes only, so the op survives ``torch.export`` and our shape propagation;
- ``cpu``: the fast PyTorch path (optional; the reference runs where there is none);
- ``triton``: ``"module:function"`` of a Triton launcher, imported on first use so that nothing imports
  triton unless a Triton kernel runs (on CUDA, or on CPU under ``TRITON_INTERPRET=1``);
- ``onnx``: an onnxscript translation (a plain function over ``onnxscript.opset18`` ops), handed to
  ``torch.onnx.export`` as its ``custom_translation_table`` entry;
- ``cost``: ``(node) -> (macs, bytes)`` for the cost model, from the node's example shapes (registered
  with `sparsegraph.cost_model`, with the dense form, when the op is defined);
- ``dense``: the same call computed densely with nothing skipped (same arguments, plain torch ops):
  what ``speed_check`` times the op against, and what it puts back where sparsity does not pay;
- ``backward`` and ``setup_context``: the op's autograd formula (``torch.library``'s
  ``register_autograd``), so that a compiled graph trains (`sparsegraph.recover`) and ``torch.compile``
  traces it in grad mode. What the forward decided (which inputs were kept, the N:M positions, the
  attention layout) is fixed: gradients flow through the kept entries only. `by_reference` makes the
  pair for an op whose reference is differentiable torch code: the backward recomputes the reference
  and differentiates it (memory as the reference's: use it where a hand-written formula is not worth it).

Which kernel runs is chosen per call from the tensor's device and the active backend
(`use_backend`): ``reference``; ``eager`` (the CPU path, also used on CUDA); ``triton``; ``auto``
(Triton on CUDA when available, else eager).

Dispatch cost. A compiled graph calls these ops tens of times per forward (EfficientNet-Lite0: 31 sparse
1x1 convs; a decode step: one attention per layer), where a call's kernel may take 20 µs, so the
per-call cost of getting there counts. ``torch.library.custom_op`` wraps each call in safety checks and
Python hops through the dispatcher (PyTorch issues #139500, #177109: about 11 µs against 6 µs for
``Library.define`` + ``impl`` there); measured here for ``sparse_conv1x1`` on a tiny image, under
``no_grad``, with the machine loaded: 124 µs a call through ``custom_op``, 53 µs through define + impl,
16 µs calling the kernel's wrapper directly. The schema is the one ``custom_op`` would infer
(``torch.library.infer_schema`` of the reference's annotations); the fake and the autograd formula are
registered with ``torch.library.register_fake`` / ``register_autograd`` as before.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from collections.abc import Callable, Iterator

import torch

from sparsegraph import cost_model

KERNEL_BACKENDS = ("auto", "eager", "triton", "reference")
_backend: contextvars.ContextVar[str] = contextvars.ContextVar("sparsegraph_backend", default="auto")
_LIBRARY = torch.library.Library("sparsegraph", "FRAGMENT")  # every op of the vocabulary is defined here


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run sparse ops with kernel backend `name` (one of `KERNEL_BACKENDS`) inside the block."""
    if name not in KERNEL_BACKENDS:
        raise ValueError(f"kernel backend {name!r} is not one of {KERNEL_BACKENDS}")
    token = _backend.set(name)
    try:
        yield
    finally:
        _backend.reset(token)


def triton_available() -> bool:
    """Whether Triton kernels can run: triton imports and there is a GPU or the interpreter is on."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _device_of(args: tuple) -> torch.device:
    """The device of an op call: its first tensor argument's, looking one level into tensor lists
    (``roi_scores`` takes ``Tensor[]``)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0].device
    raise TypeError("a sparsegraph op was called without a tensor argument")


class SparseOp:
    def __init__(self, name: str, reference: Callable, *, fake: Callable, cpu: Callable | None = None,
                 triton: str | None = None, onnx: Callable | None = None,
                 cost: Callable[[torch.fx.Node], tuple[int, int]] | None = None,
                 dense: Callable | None = None,
                 onnx_refuses: Callable[[torch.fx.Node], str | None] | None = None,
                 backward: Callable | None = None, setup_context: Callable | None = None):
        self.name = name
        self.onnx_refuses = onnx_refuses  # why one call (its arguments) has no translation, or None
        self.dense = dense
        self.reference = reference
        self.cpu = cpu
        self._triton = triton
        self.onnx = onnx
        self.cost = cost

        def dispatch(*args, **kwargs):
            return self.kernel(_device_of(args))(*args, **kwargs)

        qualname = f"sparsegraph::{name}"
        _LIBRARY.define(name + torch.library.infer_schema(reference, mutates_args=()))
        _LIBRARY.impl(name, dispatch, "CompositeExplicitAutograd")
        torch.library.register_fake(qualname, fake, lib=_LIBRARY)
        if backward is not None:
            torch.library.register_autograd(qualname, backward, setup_context=setup_context, lib=_LIBRARY)
        cost_model.register(self.overload, cost, dense)

    @property
    def overload(self) -> torch._ops.OpOverload:
        """``torch.ops.sparsegraph.<name>.default``: the target graph nodes call."""
        return getattr(torch.ops.sparsegraph, self.name).default

    def __call__(self, *args, **kwargs):
        return self.overload(*args, **kwargs)

    def kernel(self, device: torch.device, backend: str | None = None) -> Callable:
        """The kernel that runs on `device` under `backend` (default: the active one)."""
        backend = backend or _backend.get()
        if backend == "reference":
            return self.reference
        wants_triton = backend == "triton" or (backend == "auto" and device.type == "cuda")
        if wants_triton and self._triton is not None and triton_available():
            return self.triton
        if backend == "triton":
            raise RuntimeError(
                f"sparsegraph::{self.name}: Triton backend asked for but "
                f"{'this op has no Triton kernel' if self._triton is None else 'triton cannot run here'}"
                "; use backend 'eager' or set TRITON_INTERPRET=1 to run Triton on the CPU")
        return self.cpu or self.reference

    @functools.cached_property
    def triton(self) -> Callable:
        module, _, fn = self._triton.partition(":")
        return getattr(importlib.import_module(module), fn)

    @property
    def backends(self) -> list[str]:
        return ["reference", *(["cpu"] if self.cpu else []), *(["triton"] if self._triton else []),
                *(["onnx"] if self.onnx else [])]


def by_reference(reference: Callable, differentiable: tuple[int, ...]) -> tuple[Callable, Callable]:
    """``(setup_context, backward)`` that differentiate `reference` with respect to the positional
    arguments `differentiable` (the others get no gradient): the backward recomputes the reference on the
    saved inputs under ``enable_grad`` and returns ``torch.autograd.grad`` of it, so the gradient is
    exactly the oracle's (decisions the reference makes, such as a layout, are constants to it)."""

    def setup_context(ctx, inputs, output):
        ctx.inputs = inputs

    def backward(ctx, grad):
        args = list(ctx.inputs)
        wanted = [i for i in differentiable if isinstance(args[i], torch.Tensor) and ctx.needs_input_grad[i]]
        if not wanted:
            return (None,) * len(args)
        with torch.enable_grad():
            for i in wanted:
                args[i] = args[i].detach().requires_grad_(True)
            out = reference(*args)
            grads = torch.autograd.grad(out, [args[i] for i in wanted], grad, allow_unused=True)
        found = dict(zip(wanted, grads))
        return tuple(found.get(i) for i in range(len(args)))

    return setup_context, backward
