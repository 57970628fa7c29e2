"""`PassContext`: what a pass may see besides the graph.

The plan it writes to, the example and calibration inputs, the config (for per-site options), whether
this compile replays a saved plan (or reuses a plan's analysis facts), and the instruments. Passes
read options for a site through ``ctx.options(self, site.id, site.module_path)`` and mark the site
they work on with ``with ctx.at(site):`` so that any error names it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from sparsegraph.config import Config
from sparsegraph.pass_contract import Pass
from sparsegraph.plan import SparsityPlan


@dataclass(frozen=True)
class Batch:
    """One model call: ``model(*args, **kwargs)``."""

    args: tuple
    kwargs: dict = field(default_factory=dict)

    @classmethod
    def of(cls, item: Any) -> Batch:
        """A tensor, a tuple/list of positional inputs, a dict of keyword inputs, or a Batch."""
        if isinstance(item, Batch):
            return item
        if isinstance(item, torch.Tensor):
            return cls((item,))
        if isinstance(item, dict):
            return cls((), dict(item))
        if isinstance(item, (tuple, list)):
            return cls(tuple(item))
        raise TypeError(f"a calibration batch is a tensor, a tuple of inputs or a dict, got "
                        f"{type(item).__name__}")


@dataclass
class PassContext:
    plan: SparsityPlan
    config: Config
    example: Batch
    calibration: list[Batch] = field(default_factory=list)
    # the fidelity check's data and baseline (configs with a ``fidelity`` section): calibration batches no
    # analysis saw, and the graph as traced (sharing the model's weights)
    holdout: list[Batch] = field(default_factory=list)
    dense: torch.fx.GraphModule | None = None
    replay: bool = False  # replaying a plan: rewrites take their decisions from it
    reuse: frozenset[str] = frozenset()  # analysis passes whose facts a given plan already holds
    quiet: bool = False
    instruments: list = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    error_site: str | None = None  # the innermost site an exception left, for error messages

    def options(self, p: Pass, site_id: str, module_path: str) -> Pass:
        """`p` with the config's overrides for the site applied (globs match its module path or id)."""
        return self.config.for_site(p, site_id, module_path)

    @contextlib.contextmanager
    def at(self, site_id: str) -> Iterator[None]:
        try:
            yield
        except BaseException:
            self.error_site = self.error_site or site_id
            raise

    def progress(self, items: Iterable, desc: str, total: int | None = None) -> Iterable:
        """`items` with a progress bar on stderr (none when quiet or not a terminal)."""
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, total=total, disable=True if self.quiet else None, leave=False)
