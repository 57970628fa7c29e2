"""The one contract every pass follows, built-in or plugin.

A pass is a frozen dataclass: its fields are its options (typed, documented with `option`, validated on
construction), its class attributes say what it is (``name``, ``requires``; a pass whose needs depend on
its options makes ``requires`` a property, as ``nm_weights`` does: the manager reads it from the pass
built from the config). ``run(gm, ctx)`` returns a
`PassResult`, whose `PassStats` count what the pass matched, what it rewrote, and every site it refused
with the reason. Nothing fails silently.

Two kinds:

- `AnalysisPass` reads the graph and calibration data and writes facts into the plan. It never changes
  the graph (the manager checks: the graph's code must be the same before and after).
- `RewritePass` changes the graph only as the plan says. Its work is split in two: ``decide`` looks at
  the graph (and at analysis facts in the plan) and writes one decision per site into the plan;
  ``apply`` reads those decisions and rewrites. Compiling from a saved plan skips ``decide``, so the same
  rewrites are reproduced without calibration.

**What a plan supplies is checked before it is used.** A plan is a file people read and edit, so a
decision or a fact taken from one is checked against the graph it is about to change: a rewrite pass's
``check_decision`` runs on every decision taken from a plan (and on decisions made from a plan's facts),
an analysis pass's ``check_evidence`` / ``check_summary`` on the facts a plan supplies instead of
calibration. They raise `PlanEntryError` naming the pass, the site, the key, the problem and the fix;
`Entry` gives them typed reads that do so (``entry["keep"].indices(512)``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

import torch.fx

from sparsegraph.errors import ConfigError, PlanEntryError, PlanError, did_you_mean
from sparsegraph.sections import Section

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


class Refused(Exception):
    """Raised while a pass works on one site: the site is left as it is, with the message as the reason
    in the pass's stats (`refusals`). Helpers raise it instead of returning a reason to check for."""


@contextlib.contextmanager
def refusals(stats: PassStats, site: str) -> Iterator[None]:
    """Count `site` as matched; a `Refused` raised inside records the site as refused with its reason
    (the rest of the block is skipped, as a ``continue`` would)."""
    stats.matched += 1
    try:
        yield
    except Refused as refused:
        stats.refuse(site, str(refused))


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
    # Whether the pass applies, replayed from the plan, to the graphs that decode a few tokens against a
    # KV cache (`sparsegraph.generation`): true for analyses (they never change a graph) and for
    # rewrites that act per token (weights, activations); false for rewrites over a whole sequence
    # (token selection, attention layouts), whose sites then run dense in generation. A rewrite pass
    # says True only when its decisions are right for one token at a time.
    decode: ClassVar[bool] = False

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

    @classmethod
    def default_options(cls) -> dict:
        """Every option that has a default, at it, as `options` writes them (a required option of a
        plugin pass has none and is left out)."""
        defaults = {}
        for f in dataclasses.fields(cls):
            if f.default_factory is not dataclasses.MISSING:
                defaults[f.name] = _jsonable(f.default_factory())
            elif f.default is not dataclasses.MISSING:
                defaults[f.name] = _jsonable(f.default)
        return defaults

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    @classmethod
    def report_section(cls, plan, model=None) -> Section | None:
        """What this pass adds to a report, drawn from what it wrote into `plan` (tables, figures,
        images); `model` is the `CompiledModel` when the report is of one, None for a saved plan's
        report. The default adds nothing: the report lists every pass's counts and decisions anyway."""
        return None


def steps_towards(value: float, dense: float, shares: tuple[float, ...] = (0.75, 0.5, 0.25)) -> list[float]:
    """Milder settings of a level option at `value` whose setting `dense` leaves a site unchanged: the
    `shares` of the way from `dense` to `value`, strongest first, rounded to 3 decimals (plans stay
    readable), repeats and `value` itself left out."""
    out: list[float] = []
    for share in shares:
        step = round(dense + share * (value - dense), 3)
        if step not in out and step != value and step != dense:
            out.append(step)
    return out


