"""Running a traced graph on calibration batches: the checks at the door, and the `Observer`.

`check_calibration` validates every batch against the traced graph before any analysis pass sees it,
so that degenerate data is refused with the batch and the likely mistake named, instead of giving a
plan built on nothing: a batch that does not bind to the model's inputs, non-finite float inputs, and
an ``attention_mask`` input ([batch, tokens]) that is not 0/1 or that masks every token (the easy
mistake of passing ``token_type_ids``, all zeros for one segment, where the mask goes).

`Observer` runs the graph so analysis passes can watch its values: subclasses override ``run_node``
(call ``super().run_node(n)`` and look at the result, or at ``self.env`` for a node's inputs).
`run_batch` feeds one batch the way the graph's placeholders expect it and keeps the model's
``attention_mask`` as ``self.token_mask`` so that statistics can leave padding tokens out.
"""

from __future__ import annotations

import torch
import torch.fx

from sparsegraph import distributed, ir
from sparsegraph.errors import CalibrationError


def token_mask(gm: torch.fx.GraphModule, flat: list) -> tuple[str, torch.Tensor] | None:
    """``(name, mask)`` of the graph's ``attention_mask`` input ([batch, tokens], 1 = real token), if any."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return next(((p.name, x) for p, x in zip(placeholders, flat)
                 if "attention_mask" in p.name and isinstance(x, torch.Tensor) and x.dim() == 2), None)


def check_calibration(gm: torch.fx.GraphModule, batches: list) -> None:
    """Refuse calibration data that would make the analysis passes observe nothing or garbage."""
    if not batches:
        raise CalibrationError("calibration is empty: pass calibration=[batch, ...] with at least one "
                               "batch of real inputs (like example_inputs)")
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    for index, batch in enumerate(batches):
        where = f"calibration batch {index}"
        try:
            flat = ir.flatten_inputs(gm, batch.args, batch.kwargs)
        except Exception as e:
            raise CalibrationError(f"{where} does not fit the model's inputs {placeholders} "
                                   f"({type(e).__name__}: {e}); give every batch as example_inputs are "
                                   "given: a tensor, a tuple of positional inputs or a dict of keyword "
                                   "inputs") from e
        for name, x in zip(placeholders, flat):
            if isinstance(x, torch.Tensor) and x.is_floating_point() and not bool(torch.isfinite(x).all()):
                raise CalibrationError(f"{where}: input {name!r} holds NaN or infinite values; every "
                                       "statistic over it would be NaN. Drop or clean that batch")
        found = token_mask(gm, flat)
        if found is None:
            continue
        name, mask = found
        values = mask.unique()
        if not bool(((values == 0) | (values == 1)).all()):
            raise CalibrationError(f"{where}: input {name!r} is not a 0/1 attention mask (values "
                                   f"{values[:6].tolist()}…); did the token ids or token_type_ids go where "
                                   "the attention mask goes?")
        if not bool(mask.any()):
            raise CalibrationError(f"{where}: input {name!r} masks every token (all zeros), so nothing would "
                                   "be observed; did token_type_ids (all zeros for one segment) go where "
                                   "the attention mask goes? The mask is 1 for real tokens")


class Observer(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm)
        self.token_mask: torch.Tensor | None = None

    def run_batch(self, args: tuple, kwargs: dict) -> None:
        flat = ir.flatten_inputs(self.module, args, kwargs)
        found = token_mask(self.module, flat)
        self.token_mask = found[1].bool() if found is not None else None
        with torch.no_grad():
            self.run(*flat)


class ChannelSums(Observer):
    """Adds, per watched node, Σ x and Σ x² per channel and the count of the rows summed into
    ``sums[key]`` (fp64): `watched` maps a node to ``(channel axis, [keys])``. With a ``token_mask`` of the
    node's leading [batch, tokens] shape, padding tokens are left out (the statistics of a linear's input are
    those of the real tokens)."""

    def __init__(self, gm: torch.fx.GraphModule, watched: dict, sums: dict):
        super().__init__(gm)
        self.watched, self.sums = watched, sums

    @classmethod
    def over_calibration(cls, gm: torch.fx.GraphModule, watched: dict, ctx, what: str) -> dict:
        """``{key: (Σ x, Σ x², rows)}`` over `ctx`'s calibration batches, sharded over processes as every
        profile is (`sparsegraph.distributed`: this process's share, then the sums of all added)."""
        sums: dict = {}
        observer = cls(gm, watched, sums)
        rank, world = distributed.rank_and_world()
        for _, batch in ctx.progress(list(enumerate(ctx.calibration))[rank::world], what):
            observer.run_batch(batch.args, batch.kwargs)
        if world > 1:
            sums = distributed.merge(sums, lambda parts: tuple(sum(p[i] for p in parts) for i in range(3)))
        return sums

    def run_node(self, n):
        result = super().run_node(n)
        if n in self.watched:
            axis, keys = self.watched[n]
            x = result.detach().double().movedim(axis, -1)
            mask = self.token_mask
            if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask]
            x = x.reshape(-1, x.shape[-1])
            total, square = x.sum(0), x.square().sum(0)
            for key in keys:
                before = self.sums.get(key, (0.0, 0.0, 0))
                self.sums[key] = (before[0] + total, before[1] + square, before[2] + x.shape[0])
        return result
