"""`SparsityPlan`: every decision a compile made, per site, with its evidence, as versioned JSON.

Layout (``schema_version`` 1)::

    {
      "schema_version": 1,
      "versions": {"sparsegraph": "0.1.0", "torch": "2.14.1"},
      "model": {"class": "SentenceEncoder", "fingerprint": "sha256…",
                "sites": [{"id": "attn:encoder.layer.0.attention", "kind": "attention", "layer": 0, …}, …]},
      "config": {"passes": [...], "overrides": {...}, "backend": "auto"},
      "passes": {"<pass>": {"kind": "analysis" | "rewrite", "options": {...}, "stats": {...},
                            "summary": {...}}},
      "sites": {"<site id>": {"<pass>": {"decision": {...}, "evidence": {...}}}}
    }

Analysis passes write ``evidence`` (and a model-level ``summary``); rewrite passes write a ``decision`` per
site, which is all a later compile needs to reproduce the rewrite. The plan holds JSON values only, so
``load_plan(p.save(path)) == p`` exactly.

The fingerprint hashes the traced graph's structure: parameter and buffer names, shapes and dtypes, and
the sites found. It ignores the example shapes, so a plan made at one sequence length applies at any
other. A plan whose fingerprint differs from the model's is refused, naming what differs.

A plan is checked before anything reads it, because people edit plans and a malformed one would
otherwise fail deep in a pass (or worse, replay into a silently different model): `check` (run by
`from_json`, `load_plan` and `compile`) refuses anything but the structure above, with JSON values and
finite numbers only; `check_replay` refuses passes that disagree with the plan's own config; the passes
check their decisions and facts against the traced graph (`pass_contract.Entry`). Every refusal is a
`PlanError` naming the key, e.g. ``plan entry passes['cost']['stats']['matched']: …``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparsegraph import ir
from sparsegraph.config import Config
from sparsegraph.errors import ConfigError, PlanError, did_you_mean
from sparsegraph.pass_contract import AnalysisPass, Entry, PassStats, SiteDecision
from sparsegraph.version import __version__

SCHEMA_VERSION = 1
TOP_KEYS = ("schema_version", "versions", "model", "config", "passes", "sites")
PASS_KEYS = ("kind", "options", "stats", "summary", "decided")
RECOVERY = "recovery"  # the kind of the entry `sparsegraph.recover` writes: trained weights, not decisions
_FIX = "restore the entry as sparsegraph wrote it, or make a new plan (compile with a config)"


@dataclass
class SparsityPlan:
    model: dict
    config: dict
    passes: dict[str, dict] = field(default_factory=dict)
    sites: dict[str, dict[str, dict]] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=lambda: {"sparsegraph": __version__,
                                                              "torch": torch.__version__.split("+")[0]})
    schema_version: int = SCHEMA_VERSION

    # -- construction ---------------------------------------------------------------------------------------

    @classmethod
    def for_graph(cls, gm: torch.fx.GraphModule, config: dict, model_class: str) -> SparsityPlan:
        return cls(model={"class": model_class, "fingerprint": fingerprint(gm), "sites": describe_sites(gm)},
                   config=jsonable(config))

    # -- what passes write ----------------------------------------------------------------------------------

    def record_pass(self, name: str, kind: str, options: dict, stats: PassStats) -> None:
        entry = self.passes.setdefault(name, {})
        entry.update(kind=kind, options=jsonable(options), stats=jsonable(stats.to_json()))

    def stats_of(self, pass_name: str) -> PassStats | None:
        """The stats a pass recorded (None if it has not run)."""
        stats = self.passes.get(pass_name, {}).get("stats")
        return PassStats.from_json(stats) if stats is not None else None

    def set_summary(self, pass_name: str, summary: dict) -> None:
        self.passes.setdefault(pass_name, {})["summary"] = jsonable(summary)

    def summary(self, pass_name: str) -> dict | None:
        return self.passes.get(pass_name, {}).get("summary")

    def set_evidence(self, pass_name: str, site: str, evidence: dict) -> None:
        self.sites.setdefault(site, {}).setdefault(pass_name, {})["evidence"] = jsonable(evidence)

    def evidence(self, pass_name: str, site: str) -> dict | None:
        return self.sites.get(site, {}).get(pass_name, {}).get("evidence")

    def record_decisions(self, pass_name: str, decisions: dict[str, SiteDecision], stats: PassStats) -> None:
        for site, d in decisions.items():
            self.sites.setdefault(site, {})[pass_name] = {"decision": jsonable(d.decision),
                                                          "evidence": jsonable(d.evidence)}
        self.passes.setdefault(pass_name, {})["decided"] = jsonable(stats.to_json())

    def decisions(self, pass_name: str) -> tuple[dict[str, SiteDecision], PassStats]:
        """The decisions `pass_name` recorded, and the stats of its deciding (for replay)."""
        if pass_name not in self.passes or "decided" not in self.passes[pass_name]:
            raise PlanError(f"the plan holds no decisions of pass {pass_name!r}; it was made by passes "
                            f"{sorted(self.passes)}. Compile with a config instead, "
                            "or use the plan's own config")
        decisions = {site: SiteDecision(e[pass_name]["decision"], e[pass_name].get("evidence", {}))
                     for site, e in self.sites.items() if "decision" in e.get(pass_name, {})}
        return decisions, PassStats.from_json(self.passes[pass_name]["decided"])

    def adopt_facts(self, other: SparsityPlan, pass_names) -> None:
        """Copy the entries (summary, stats, per-site evidence) of analysis passes `pass_names` from
        `other`."""
        for name in pass_names:
            self.passes[name] = jsonable(other.passes[name])
            for site, per_pass in other.sites.items():
                if name in per_pass:
                    self.sites.setdefault(site, {})[name] = jsonable(per_pass[name])

    # -- checks ----------------------------------------------------------------------------------------------

    def check_model(self, gm: torch.fx.GraphModule, model_class: str) -> None:
        """Refuse this plan for a model whose structure differs from the one it was made for."""
        theirs = fingerprint(gm)
        if theirs == self.model["fingerprint"]:
            return
        planned = {s["id"] for s in self.model["sites"]}
        found = {s["id"] for s in describe_sites(gm)}
        lines = [f"this plan was made for a different model: plan fingerprint "
                 f"{self.model['fingerprint'][:12]} ({self.model['class']}, {len(planned)} sites), this "
                 f"model {theirs[:12]} ({model_class}, {len(found)} sites)."]
        if planned - found:
            lines.append(f"  sites in the plan but not in the model: {sorted(planned - found)[:5]}")
        if found - planned:
            lines.append(f"  sites in the model but not in the plan: {sorted(found - planned)[:5]}")
        if planned == found:
            lines.append("  the sites agree, so parameter names, shapes or dtypes differ")
        lines.append("Make a new plan for this model (compile with a config and calibration data).")
        raise PlanError("\n".join(lines))

    def check(self) -> None:
        """Refuse a plan that is not what `save` writes: JSON values with finite numbers only, and every key
        of the layout in the module docstring with its type (`PlanError` naming the key). Decisions and
        evidence are checked here only as mappings; their passes check their contents against the graph."""
        _check_json(self.to_json())
        if type(self.schema_version) is not int or self.schema_version != SCHEMA_VERSION:
            raise PlanError(f"plan schema version {self.schema_version!r} is not supported by this "
                            f"sparsegraph (it reads version {SCHEMA_VERSION}); "
                            "recompile the plan with this version")
        versions = Entry(self.versions, root="versions", fix=_FIX)
        for _, v in versions.items():
            v.text()
        _check_model(Entry(self.model, root="model", fix=_FIX))
        _check_config(self.config)
        passes = Entry(self.passes, root="passes", fix=_FIX)
        for _, entry in passes.items():
            _check_pass_entry(entry)
        _check_sites(Entry(self.sites, root="sites", fix=_FIX), self.passes)

    def check_replay(self, config: Config) -> None:
        """Refuse a plan whose passes disagree with its own config (`config`, loaded from it): a replay runs
        that config with the recorded decisions, so every pass in it must have run with those options and
        every pass the plan records must be in it. Otherwise an edit of one and not the other would replay
        into a model the plan no longer describes. A plan that records a recovery is refused too: its trained
        weights are only in the saved model."""
        fix = ("make the plan's config and its 'passes' agree again (restore what sparsegraph wrote), or "
               "make a new plan (compile with a config)")
        for name in self.recovered():
            Entry(self.passes, root="passes", fix=(
                "load the saved model, which holds them (cm.save(dir), then sparsegraph.load(dir)); or "
                "delete this entry to replay the model as compiled, before recovery")).child(name).fail(
                "records a recovery (sparsegraph.recover): the weights it trained are not in the plan, so a "
                "replay would build the one-shot model, not the one this plan describes")
        names = [p.name for p in config.passes]
        for p in config.passes:
            entry = Entry(self.passes, root="passes", fix=fix)
            if p.name not in self.passes:
                entry.fail(f"has no entry for pass {p.name!r}, which the plan's config runs")
            entry = entry[p.name]
            kind = "analysis" if isinstance(p, AnalysisPass) else "rewrite"
            if entry.get("kind") is None or entry["kind"].value != kind:
                entry.fail(f"has kind {entry.value.get('kind')!r}; pass {p.name!r} is "
                           f"{'an analysis' if kind == 'analysis' else 'a rewrite'} pass")
            # An option the plan does not record was added to the pass after the plan was written: the
            # pass ran as that option's default behaves (options are added so that the default keeps
            # what the pass did before).
            recorded, config_says = entry["options"].value, p.options()
            options = {**{k: v for k, v in p.default_options().items() if k not in recorded}, **recorded}
            if options != config_says:
                differ = sorted(k for k in {*options, *config_says} if options.get(k) != config_says.get(k))
                entry["options"].fail(f"differs from the plan's config at {differ}: the config says "
                                      f"{ {k: config_says.get(k) for k in differ} }, the pass ran with "
                                      f"{ {k: options.get(k) for k in differ} }")
        for name in self.passes:
            if name not in names:
                Entry(self.passes, root="passes", fix=fix).child(name).fail(
                    f"records pass {name!r}, which the plan's config {names} does not run")

    def recovered(self) -> list[str]:
        """Names of the entries `sparsegraph.recover` wrote (kind ``recovery``): trained weights that only a
        saved model holds."""
        return [name for name, entry in self.passes.items()
                if isinstance(entry, dict) and entry.get("kind") == RECOVERY]

    # -- JSON ------------------------------------------------------------------------------------------------

    def to_json(self) -> dict:
        return {"schema_version": self.schema_version, "versions": self.versions, "model": self.model,
                "config": self.config, "passes": self.passes, "sites": self.sites}

    @classmethod
    def from_json(cls, data: dict) -> SparsityPlan:
        """The plan in `data` (parsed JSON), checked (`check`): a malformed plan is a `PlanError` naming the
        key."""
        if not isinstance(data, dict) or "schema_version" not in data:
            raise PlanError("not a sparsegraph plan: no 'schema_version' key")
        version = data["schema_version"]
        if type(version) is not int or version != SCHEMA_VERSION:
            raise PlanError(f"plan schema version {version!r} is not supported by this sparsegraph "
                            f"(it reads version {SCHEMA_VERSION}); recompile the plan with this version")
        missing = set(TOP_KEYS) - set(data)
        if missing:
            raise PlanError(f"plan is missing keys {sorted(missing)}")
        for key in data:
            if key not in TOP_KEYS:
                raise PlanError(f"unknown plan key {key!r}{did_you_mean(str(key), TOP_KEYS)}; a plan has the "
                                f"keys {list(TOP_KEYS)}. Fix: {_FIX}")
        plan = cls(model=data["model"], config=data["config"], passes=data["passes"], sites=data["sites"],
                   versions=data["versions"], schema_version=version)
        plan.check()
        return plan

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n")
        return path


def load_plan(path: str | os.PathLike) -> SparsityPlan:
    """Read a plan saved with `SparsityPlan.save`, checked (`SparsityPlan.check`).

    Python's json reads ``NaN`` and ``Infinity``, which JSON does not have and `save` never writes; they
    are kept as markers here so that the check refuses them naming their key (a NaN threshold replays as
    a layer that keeps every input, a NaN centre as NaN outputs). A key given twice in one object is
    refused too (JSON readers disagree on which one wins)."""
    try:
        data = json.loads(Path(path).read_text(), parse_constant=_NotFinite, object_pairs_hook=_unique_keys)
    except FileNotFoundError as e:
        raise PlanError(f"no plan file at {path}") from e
    except json.JSONDecodeError as e:
        raise PlanError(f"{path} is not valid JSON: {e}") from e
    except UnicodeDecodeError as e:
        raise PlanError(f"{path} is not a text file (plans are UTF-8 JSON): {e}") from e
    except RecursionError as e:
        raise PlanError(f"{path} nests JSON values too deeply to be a plan") from e
    except OSError as e:
        raise PlanError(f"cannot read the plan file {path}: {e.strerror or e}") from e
    return SparsityPlan.from_json(data)


def as_plan(plan: SparsityPlan | dict | str | os.PathLike) -> SparsityPlan:
    """`plan` as a checked `SparsityPlan`: a plan object (checked again: it may have been edited in
    memory), its JSON dict, or the path of a saved plan."""
    if isinstance(plan, SparsityPlan):
        plan.check()
        return plan
    if isinstance(plan, dict):
        return SparsityPlan.from_json(plan)
    if isinstance(plan, (str, os.PathLike)):
        return load_plan(plan)
    raise PlanError(f"plan must be a SparsityPlan, its JSON dict or the path of a saved plan, got "
                    f"{type(plan).__name__}")


class _NotFinite:
    """A ``NaN`` / ``Infinity`` / ``-Infinity`` read from a plan file, kept for `check` to refuse by key."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self):
        return self.text


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise PlanError(f"the plan file gives key {key!r} twice in one object; JSON readers disagree on "
                            f"which one counts. Fix: keep one")
        out[key] = value
    return out


