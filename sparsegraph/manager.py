"""`PassManager`: runs a pipeline of passes over a GraphModule and checks the graph after each one.

Before running, every pass's ``requires`` must be met by an earlier pass of the pipeline. After each
pass the graph is verified: FX lint, our meta keys well-formed, shapes re-propagated at the example
inputs when the pass changed the graph's code (which also checks that every new op has a fake
implementation), and, for analysis passes, that the graph's code did not change. Any failure is
re-raised as `PassError` naming the pass and the site, except a `CalibrationError` or `PlanError` (the
data's or the plan's fault), which keeps its class and gains the pass's name (a `PlanEntryError` names
it already).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx

from sparsegraph import ir, meta
from sparsegraph.context import PassContext
from sparsegraph.errors import (
    CalibrationError,
    ConfigError,
    PassError,
    PlanEntryError,
    PlanError,
    SparsegraphError,
)
from sparsegraph.instruments import Instrument
from sparsegraph.pass_contract import AnalysisPass, Pass, PassResult


class PassManager:
    """Runs `passes` in order. ``verify=False`` skips the per-pass graph checks: only for replaying a plan
    that these passes already applied, verified, to the same graph (the budget's trial builds)."""

    def __init__(self, passes: Sequence[Pass], instruments: Sequence[Instrument] = (), *,
                 verify: bool = True):
        self.passes = list(passes)
        self.instruments = list(instruments)
        self.verify = verify
        check_requires(self.passes)

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
        for p in self.passes:
            for inst in self.instruments:
                inst.before_pass(p, gm, ctx)
            result = self._run_one(p, gm, ctx)
            gm = result.gm
            kind = "analysis" if isinstance(p, AnalysisPass) else "rewrite"
            ctx.plan.record_pass(p.name, kind, p.options(), result.stats)
            for inst in self.instruments:
                inst.after_pass(p, result, ctx)
        return gm

    def _run_one(self, p: Pass, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        code_before = gm.code
        ctx.error_site = None
        try:
            # passes compute on weights; nothing they make should carry autograd history
            with torch.no_grad():
                result = p.run(gm, ctx)
        except (PassError, PlanEntryError):  # they name the pass already
            raise
        except (CalibrationError, PlanError) as e:  # the data's or the plan's fault: its class, and the pass
            raise type(e)(f"{p.name}: {e}") from e
        except SparsegraphError as e:
            raise PassError(p.name, str(e), ctx.error_site) from e
        except Exception as e:
            raise PassError(p.name, f"{type(e).__name__}: {e}", ctx.error_site) from e
        if not isinstance(result, PassResult):
            raise PassError(p.name, f"run() returned {type(result).__name__}, expected PassResult")
        if isinstance(p, AnalysisPass) and result.gm.code != code_before:
            raise PassError(p.name, "an analysis pass changed the graph; only rewrite passes may")
        if self.verify:
            verify(result.gm, ctx, p.name, changed=result.gm.code != code_before)
        return result


def check_requires(passes: Sequence[Pass]) -> None:
    seen: set[str] = set()
    for p in passes:
        for need in p.requires:
            if need not in seen:
                raise ConfigError(f"pass {p.name!r} requires {need!r} earlier in the pipeline; "
                                  f"add `- {need}: {{}}` before it")
        seen.add(p.name)


def verify(gm: torch.fx.GraphModule, ctx: PassContext, pass_name: str, changed: bool = True) -> None:
    """Lint, meta check and, when the pass `changed` the graph's code, shape propagation (code that did
    not change has the shapes it had: propagating again costs a fake run of the model per pass, half of
    a small model's compile time); raises `PassError` naming the pass and the node's site."""
    try:
        gm.graph.lint()
    except Exception as e:
        raise PassError(pass_name, f"left a malformed graph: {e}") from e
    problems = meta.check(gm)
    if problems:
        raise PassError(pass_name, "left malformed meta: " + "; ".join(problems[:3]))
    if not changed:
        return
    try:
        ir.propagate_shapes(gm, ctx.example.args, ctx.example.kwargs)
    except ir.NodeError as e:
        info = meta.get(e.node)
        raise PassError(pass_name, f"the graph no longer runs at the example shapes: {e}",
                        info.site if info else None) from e
