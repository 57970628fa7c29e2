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
- ``perplexity`` (causal LMs): the compiled model's perplexity on the held-out text over dense's,
  exp(mean CE_sparse − mean CE_dense) of the next-token cross-entropy of the batch's ``input_ids``
  (positions the ``attention_mask`` masks are left out); ceiling ``max`` (1 is exact: 1.05 allows a 5%
  higher perplexity);
- a callable ``f(dense, sparse) -> float`` on each held-out batch's outputs, or ``"pkg.module:function"``
  naming one (imported when first scored, so a plan that records it replays without it), higher is
  better; floor ``min``.

The output compared is the model's first floating-point tensor (an encoder's embeddings, a
classifier's or LM's logits). A row count or width that differs from dense (a token-level output
after token pruning) is refused with the fix: compare a pooled output, or pick the output position.

`loss` turns a score into distance from exact (1 − score for floors, the score itself for ``kl``,
score − 1 for ``perplexity``), the unit the budget trades against speed.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

from sparsegraph.errors import CalibrationError, ConfigError, did_you_mean

METRICS = ("cosine", "top1", "kl", "perplexity")
_CEILINGS = ("kl", "perplexity")  # lower is closer to dense
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
        bound, wrong = ("max", "min") if self.metric in _CEILINGS else ("min", "max")
        if getattr(self, wrong) is not None:
            raise ConfigError(f"fidelity metric {self.name!r} is bounded by {bound!r}, not {wrong!r} "
                              f"({'lower' if bound == 'max' else 'higher'} is closer to dense): write "
                              f"fidelity: {{metric: {self.name}, {bound}: …}}")
        if getattr(self, bound) is None:
            example = {"kl": "0.05", "perplexity": "1.05"}.get(self.metric, "0.99")
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
        return self.max if self.metric in _CEILINGS else self.min

    @property
    def exact(self) -> float:
        """The score of the dense model itself."""
        return {"kl": 0.0, "perplexity": 1.0}.get(self.metric, 1.0)

    def meets(self, score: float) -> bool:
        return score <= self.max if self.metric in _CEILINGS else score >= self.min

    def loss(self, score: float) -> float:
        """Distance from exact: what one site's rewrite costs, in the metric's unit."""
        return {"kl": score, "perplexity": score - 1.0}.get(self.metric, 1.0 - score)

    def describe(self, score: float) -> str:
        return f"{self.name} {score:.4f} ({'≤' if self.metric in _CEILINGS else '≥'} {self.bound:g} needed)"

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

    def score(self, dense: list, outputs: list, batches: list | None = None) -> float:
        """The metric over held-out `batches` (`Batch` each): `dense` and `outputs` are the two models'
        outputs per batch."""
        if self.metric == "perplexity":
            if batches is None:
                raise ValueError("the perplexity metric reads the batches' input_ids: pass batches")
            ce_dense = [_cross_entropy(output_tensor(o), b) for o, b in zip(dense, batches)]
            ce_sparse = [_cross_entropy(output_tensor(o), b) for o, b in zip(outputs, batches)]
            return math.exp((sum(ce_sparse) - sum(ce_dense)) / len(batches))
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


def _cross_entropy(logits: torch.Tensor, batch) -> float:
    """Mean next-token cross-entropy of `logits` [B, L, V] against the batch's ``input_ids`` (its first
    integer tensor of shape [B, L]), over the positions its ``attention_mask`` keeps."""
    tensors = [*batch.args, *batch.kwargs.values()]
    ids = batch.kwargs.get("input_ids")
    if ids is None:
        ids = next((t for t in tensors if isinstance(t, torch.Tensor) and not t.is_floating_point()
                    and tuple(t.shape) == tuple(logits.shape[:2])), None)
    if logits.dim() != 3 or ids is None:
        raise ConfigError(f"the perplexity metric needs next-token logits [batch, length, vocabulary] and "
                          f"the batch's input_ids; the output is {tuple(logits.shape)} and the batch holds "
                          f"{'no' if ids is None else 'its'} token ids. Use it on a causal LM")
    mask = batch.kwargs.get("attention_mask")
    keep = torch.ones_like(ids[:, 1:], dtype=torch.bool) if mask is None else mask[:, 1:].bool()
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].double().flatten(0, 1), ids[:, 1:].flatten(),
                                           reduction="none")
    return ce[keep.flatten()].mean().item()


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