# -- checks of the layout ------------------------------------------------------------------------------------


def _check_json(data: dict) -> None:
    """Refuse anything in `data` but JSON values: string keys, finite numbers. A walk with a stack, not
    recursion, so that a plan built in memory with a cycle or absurdly deep nesting is refused by key
    rather than hitting a RecursionError."""
    stack: list[tuple[Any, Any]] = [(v, (k,)) for k, v in data.items()]
    on_path: set[int] = set()  # containers being walked: meeting one again is a cycle
    while stack:
        value, path = stack.pop()
        if path is _LEAVE:
            on_path.discard(value)
            continue
        problem = _json_problem(value, path, on_path)
        if problem:
            Entry(value, path[1:], _FIX, root=str(path[0])).fail(problem)
        if isinstance(value, (dict, list)):
            on_path.add(id(value))
            stack.append((id(value), _LEAVE))
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack.extend((item, (*path, key)) for key, item in items)


_LEAVE = object()  # stack marker of `_check_json`: the container with this id is done


def _json_problem(value, path: tuple, on_path: set[int]) -> str | None:
    if isinstance(value, (dict, list)):
        if id(value) in on_path:
            return "refers back to itself (a cycle); a plan is a tree of JSON values"
        if len(path) > 64:
            return "nests values more than 64 levels deep; no plan entry does"
        bad = [k for k in value if not isinstance(k, str)] if isinstance(value, dict) else []
        return f"has the key {bad[0]!r}, not a string (JSON keys are strings)" if bad else None
    if isinstance(value, _NotFinite) or (isinstance(value, float) and not math.isfinite(value)):
        return (f"is {getattr(value, 'text', value)}: a plan holds finite numbers only (JSON has no NaN or "
                "Infinity, and sparsegraph never writes them)")
    if not (value is None or isinstance(value, (bool, int, float, str))):
        return f"holds a {type(value).__name__}; a plan holds JSON values only"
    return None