class AnalysisPass(Pass):
    """Reads the graph and calibration data, writes facts into ``ctx.plan``; never changes the graph.

    Subclasses implement ``analyze(gm, ctx, stats)``. Set ``needs_calibration = True`` when the facts
    come from calibration data: compiling from a saved plan then reuses the facts instead of rerunning.
    """

    needs_calibration: ClassVar[bool] = False
    decode: ClassVar[bool] = True

    def run(self, gm, ctx):
        stats = PassStats()
        if self.needs_calibration and (ctx.replay or self.name in ctx.reuse):
            self.check_facts(gm, ctx.plan)
            stats = ctx.plan.stats_of(self.name) or stats
            stats.counters["replayed"] = True
        else:
            self.analyze(gm, ctx, stats)
        return PassResult(gm, False, stats)

    def analyze(self, gm: torch.fx.GraphModule, ctx: PassContext, stats: PassStats) -> None:
        raise NotImplementedError

    def check_facts(self, gm: torch.fx.GraphModule, plan) -> None:
        """Check the facts of this pass that `plan` supplies instead of calibration, against `gm`: every
        site's evidence (`check_evidence`) and the summary (`check_summary`)."""
        fix = (f"restore the facts {self.name!r} wrote, or profile again (compile with a config and "
               "calibration data)")
        for site, per_pass in plan.sites.items():
            if "evidence" in per_pass.get(self.name, {}):
                self.check_evidence(site, Entry.in_plan(plan.sites, (site, self.name, "evidence"), fix,
                                                        self.name, site), gm)
        if "summary" in plan.passes.get(self.name, {}):
            self.check_summary(Entry.in_plan(plan.passes, (self.name, "summary"), fix, self.name, None,
                                             root="passes"), gm)

    def check_evidence(self, site: str, evidence: Entry, gm: torch.fx.GraphModule) -> None:
        """Raise `PlanEntryError` (``evidence.fail``) if the evidence a plan holds for `site` cannot stand
        for a calibration of `gm`: a site the graph lacks, a missing key, a wrong type, length or range.
        Passes whose facts later passes read override this; the default accepts any evidence."""

    def check_summary(self, summary: Entry, gm: torch.fx.GraphModule) -> None:
        """Like `check_evidence`, for the model-level summary."""


class RewritePass(Pass):
    """Decides per site (into the plan), then rewrites exactly as the plan says.

    Subclasses implement ``apply(gm, ctx, decisions, stats)`` (counting rewrites) and either
    ``sites(gm)`` + ``decide_site(site, opts, ctx)`` (the common case: one decision per site, the site
    loop, the per-site options and the counting are the contract's) or all of ``decide(gm, ctx, stats)
    -> {site: SiteDecision}`` (passes whose sites depend on each other).
    """

    def sites(self, gm: torch.fx.GraphModule) -> list:
        """The sites this pass looks at (`ir` sites: each has an ``id`` and a ``module_path``)."""
        raise NotImplementedError

    def decide_site(self, site, opts: Pass, ctx: PassContext) -> SiteDecision | None:
        """The decision for one site with the options that apply there (config overrides included); raise
        `Refused` to leave it alone with a reason; None: not a site of this pass (not counted)."""
        raise NotImplementedError

    def milder(self, site, opts: Pass, ctx: PassContext) -> list[Pass]:
        """`opts` (this pass's options at `site`) at milder levels, strongest first: what the ``budget`` pass
        backs off through, calling ``decide_site`` with each, before it reverts a site whose rewrite costs
        more fidelity than the config allows. The default offers none (all or nothing)."""
        return []

    def decide(self, gm: torch.fx.GraphModule, ctx: PassContext, stats: PassStats) -> dict[str, SiteDecision]:
        decisions = {}
        for site in self.sites(gm):
            opts = ctx.options(self, site.id, site.module_path)
            with ctx.at(site.id):  # an error (not a refusal) names the site
                try:
                    decision = self.decide_site(site, opts, ctx)
                except Refused as refused:
                    decision = refused
            if decision is not None:
                stats.matched += 1
                if isinstance(decision, Refused):
                    stats.refuse(site.id, str(decision))
                else:
                    decisions[site.id] = decision
        return decisions

    def run(self, gm, ctx):
        if ctx.replay:
            decisions, stats = ctx.plan.decisions(self.name)
            self.check_decisions(gm, decisions, "")
        else:
            stats = PassStats()
            decisions = self.decide(gm, ctx, stats)
            if ctx.reuse:  # decided from facts a plan supplied: check them as strictly as a replayed plan
                self.check_decisions(gm, decisions, f" (decided from the {sorted(ctx.reuse)} facts of the "
                                                    "plan given with the config)")
            ctx.plan.record_decisions(self.name, decisions, stats)
        stats = dataclasses.replace(stats, rewritten=0, refused=list(stats.refused))
        if decisions:
            self.apply(gm, ctx, decisions, stats)
            gm.graph.eliminate_dead_code()
            gm.recompile()
        return PassResult(gm, stats.rewritten > 0, stats)


    def apply(self, gm: torch.fx.GraphModule, ctx: PassContext, decisions: dict[str, SiteDecision],
              stats: PassStats) -> None:
        raise NotImplementedError

    def check_decisions(self, gm: torch.fx.GraphModule, decisions: dict[str, SiteDecision],
                        note: str) -> None:
        """`check_decision` on every decision, each read through an `Entry` at its place in the plan."""
        fix = (f"restore the decision {self.name!r} wrote, or make a new plan (compile with a config and "
               "calibration data)")
        for site, d in decisions.items():
            tree = {site: {self.name: {"decision": d.decision, "evidence": d.evidence}}}
            entry = Entry.in_plan(tree, (site, self.name), fix, self.name, site, note=note)
            self.check_decision(site, entry, gm)

    def check_decision(self, site: str, entry: Entry, gm: torch.fx.GraphModule) -> None:
        """Raise `PlanEntryError` (``entry.fail``) if the decision for `site` cannot be applied to `gm` as
        recorded: a site the graph lacks, a missing or unknown key, a wrong type, length or range, anything
        that would fail deep in a kernel or silently compute something else. ``entry["decision"]`` and
        ``entry["evidence"]`` are the two halves of the `SiteDecision`. The default accepts any decision."""


