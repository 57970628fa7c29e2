"""The one contract every pass follows, built-in or plugin.

A pass is a frozen dataclass: its fields are its options (typed, documented with `option`, validated on
construction), its class attributes say what it is (``name``, ``requires``). ``run(gm, ctx)`` returns a
`PassResult`, whose `PassStats` count what the pass matched, what it rewrote, and every site it refused
with the reason. Nothing fails silently.

Two kinds:

- `AnalysisPass` reads the graph and calibration data and writes facts into the plan. It never changes
  the graph (the manager checks: the graph's code must be the same before and after).
- `RewritePass` changes the graph only as the plan says. Its work is split in two: ``decide`` looks at
  the graph (and at analysis facts in the plan) and writes one decision per site into the plan;
  ``apply`` reads those decisions and rewrites. Compiling from a saved plan skips ``decide``, so the same
  rewrites are reproduced without calibration.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch.fx

from sparsegraph.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    from sparsegraph.context import PassContext


def option(default: Any, doc: str, *, range: tuple[float | None, float | None] | None = None,
           choices: tuple | None = None) -> Any:
    """A pass option: a dataclass field with its documentation and the values it accepts.

    ``range=(lo, hi)`` bounds a number, or each number of a tuple (inclusive; None for unbounded);
    ``choices`` lists allowed values. Numbers must be finite whatever the range: NaN passes every
    comparison, so an unchecked NaN option would silently disable what it controls.
    """
    metadata = {"doc": doc, "range": range, "choices": choices}
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable option defaults are not allowed; use a tuple")
    return field(default=default, metadata=metadata)


@dataclass
class Refusal:
    """A site a pass looked at and left alone, and why."""

    site: str
    reason: str


@dataclass
class PassStats:
    """What a pass matched, rewrote and refused (with reasons), plus pass-specific counters."""

    matched: int = 0
    rewritten: int = 0
    refused: list[Refusal] = field(default_factory=list)
    counters: dict[str, Any] = field(default_factory=dict)

    def refuse(self, site: str, reason: str) -> None:
        self.refused.append(Refusal(site, reason))

    def to_json(self) -> dict:
        return {"matched": self.matched, "rewritten": self.rewritten,
                "refused": [dataclasses.asdict(r) for r in self.refused], "counters": dict(self.counters)}

    @classmethod
    def from_json(cls, data: dict) -> PassStats:
        return cls(data["matched"], data["rewritten"], [Refusal(**r) for r in data["refused"]],
                   dict(data.get("counters", {})))


@dataclass
class PassResult:
    gm: torch.fx.GraphModule
    modified: bool
    stats: PassStats


@dataclass(frozen=True)
class SiteDecision:
    """A rewrite pass's decision for one site, and the evidence it was made on (both JSON values)."""

    decision: dict
    evidence: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Pass:
    """Base of all passes. Subclasses are ``@register_pass("name")`` + ``@dataclass(frozen=True)``."""

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            _check_option(self.name or type(self).__name__, f, hints.get(f.name), getattr(self, f.name))

    @classmethod
    def from_options(cls, options: dict | None) -> Pass:
        """Build the pass from a config mapping; unknown keys get a did-you-mean."""
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        for key in options:
            if not isinstance(key, str):
                raise ConfigError(f"pass {cls.name!r}: {key!r} is not an option name (a string)")
            if key not in known:
                raise ConfigError(f"pass {cls.name!r} has no option {key!r}{did_you_mean(key, known)}")
        return cls(**options)

    def options(self) -> dict:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError


class AnalysisPass(Pass):
    """Reads the graph and calibration data, writes facts into ``ctx.plan``; never changes the graph.

    Subclasses implement ``analyze(gm, ctx, stats)``. Set ``needs_calibration = True`` when the facts
    come from calibration data: compiling from a saved plan then reuses the facts instead of rerunning.
    """

    needs_calibration: ClassVar[bool] = False

    def run(self, gm, ctx):
        stats = PassStats()
        if self.needs_calibration and (ctx.replay or self.name in ctx.reuse):
            stats = ctx.plan.stats_of(self.name) or stats
            stats.counters["replayed"] = True
        else:
            self.analyze(gm, ctx, stats)
        return PassResult(gm, False, stats)

    def analyze(self, gm: torch.fx.GraphModule, ctx: PassContext, stats: PassStats) -> None:
        raise NotImplementedError


class RewritePass(Pass):
    """Decides per site (into the plan), then rewrites exactly as the plan says.

    Subclasses implement ``decide(gm, ctx, stats) -> {site: SiteDecision}`` (counting matches and
    refusals in `stats`) and ``apply(gm, ctx, decisions, stats)`` (counting rewrites).
    """

    def run(self, gm, ctx):
        if ctx.replay:
            decisions, stats = ctx.plan.decisions(self.name)
        else:
            stats = PassStats()
            decisions = self.decide(gm, ctx, stats)
            ctx.plan.record_decisions(self.name, decisions, stats)
        stats = dataclasses.replace(stats, rewritten=0, refused=list(stats.refused))
        if decisions:
            self.apply(gm, ctx, decisions, stats)
            gm.graph.eliminate_dead_code()
            gm.recompile()
        return PassResult(gm, stats.rewritten > 0, stats)

    def decide(self, gm: torch.fx.GraphModule, ctx: PassContext, stats: PassStats) -> dict[str, SiteDecision]:
        raise NotImplementedError

    def apply(self, gm: torch.fx.GraphModule, ctx: PassContext, decisions: dict[str, SiteDecision],
              stats: PassStats) -> None:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------------


def _check_option(owner: str, f: dataclasses.Field, hint, value) -> None:
    where = f"option {f.name!r} of pass {owner!r}"
    if hint is not None and not _type_ok(value, hint):
        raise ConfigError(f"{where} must be {_type_name(hint)}, got {value!r}")
    lo, hi = f.metadata.get("range") or (None, None)
    for number in (value if isinstance(value, tuple) else (value,)):
        if not isinstance(number, (int, float)) or isinstance(number, bool):
            continue
        if not math.isfinite(number):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        if (lo is not None and number < lo) or (hi is not None and number > hi):
            bounds = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
            held = f"holds {number!r}" if isinstance(value, tuple) else f"is {value!r}"
            raise ConfigError(f"{where} {held}, outside {bounds}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{where} is {value!r}{did_you_mean(str(value), map(str, choices))}")


def _type_ok(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if hint is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_type_ok(v, args[0]) for v in value)
        return len(args) == len(value) and all(_type_ok(v, a) for v, a in zip(value, args))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin is not None:
        return isinstance(value, origin)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _jsonable(value):
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value