def _check_model(model: Entry) -> None:
    model.mapping(required=("class", "fingerprint", "sites"))
    model["class"].text()
    if not model["fingerprint"].text():
        model["fingerprint"].fail("is empty")
    ids: dict[str, int] = {}
    for i, site in enumerate(model["sites"].elements()):
        site.mapping(required=("id", "kind", "layer"), extra=True)
        site_id = site["id"].text()
        site["kind"].text(("attention", "cross_attention", "mlp", "conv"))
        site["layer"].integer()
        if "module_path" in site:
            site["module_path"].text()
        if site_id in ids:
            site["id"].fail(f"repeats the id of model['sites'][{ids[site_id]}]")
        ids[site_id] = i


def _check_config(config) -> None:
    try:
        Config.from_dict(config)
    except ConfigError as e:
        Entry(config, root="config", fix="correct the plan's config as the message says, or make a new plan "
                                          "(compile with a config)").fail(str(e))


def _check_pass_entry(entry: Entry) -> None:
    entry.mapping(optional=PASS_KEYS)
    if "kind" in entry:
        entry["kind"].text(("analysis", "rewrite", RECOVERY))
    for key in ("options", "summary"):
        if key in entry:
            entry[key].mapping(extra=True)
    for key in ("stats", "decided"):
        if key in entry:
            _check_stats(entry[key])