# ---------------------------------------------------------------------------------------------------------
# Reading plan entries


@dataclass(frozen=True)
class Entry:
    """A value read from a plan, with its place there, so that every check names the key it refuses.

    ``entry["keep"]`` is the entry one key down (a missing key or a non-mapping fails); the typed reads
    (`mapping`, `integer`, `number`, `flag`, `text`, `elements`, `numbers`, `indices`) return the value
    or call `fail`, which raises `PlanError` (`PlanEntryError` when the entry belongs to a pass) as
    ``plan entry sites['mlp:0']['neuron_pruning']['decision']['keep'][3]: <problem>. Fix: <fix>``.
    Only JSON values reach here (`SparsityPlan.check` refused the rest), so the checks are about types
    as JSON has them: a bool is not an integer, an integer is a number.
    """

    value: Any
    keys: tuple = ()
    fix: str = "restore the entry sparsegraph wrote, or make a new plan (compile with a config)"
    pass_name: str | None = None
    site: str | None = None
    root: str = "sites"
    note: str = ""

    @classmethod
    def in_plan(cls, tree, keys: Iterable, fix: str, pass_name: str | None = None, site: str | None = None, *,
                root: str = "sites", note: str = "") -> Entry:
        """The entry at `keys` below `tree` (the plan's ``root`` mapping), which the caller knows is there."""
        keys, value = tuple(keys), tree
        for key in keys:
            value = value[key]
        return cls(value, keys, fix, pass_name, site, root, note)

    @property
    def where(self) -> str:
        return self.root + "".join(f"[{k!r}]" for k in self.keys)

    def fail(self, problem: str) -> NoReturn:
        message = f"plan entry {self.where}{self.note}: {problem}. Fix: {self.fix}"
        if self.pass_name is None:
            raise PlanError(message)
        raise PlanEntryError(self.pass_name, self.site, message)

    def child(self, key) -> Entry:
        return dataclasses.replace(self, value=self.value[key], keys=(*self.keys, key))

    def __getitem__(self, key: str) -> Entry:
        if key not in self.mapping(extra=True):
            self.fail(f"has no key {key!r}")
        return self.child(key)

    def get(self, key: str) -> Entry | None:
        return self.child(key) if key in self.mapping(extra=True) else None

    def __contains__(self, key: str) -> bool:
        return isinstance(self.value, dict) and key in self.value

    # -- shapes ----------------------------------------------------------------------------------------------

    def mapping(self, required: Iterable[str] = (), optional: Iterable[str] = (), *,
                extra: bool = False) -> dict:
        """The value as a mapping with every `required` key and, unless `extra`, no key outside `required`
        and `optional` (an unknown key is a typo or an edit that would be ignored)."""
        if not isinstance(self.value, dict):
            self._wrong("a mapping")
        required, optional = tuple(required), tuple(optional)
        missing = [k for k in required if k not in self.value]
        if missing:
            self.fail(f"misses key{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
                      f"(it needs {', '.join(map(repr, required))})")
        if not extra:
            known = (*required, *optional)
            for key in self.value:
                if key not in known:
                    self.fail(f"has unknown key {key!r}{did_you_mean(key, known)}")
        return self.value

    def items(self) -> list[tuple[str, Entry]]:
        return [(key, self.child(key)) for key in self.mapping(extra=True)]

    def elements(self, length: int | None = None, *, min_length: int = 0, what: str = "") -> list[Entry]:
        """The value as a list of entries; `length` (exact) or `min_length` items, `what` says why."""
        if not isinstance(self.value, list):
            self._wrong("a list")
        n = len(self.value)
        why = f" ({what})" if what else ""
        if length is not None and n != length:
            self.fail(f"has {n} item{'s' if n != 1 else ''}, {length} expected{why}")
        if n < min_length:
            self.fail(f"has {n} item{'s' if n != 1 else ''}, at least {min_length} expected{why}")
        return [self.child(i) for i in range(n)]

    # -- scalars ---------------------------------------------------------------------------------------------

    def integer(self, lo: int | None = None, hi: int | None = None) -> int:
        """An integer (not a bool, not 3.0) in [lo, hi]."""
        if not isinstance(self.value, int) or isinstance(self.value, bool):
            self._wrong("an integer")
        self._within(self.value, lo, hi)
        return self.value

    def number(self, lo: float | None = None, hi: float | None = None) -> float:
        """A finite number (integer or float, not a bool) in [lo, hi]."""
        if not isinstance(self.value, (int, float)) or isinstance(self.value, bool):
            self._wrong("a number")
        if not math.isfinite(self.value):
            self.fail(f"is {self.value!r}, not a finite number")
        self._within(self.value, lo, hi)
        return float(self.value)

    def flag(self) -> bool:
        if not isinstance(self.value, bool):
            self._wrong("true or false")
        return self.value

    def text(self, choices: Iterable[str] | None = None) -> str:
        if not isinstance(self.value, str):
            self._wrong("a string")
        if choices is not None and self.value not in (choices := tuple(choices)):
            self.fail(f"is {self.value!r}, not one of {', '.join(map(repr, choices))}"
                      f"{did_you_mean(self.value, choices)}")
        return self.value

    # -- lists of scalars ------------------------------------------------------------------------------------

    def numbers(self, length: int | None = None, *, lo: float | None = None, what: str = "") -> list[float]:
        """A list of finite numbers ≥ `lo`, `length` of them."""
        return [e.number(lo) for e in self.elements(length, what=what)]

    def indices(self, size: int, *, min_length: int = 0, what: str = "index") -> list[int]:
        """A list of distinct integers in [0, size): positions into something of `size` items (a negative
        or repeated index would wrap around or count twice without an error)."""
        seen: dict[int, int] = {}
        for i, e in enumerate(self.elements(min_length=min_length)):
            if not isinstance(e.value, int) or isinstance(e.value, bool):
                e._wrong(f"an integer {what}")
            if not 0 <= e.value < size:
                e.fail(f"{what} {e.value} is outside 0 … {size - 1}")
            if e.value in seen:
                e.fail(f"{what} {e.value} appears twice (also at [{seen[e.value]}])")
            seen[e.value] = i
        return list(self.value)

    # -- helpers ---------------------------------------------------------------------------------------------

    def _within(self, value, lo, hi) -> None:
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
            self.fail(f"is {value!r}, outside {bounds}")

    def _wrong(self, expected: str) -> NoReturn:
        self.fail(f"is {_show(self.value)}, expected {expected}")


def _show(value) -> str:
    """`value` for a message, as JSON names it: null, true, a number, or its type and a short repr."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, (int, float)):
        return repr(value)
    kind = {str: "string", list: "list", dict: "mapping"}.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{kind} {text if len(text) <= 60 else text[:57] + '…'}"


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
