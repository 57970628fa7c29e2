"""`Fidelity`: how close to dense a compiled model must stay, as the config's ``fidelity`` section says.

::

    fidelity: {metric: cosine, min: 0.99, holdout: 0.25}

The metric compares the compiled model's output with the dense model's on calibration batches the
analysis passes never saw (the last ``holdout`` share of them, `split`), one value per row, averaged over
every row of every held-out batch:

- ``cosine``: cos(dense, sparse) of each row (all leading dimensions flattened: one per token of a
  token-level output, one per sample of a pooled one); floor ``min`` (1 is exact);
- ``top1``: 1 where the last dimension's argmax agrees (class, next token), else 0; floor ``min``;
- ``kl``: KL(softmax(dense) ‖ softmax(sparse)) over the last dimension, in nats; ceiling ``max``
  (0 is exact);
- a callable ``f(dense, sparse) -> float`` on each held-out batch's outputs, or ``"pkg.module:function"``
  naming one (imported when first scored, so a plan that records it replays without it), higher is
  better; floor ``min``.

The output compared is the model's first floating-point tensor (an encoder's embeddings, a
classifier's or LM's logits). A row count or width that differs from dense (a token-level output
after token pruning) is refused with the fix: compare a pooled output, or pick the output position.

`loss` turns a score into distance from exact (1 − score for floors, the score itself for ``kl``), the
unit the budget trades against speed.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

from sparsegraph.errors import CalibrationError, ConfigError, did_you_mean

METRICS = ("cosine", "top1", "kl")
_KEYS = ("metric", "min", "max", "holdout")


@dataclass(frozen=True)
class Fidelity:
    metric: str | Callable = "cosine"
    min: float | None = None
    max: float | None = None
    holdout: float = 0.25

    def __post_init__(self):
        if not (callable(self.metric) or self.metric in METRICS
                or (isinstance(self.metric, str) and ":" in self.metric)):
            raise ConfigError(f"fidelity metric {self.metric!r} is not one of "
                              f"{METRICS}{did_you_mean(self.metric, METRICS)}, a callable "
                              "f(dense, sparse) -> float, or 'pkg.module:function' naming one")
        for key in ("min", "max", "holdout"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                      or value != value or abs(value) == float("inf")):
                raise ConfigError(f"fidelity {key!r} must be a finite number, got {value!r}")
        bound, wrong = ("max", "min") if self.metric == "kl" else ("min", "max")
        if getattr(self, wrong) is not None:
            raise ConfigError(f"fidelity metric {self.name!r} is bounded by {bound!r}, not {wrong!r} "
                              f"({'lower' if bound == 'max' else 'higher'} is closer to dense): write "
                              f"fidelity: {{metric: {self.name}, {bound}: …}}")
        if getattr(self, bound) is None:
            example = "0.05" if bound == "max" else "0.99"
            raise ConfigError(f"fidelity metric {self.name!r} needs its bound {bound!r}, e.g. "
                              f"fidelity: {{metric: {self.name}, {bound}: {example}}}")
        if not 0 < self.holdout < 1:
            raise ConfigError(f"fidelity holdout {self.holdout!r} is the share of calibration batches held "
                              "out for the check: a number strictly between 0 and 1, e.g. 0.25")

    @classmethod
    def from_dict(cls, data: Any) -> Fidelity:
        if isinstance(data, Fidelity):
            return data
        if not isinstance(data, dict):
            raise ConfigError(f"config 'fidelity' is a mapping such as {{metric: cosine, min: 0.99}}, got "
                              f"{data!r}")
        for key in data:
            if key not in _KEYS:
                raise ConfigError(f"config 'fidelity' has no key {key!r}{did_you_mean(key, _KEYS)}")
        return cls(**data)

    def to_dict(self) -> dict:
        return {"metric": self.name, "min": self.min, "max": self.max, "holdout": self.holdout}

    @property
    def name(self) -> str:
        """The metric as the config writes it (a callable as ``module:qualname``)."""
        if isinstance(self.metric, str):
            return self.metric
        return f"{self.metric.__module__}:{self.metric.__qualname__}"

    @property
    def bound(self) -> float:
        return self.max if self.metric == "kl" else self.min

    def meets(self, score: float) -> bool:
        return score <= self.max if self.metric == "kl" else score >= self.min

    def loss(self, score: float) -> float:
        """Distance from exact: what one site's rewrite costs, in the metric's unit."""
        return score if self.metric == "kl" else 1.0 - score

    def describe(self, score: float) -> str:
        return f"{self.name} {score:.4f} ({'≤' if self.metric == 'kl' else '≥'} {self.bound:g} needed)"

    # -- data -----------------------------------------------------------------------------------------------

    def split(self, batches: list) -> tuple[list, list]:
        """(profiled, held out): the last ``holdout`` share of `batches` (at least one) is held out."""
        if len(batches) < 2:
            raise CalibrationError(f"fidelity holds out {self.holdout:g} of the calibration batches to check "
                                   f"the compiled model on data the analyses never saw, so it needs at least "
                                   f"2 batches; got {len(batches)}. Split the calibration data into more "
                                   "batches")
        held = min(len(batches) - 1, max(1, round(self.holdout * len(batches))))
        return batches[:-held], batches[-held:]

    def score(self, dense: list, outputs: list) -> float:
        """The metric over held-out batches: `dense` and `outputs` are the two models' outputs per batch."""
        if self.metric not in METRICS:
            fn = _imported(self.metric) if isinstance(self.metric, str) else self.metric
            values = [float(fn(d, o)) for d, o in zip(dense, outputs)]
            return sum(values) / len(values)
        rows = [_rows(self.metric, output_tensor(d), output_tensor(o)) for d, o in zip(dense, outputs)]
        return torch.cat(rows).mean().item()


def _imported(reference: str) -> Callable:
    module, _, name = reference.partition(":")
    try:
        found = importlib.import_module(module)
        for part in name.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"fidelity metric {reference!r} cannot be imported ({e}): name a module-level "
                          "function as 'pkg.module:function', or pass the callable itself") from e
    return found


def output_tensor(output) -> torch.Tensor:
    """The first floating-point tensor of a model's output (tensor, tuple, dict or ModelOutput)."""
    for leaf in pytree.tree_leaves(output):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf
    raise ConfigError("the model's output holds no floating-point tensor for the fidelity metric to compare; "
                      "use a callable metric f(dense, sparse) -> float")


def _rows(metric: str, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
    if dense.shape != sparse.shape:
        raise ConfigError(f"the compiled model's output has shape {tuple(sparse.shape)}, dense "
                          f"{tuple(dense.shape)}: the {metric} metric compares them row by row. A rewrite "
                          "changed the output's length (token pruning on a token-level output): compare a "
                          "pooled output, or pass a callable metric")
    a, b = dense.detach().double().flatten(0, -2), sparse.detach().double().flatten(0, -2)
    if metric == "cosine":
        return torch.nn.functional.cosine_similarity(a, b, dim=-1)
    if metric == "top1":
        return (a.argmax(-1) == b.argmax(-1)).double()
    log_p, log_q = a.log_softmax(-1), b.log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)