def _check_stats(stats: Entry) -> None:
    """The layout of `PassStats.to_json`."""
    stats.mapping(required=("matched", "rewritten", "refused"), optional=("counters",))
    stats["matched"].integer(0)
    stats["rewritten"].integer(0)
    for refusal in stats["refused"].elements():
        refusal.mapping(required=("site", "reason"))
        refusal["site"].text()
        refusal["reason"].text()
    if "counters" in stats:
        stats["counters"].mapping(extra=True)


def _check_sites(sites: Entry, passes: dict) -> None:
    for _, per_pass in sites.items():
        for name, entry in per_pass.items():
            if name not in passes:
                entry.fail(f"is filed under pass {name!r}, which the plan's 'passes' does not record"
                           f"{did_you_mean(name, passes)}")
            entry.mapping(optional=("decision", "evidence"))
            if "decision" in entry and "decided" not in passes[name]:
                entry["decision"].fail(f"is a decision of pass {name!r}, whose entry passes[{name!r}] "
                                       "records no deciding (no 'decided' key): only rewrite passes decide")
            for key in ("decision", "evidence"):
                if key in entry:
                    entry[key].mapping(extra=True)


def fingerprint(gm: torch.fx.GraphModule) -> str:
    """sha256 of the graph's parameters/buffers (name, shape, dtype) and of its sites."""
    tensors = [(name, list(t.shape), str(t.dtype))
               for name, t in [*gm.named_parameters(), *gm.named_buffers()]]
    # conv sites are left out: plans made before they existed still match (the conv weights' names and
    # shapes, which the tensors list holds, already tell one CNN from another)
    sites = [[s["id"], s["kind"], s["layer"]] for s in describe_sites(gm) if s["kind"] != "conv"]
    blob = json.dumps({"tensors": sorted(tensors), "sites": sites}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def describe_sites(gm: torch.fx.GraphModule) -> list[dict]:
    out = []
    for s in [*ir.attention_sites(gm), *ir.cross_attention_sites(gm)]:
        out.append({"id": s.id, "kind": s.kind, "layer": s.layer, "module_path": s.module_path,
                    "form": s.form, "heads": s.heads, "kv_heads": s.kv_heads, "head_dim": s.head_dim,
                    "causal": s.causal})
    for s in ir.mlp_sites(gm):
        out.append({"id": s.id, "kind": "mlp", "layer": s.layer, "module_path": s.module_path,
                    "gated": s.gated, "activation": s.activation, "hidden": s.hidden,
                    "intermediate": s.intermediate})
    for s in ir.conv_sites(gm):
        out.append({"id": s.id, "kind": "conv", "layer": s.layer, "module_path": s.module_path,
                    "in_channels": s.in_channels, "out_channels": s.out_channels, "height": s.height,
                    "width": s.width})
    return out


def jsonable(value: Any) -> Any:
    """`value` as JSON-native types (tuples → lists, tensors/numpy → lists and Python numbers)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return jsonable(value.tolist())
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # numpy arrays and scalars
        return jsonable(value.tolist())
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        raise PlanError(f"cannot store non-finite number {value} in a plan")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise PlanError(f"cannot store {type(value).__name__} in a plan; use JSON values")
