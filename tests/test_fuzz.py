"""Fuzzing plans and configs: every mutation is refused with a sparsegraph error that names what it refuses,
or compiles into exactly the model the unmutated plan replays.

Two small models carry every pass: three residual MLP blocks (width 16) with a profile, neuron pruning,
activation sparsity and N:M weights on one block each, and the explicit-attention transformer cut to two
blocks with head patterns, token importance, token pruning and block-sparse attention; both end with
speed_check. Their plans are made once per module; each example mutates one (types, NaN and infinity,
missing, extra and renamed keys, out-of-range, repeated and non-integral indices, wrong lengths, null,
nested garbage, another model's plan or sections of it, invalid attention heads and token-pruning
decisions) and replays it from a file, from its JSON dict, or as an edited `SparsityPlan` object.

The oracle, for every mutation:

- refused: a `SparsegraphError` whose message names the site (mutations under ``sites``), the pass
  (under ``passes``) or the top-level key; a `PassError` must not wrap a raw exception (that would be
  a crash the validation missed);
- accepted: the compiled model's output equals the unmutated plan's replay exactly. The generator
  leaves out edits that are legitimate changes of meaning (dropping a site's decision, a diagonal of a
  pattern, a null centre: a plan may be edited on purpose), so an accepted mutation that changes the
  output is a gap in the validation.

Configs are fuzzed the same way: refused naming a key, or built into a config that compiles (reusing a
profile plan's facts, so no calibration runs) and, where it equals the original, replays the same.

The default run takes about a minute on two cores (60 MLP-plan, 20 attention-plan and 60 config examples,
plus one test per targeted edit); ``-m slow`` runs the long variants (400 examples each, about three
minutes).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import sparsegraph as sg
from sparsegraph.config import Config
from sparsegraph.errors import PassError, PlanEntryError, SparsegraphError
from sparsegraph.models import seeded
from sparsegraph.models.explicit import ExplicitTransformer
from sparsegraph.plan import TOP_KEYS, SparsityPlan

# heavy for the default run (kept under 6 minutes on 2 cores): CI runs the tests marked `ci` after it; the two
# long runs (400 fresh examples each, 90 s) are for `pytest -m slow` only
pytestmark = [pytest.mark.slow]


# the default run draws the same examples every time (a suite that fails at random helps nobody); the slow
# variants explore afresh on each run
FAST = settings(max_examples=30, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLOW = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.data_too_large])


# -- models and base plans -----------------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, dim: int = 16, hidden: int = 64):
        super().__init__()
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)))


class _MLPs(nn.Module):
    """Three residual MLP blocks: sites mlp:blocks.0 … mlp:blocks.2 (one per MLP rewrite pass)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(_Block() for _ in range(3))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


SPEED = {"speed_check": {"measure": False, "min_speedup": 0.0}}  # cost model: deterministic, keeps every site
MLP_CONFIG = {
    "passes": ["activation_profile", {"neuron_pruning": {"fraction": 0.5}},
               {"neuron_sparsity": {"target": 0.5}},
               {"nm_weights": {"roles": ["mlp.up", "mlp.down"]}}, SPEED],
    "overrides": {"blocks.0.*": {"neuron_sparsity": {"target": 0.0}, "nm_weights": {"roles": []}},
                  "blocks.1.*": {"neuron_pruning": {"fraction": 0.0}, "nm_weights": {"roles": []}},
                  "blocks.2.*": {"neuron_pruning": {"fraction": 0.0}, "neuron_sparsity": {"target": 0.0}}},
}
ATTENTION_CONFIG = {  # per-block pattern families, so that the plan holds several kinds of heads
    "passes": [{"head_patterns": {"block": 16, "recall": 0.5, "min_saving": 0.0, "skip_share": 0.12}},
               "token_importance", {"token_pruning": {"layers": [1], "keep": 0.5}},
               {"sparse_attention": {"max_density": 1.0}}, SPEED],
    "overrides": {"blocks.0.*": {"head_patterns": {"patterns": ["multi_diagonal", "vertical_slash", "skip"]}},
                  "blocks.1.*": {"head_patterns": {"patterns": ["local", "block_topk", "skip"],
                                                   "recall": 0.6}}},
}


@dataclass(repr=False)
class Base:
    model: nn.Module
    example: tuple
    plan: dict  # the plan's JSON
    output: torch.Tensor  # what the unmutated plan replays to
    paths: list[tuple]  # places in the plan to mutate

    def __repr__(self):
        return f"Base({type(self.model).__name__})"

    def _repr_pretty_(self, printer, cycle):  # how hypothesis prints it in a failing example
        printer.text(repr(self))


@dataclass
class Mutation:
    """A mutated plan or config (`value`), what its refusal must name, and a short description (its repr,
    which hypothesis prints for a failing example: the plans themselves are 100 kB)."""

    value: dict
    names: set[str]
    label: str

    def __repr__(self):
        return self.label

    def _repr_pretty_(self, printer, cycle):
        printer.text(self.label)


def _compile(model, example, **kwargs):
    return sg.compile(model, example_inputs=example, quiet=True, dynamic=False, **kwargs)


def _from_file(base: Base, plan: dict, tmp_path):
    """Replay `plan` written to a file, as a hand-edited plan reaches compile."""
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(plan, allow_nan=True))
    return _compile(base.model, base.example, plan=path)


def _base(model, example, config, calibration) -> Base:
    made = _compile(model, example, config=config, calibration=calibration)
    data = made.plan.to_json()
    replayed = _compile(model, example, plan=SparsityPlan.from_json(copy.deepcopy(data)))
    with torch.no_grad():
        output = replayed(*example)
        assert torch.equal(output, made(*example))
    return Base(model, example, data, output, list(_paths(data)))


@pytest.fixture(scope="module")
def bases() -> dict[str, Base]:
    g = torch.Generator().manual_seed(0)
    mlps = seeded(_MLPs)
    mlp = _base(mlps, (torch.randn(2, 8, 16, generator=g),), MLP_CONFIG,
                [(torch.randn(2, 8, 16, generator=g),) for _ in range(2)])
    attention = seeded(lambda: ExplicitTransformer(layers=2))

    def tokens():  # 48 tokens: not the batch, width, head count or head size (token_pruning tells them apart)
        ids = torch.randint(0, 1000, (2, 48), generator=g)
        return ids, torch.ones_like(ids)

    attn = _base(attention, tokens(), ATTENTION_CONFIG, [tokens() for _ in range(2)])
    return {"mlp": mlp, "attention": attn}


def _paths(tree, path=()):
    """Every place in `tree` (containers and leaves), lists cut to their first three items: long lists are
    many copies of one kind of value."""
    if path:
        yield path
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _paths(value, (*path, key))
    elif isinstance(tree, list):
        for i, value in enumerate(tree[:3]):
            yield from _paths(value, (*path, i))


# -- the oracle ----------------------------------------------------------------------------------------------


def _names(path: tuple, extra=()) -> set[str]:
    """What a refusal of a mutation at `path` must name (any of): the site, the pass, or the top-level key
    (and `extra` keys, as written or as their repr)."""
    if path and path[0] in ("sites", "passes") and len(path) > 1:
        names = {path[1]}
    else:
        names = {"schema" if path[:1] == ("schema_version",) else path[0] if path else "plan"}
    return {form for name in (*names, *extra) for form in (str(name), repr(name))}


def _check_refusal(error: SparsegraphError, names: set[str]) -> None:
    message = str(error)
    assert message.strip(), f"{type(error).__name__} without a message"
    assert any(name in message for name in names), f"the error names none of {names}: {message}"
    if isinstance(error, PassError) and not isinstance(error, PlanEntryError):
        cause = error.__cause__
        assert cause is None or isinstance(cause, SparsegraphError), (
            f"a raw {type(cause).__name__} escaped the validation: {message}")


def _replay(base: Base, plan, names: set[str], tmp_path) -> str:
    """Compile `plan` (a JSON dict) through one of the three doors; check the oracle. Returns the outcome."""
    door = plan.pop("__door__", "file")
    try:
        if door == "file":
            path = tmp_path / "plan.json"
            path.write_text(json.dumps(plan, allow_nan=True))
            source = path
        elif door == "object" and set(TOP_KEYS) <= set(plan):
            source = SparsityPlan(**{k: plan[k] for k in TOP_KEYS})  # an in-memory plan edited by hand
        else:
            source = plan
        cm = _compile(base.model, base.example, plan=source)
    except SparsegraphError as e:
        _check_refusal(e, names)
        return "refused"
    with torch.no_grad():
        out = cm(*base.example)
    assert torch.equal(out, base.output), "an accepted mutation changed the model the plan replays"
    return "replayed"


# -- mutations -----------------------------------------------------------------------------------------------

NON_FINITE = st.sampled_from([float("nan"), float("inf"), float("-inf")])
JUNK_TEXT = st.text(max_size=6).map(lambda s: "~" + s)  # never a valid name
SCALARS = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | JUNK_TEXT
GARBAGE = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(JUNK_TEXT, inner, max_size=3), max_leaves=8)
POSITIVE = {"window", "sinks", "block", "chunk", "m", "n", "grid", "max_boxes", "seq_len", "key_len", "k"}
INDEX_LISTS = {"keep", "removed", "hot", "columns", "diagonals"}
FIXED_LENGTH = {"keep", "removed", "removed_mean", "centre", "mean", "rms", "mass", "heads", "shape",
                "blocks", "log10_range"}
FREE_LISTS = {"diagonals", "columns", "hot", "layers"}  # dropping an item is a legitimate edit of the pattern


def _category(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


def _junky(value) -> bool:
    """Whether `value` holds a junk name (a string or key starting with "~", which nothing is called)."""
    if isinstance(value, str):
        return value.startswith("~")
    if isinstance(value, dict):
        return any(_junky(k) or _junky(v) for k, v in value.items())
    return isinstance(value, list) and any(_junky(v) for v in value)


def _has(tree, path) -> bool:
    try:
        _get(tree, path)
        return True
    except (KeyError, IndexError, TypeError):
        return False


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    _get(tree, path[:-1])[path[-1]] = value


def _legit_drop(path: tuple, plan: dict) -> bool:
    """Dropping this is an edit a user may make on purpose (the output changes, and that is right)."""
    if path[0] == "sites" and (len(path) <= 3 or path[-1] == "decision"):
        return True  # a site, a pass's entry for it, or its decision: the site stays as it was
    if path[0] == "sites" and len(path) == 5 and path[3] == "decision":
        decision = _get(plan, path[:-1])
        return path[2] == "nm_weights" or (path[2] == "neuron_sparsity" and len(decision) > 1)
    parent = path[-2] if len(path) > 1 else None
    return parent in FREE_LISTS or (len(path) > 2 and path[-3] == "blocks")


@st.composite
def plan_mutations(draw, base: Base, other_plan: dict):
    """(mutated plan JSON with its door, names the refusal must contain, a label); `other_plan` is another
    model's plan."""
    plan = copy.deepcopy(base.plan)
    kind = draw(st.sampled_from(["retype", "nonfinite", "int", "delete", "add_key", "rename_key", "length",
                                 "duplicate", "garbage", "reorder", "schema", "other_model", "head", "token",
                                 "decision"]))
    path = draw(st.sampled_from(base.paths))
    value = _get(plan, path)
    names = _names(path)
    if kind == "retype":
        new = draw(GARBAGE.filter(lambda v, old=value: _category(v) != _category(old)))
        if new is None and path[-1] == "centre" and "neuron_sparsity" in path:
            new = "~centre"  # a null centre is valid (no centring): a legitimate edit
        _set(plan, path, new)
    elif kind == "nonfinite":
        leaves = [p for p in base.paths if _category(_get(plan, p)) == "number"]
        path = draw(st.sampled_from(leaves))
        names = _names(path)
        _set(plan, path, draw(NON_FINITE))
    elif kind == "int":
        path = draw(st.sampled_from([p for p in base.paths if type(_get(plan, p)) is int]))
        names, old = _names(path), _get(plan, path)
        choices = [old + 0.5]
        if "diagonals" not in path:
            choices += [-1, -(2**40)]
        if path[-1] in POSITIVE:
            choices.append(0)
        if path[-2:-1] in [("keep",), ("removed",), ("hot",)] or (len(path) > 2 and path[-3] == "blocks"):
            choices.append(10**9)  # past the end of what it indexes (a diagonal or column may lie anywhere)
        _set(plan, path, draw(st.sampled_from(choices)))
    elif kind == "delete":
        if _legit_drop(path, plan):
            path = path[:1]  # drop a top-level key instead
        names = _names(path)
        container = _get(plan, path[:-1])
        if isinstance(container, list) and path[-2] == "removed_mean" and len(container) == 1:
            container.append(container[0])  # [] is valid (no compensation); make it two of one instead
        else:
            del container[path[-1]]
    elif kind in ("add_key", "rename_key", "reorder"):
        dicts = [p for p in [(), *base.paths] if isinstance(_get(plan, p), dict) and _get(plan, p)]
        path = draw(st.sampled_from(dicts))
        target, key = _get(plan, path), draw(JUNK_TEXT)
        names = _names(path, {key})
        if kind == "add_key":
            target[key] = draw(GARBAGE)
        elif kind == "rename_key":
            old = draw(st.sampled_from(sorted(target)))
            target[key] = target.pop(old)
            names = _names((*path, old), {key})
        else:
            items = draw(st.permutations(list(target.items())))
            target.clear()
            target.update(items)
    elif kind == "length":
        lists = [p for p in base.paths if isinstance(_get(plan, p), list) and p[-1] in FIXED_LENGTH]
        path = draw(st.sampled_from(lists))
        names, items = _names(path), _get(plan, path)
        if items and draw(st.booleans()):
            items.pop()
            if path[-1] == "removed_mean" and not items:
                items.extend([0.0, 0.0])
        else:
            items.append(copy.deepcopy(items[-1]) if items else 0)
    elif kind == "duplicate":
        lists = [p for p in base.paths if isinstance(_get(plan, p), list) and len(_get(plan, p)) >= 2
                 and (p[-1] in INDEX_LISTS or (len(p) > 1 and p[-2] == "blocks"))]
        if lists:
            path = draw(st.sampled_from(lists))
            names, items = _names(path), _get(plan, path)
            items[1] = items[0]
        else:
            plan["schema_version"] = "1"
            names = {"schema"}
    elif kind == "garbage":  # nested junk: of another type, or holding a junk name somewhere
        _set(plan, path,
             draw(GARBAGE.filter(lambda v, old=value: _category(v) != _category(old) or _junky(v))))
    elif kind == "schema":
        plan["schema_version"] = draw(st.sampled_from(["1", 1.0, True, 2, 0, None, [1]]))
        names = {"schema"}
    elif kind == "other_model":
        other = copy.deepcopy(other_plan)
        section = draw(st.sampled_from([None, "model", "sites", "passes", "config"]))
        if section is None:
            plan = other
        else:
            plan[section] = other[section]
        names = {"model", "passes", "config", "sites"}
    else:
        plan, names, edit = draw(_targeted(plan, kind))
        return Mutation(plan, names, f"{kind}: {edit} via {plan['__door__']}")
    door = plan["__door__"] = draw(st.sampled_from(["file", "dict", "object"]))
    shown = repr(_get(plan, path)) if kind in ("retype", "int", "garbage") and _has(plan, path) else ""
    return Mutation(plan, names, f"{kind} at {list(path)} {shown[:80]} via {door}")


# -- targeted edits: the findings, as values a person might type ---------------------------------------------

BAD_HEADS = [
    {"pattern": "~x", "params": {}}, {"pattern": "local", "params": {"window": 0}},
    {"pattern": "local", "params": {"window": -2}}, {"pattern": "local", "params": {"window": 2.5}},
    {"pattern": "local", "params": {"window": "2"}},
    {"pattern": "local", "params": {"window": 1, "sinks": 1}},
    {"pattern": "sink_local", "params": {"window": 1}},
    {"pattern": "sink_local", "params": {"sinks": 0, "window": 1}},
    {"pattern": "multi_diagonal", "params": {"diagonals": []}},
    {"pattern": "multi_diagonal", "params": {"diagonals": [0.5]}},
    {"pattern": "multi_diagonal", "params": {"diagonals": [True]}},
    {"pattern": "multi_diagonal", "params": {"diagonals": [1, 1]}},
    {"pattern": "vertical_slash", "params": {"columns": [-1], "diagonals": [0]}},
    {"pattern": "vertical_slash", "params": {"columns": [], "diagonals": []}},
    {"pattern": "block_topk", "params": {"shape": [3], "blocks": [[0]]}},
    {"pattern": "block_topk", "params": {"shape": [3, 3], "blocks": [[0], [1]]}},
    {"pattern": "block_topk", "params": {"shape": [3, 3], "blocks": [[0], [3], [1]]}},
    {"pattern": "block_topk", "params": {"shape": [3, 3], "blocks": [[], [], []]}},
    {"pattern": "block_topk", "params": {"shape": [0, 3], "blocks": []}},
    {"pattern": "dynamic_topk", "params": {"k": 0}}, {"pattern": "dynamic_topk", "params": {"k": None}},
    {"pattern": "skip", "params": {"mean": [0.0]}}, {"pattern": "skip", "params": {"mean": None}},
    {"pattern": "dense", "params": {"window": 1}}, {"pattern": "dense"}, {"params": {}},
]
BAD_TOKEN_EDITS = [("keep", 0.0), ("keep", 1.0), ("keep", -0.5), ("keep", 0.0004), ("score", "auto"),
                   ("score", "core"), ("score_site", "attn:blocks.1.attn"), ("score_site", "attn:nowhere"),
                   ("layer", 0), ("layer", 7), ("protect", 48), ("protect", -1), ("fuse", "no"), ("chunk", 0),
                   ("roi", {"layers": [], "grid": 7, "protect": 1, "threshold": 0.2, "max_boxes": 1}),
                   ("core", {"mlp_site": "mlp:blocks.0.mlp", "hot": [0], "centre": [0.0]})]


# (pass, what, edit: decision -> (key path in it, new value)): MLP and speed_check decisions a person might
# write by hand, each of which must be refused naming the site and the key
BAD_DECISIONS = [
    ("neuron_pruning", "removed_mean one short", lambda d: (("removed_mean",), d["removed_mean"][:-1])),
    ("neuron_pruning", "a kept neuron twice", lambda d: (("keep",), [d["keep"][0], *d["keep"][:-1]])),
    ("neuron_pruning", "a negative kept index", lambda d: (("keep",), [-1, *d["keep"][1:]])),
    ("neuron_pruning", "a removed index past the end",
     lambda d: (("removed",), [*d["removed"][:-1], len(d["keep"]) + len(d["removed"])])),
    ("neuron_pruning", "a neuron kept and removed",
     lambda d: (("removed",), [*d["removed"][:-1], d["keep"][0]])),
    ("neuron_pruning", "nothing kept", lambda d: (("keep",), [])),
    ("neuron_pruning", "a mean that is a string", lambda d: (("removed_mean", 0), "0.1")),
    ("neuron_sparsity", "a negative threshold", lambda d: (("down_input", "threshold"), -0.1)),
    ("neuron_sparsity", "a NaN threshold", lambda d: (("down_input", "threshold"), float("nan"))),
    ("neuron_sparsity", "k above the width",
     lambda d: (("down_input", "k"), len(d["down_input"]["centre"]) + 1)),
    ("neuron_sparsity", "a negative k", lambda d: (("down_input", "k"), -1)),
    ("neuron_sparsity", "a centre one short",
     lambda d: (("down_input", "centre"), d["down_input"]["centre"][:-1])),
    ("neuron_sparsity", "a NaN in the centre", lambda d: (("down_input", "centre", 3), float("nan"))),
    ("neuron_sparsity", "core without its prefix", lambda d: (("down_input", "core"), True)),
    ("neuron_sparsity", "the up projection with the down projection's centre",
     lambda d: (("mlp_input",), copy.deepcopy(d["down_input"]))),
    ("neuron_sparsity", "an attention input at an MLP",
     lambda d: (("attn_input",), copy.deepcopy(d["down_input"]))),
    ("neuron_sparsity", "no projection at all", lambda d: (("down_input",), None)),
    ("nm_weights", "n equal to m", lambda d: ((next(iter(d)), "n"), 4)),
    ("nm_weights", "m that does not divide the inputs", lambda d: ((next(iter(d)), "m"), 3)),
    ("nm_weights", "a layer of another site", lambda d: (("blocks.0.up",), {"n": 2, "m": 4})),
    ("nm_weights", "an unknown key", lambda d: ((next(iter(d)), "k"), 1)),
    ("speed_check", "revert as a string", lambda d: (("revert",), "no")),
    ("speed_check", "revert null", lambda d: (("revert",), None)),
]


def _bad_decision(plan: dict, name: str, edit) -> tuple[str, tuple]:
    """Apply `edit` to the first decision of pass `name` in `plan`; (its site, the key path edited)."""
    site = next(s for s, per_pass in plan["sites"].items() if "decision" in per_pass.get(name, {}))
    decision = plan["sites"][site][name]["decision"]
    keys, value = edit(decision)
    if value is None and len(keys) == 1 and name == "neuron_sparsity":
        decision.pop(keys[0])  # "no projection at all": the only group removed
    else:
        _set(decision, keys, copy.deepcopy(value))
    return site, keys


@st.composite
def _targeted(draw, plan, kind):
    """One targeted edit of kind ``head``, ``token`` or ``decision`` (MLP and speed_check decisions), and the
    site the refusal must name; a plan without such a decision gets an unsupported schema version instead."""
    sites = plan["sites"]
    plan["__door__"] = draw(st.sampled_from(["file", "dict", "object"]))
    if kind == "decision":
        present = {name for per_pass in sites.values() for name, e in per_pass.items() if "decision" in e}
        edits = [e for e in BAD_DECISIONS if e[0] in present]
        if edits:
            name, what, edit = draw(st.sampled_from(edits))
            site, _ = _bad_decision(plan, name, edit)
            return plan, {site}, f"{site} {name}: {what}"
    else:
        name = {"head": "sparse_attention", "token": "token_pruning"}[kind]
        edits = [s for s in sites if name in sites[s]]
    if not edits:
        plan["schema_version"] = None
        return plan, {"schema"}, "schema_version null"
    site = draw(st.sampled_from(edits))
    if kind == "head":
        heads = sites[site]["sparse_attention"]["decision"]["heads"]
        h, head = draw(st.integers(0, len(heads) - 1)), draw(st.sampled_from(BAD_HEADS))
        heads[h] = copy.deepcopy(head)
        edit = f"{site} head {h} = {head}"
    else:
        key, value = draw(st.sampled_from(BAD_TOKEN_EDITS))
        sites[site]["token_pruning"]["decision"][key] = copy.deepcopy(value)
        edit = f"{site} {key} = {value}"
    return plan, {site}, edit


# -- properties: plans ---------------------------------------------------------------------------------------


def _plan_property(bases, tmp_path_factory, data, which):
    base, other = bases[which], bases["attention" if which == "mlp" else "mlp"]
    mutation = data.draw(plan_mutations(base, other.plan), label="mutation")
    _replay(base, mutation.value, mutation.names, tmp_path_factory.mktemp("fuzz"))


@pytest.mark.ci
@FAST
@given(data=st.data())
def test_mutated_mlp_plans_are_refused_by_name_or_replay_the_same(bases, tmp_path_factory, data):
    _plan_property(bases, tmp_path_factory, data, "mlp")


@pytest.mark.ci
@settings(FAST, max_examples=10)
@given(data=st.data())
def test_mutated_attention_plans_are_refused_by_name_or_replay_the_same(bases, tmp_path_factory, data):
    _plan_property(bases, tmp_path_factory, data, "attention")


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_mutated_plans_long_run(bases, tmp_path_factory, data):
    _plan_property(bases, tmp_path_factory, data, data.draw(st.sampled_from(["mlp", "attention"])))


@pytest.mark.ci
@pytest.mark.parametrize("name,what,edit", BAD_DECISIONS, ids=[f"{n}: {w}" for n, w, _ in BAD_DECISIONS])
def test_every_bad_decision_is_refused_naming_site_and_key(bases, tmp_path, name, what, edit):
    """The findings one by one: each hand edit of a decision is a PlanError naming the site and the key."""
    base = bases["mlp"]
    plan = copy.deepcopy(base.plan)
    site, keys = _bad_decision(plan, name, edit)
    with pytest.raises(sg.PlanError) as err:
        _from_file(base, plan, tmp_path)
    message = str(err.value)
    assert f"sites[{site!r}][{name!r}]" in message, message
    assert any(repr(k) in message for k in keys) or "names no projection" in message, message


@pytest.mark.ci
@pytest.mark.parametrize("site", ["mlp:nowhere", "mlp:blocks.0"])
def test_decisions_for_sites_without_the_layers_are_refused(bases, tmp_path, site):
    """An nm_weights decision moved to a site that does not exist (or has no such layer) was ignored."""
    base = bases["mlp"]
    plan = copy.deepcopy(base.plan)
    plan["sites"].setdefault(site, {})["nm_weights"] = plan["sites"].pop("mlp:blocks.2")["nm_weights"]
    with pytest.raises(sg.PlanError, match=f"sites\\[{site!r}\\]\\['nm_weights'\\]"):
        _from_file(base, plan, tmp_path)


@pytest.mark.ci
def test_token_pruning_at_a_site_not_in_the_graph_is_refused(bases, tmp_path):
    base = bases["attention"]
    plan = _only(base.plan, {"token_pruning"})
    plan["sites"]["attn:nowhere"] = plan["sites"].pop("attn:blocks.1.attn")
    with pytest.raises(sg.PlanError, match="names 'attn:nowhere', which is not an attention site"):
        _from_file(base, plan, tmp_path)


def _only(plan: dict, names: set[str]) -> dict:
    """`plan` cut down to the passes `names`, consistently (config, overrides, pass entries, site entries): a
    shorter replay for the tests that refuse one pass's decisions."""
    plan = copy.deepcopy(plan)
    config = plan["config"]
    config["passes"] = [item for item in config["passes"] if next(iter(item)) in names]
    config["overrides"] = {g: {n: o for n, o in per.items() if n in names}
                           for g, per in config["overrides"].items()}
    config["overrides"] = {g: per for g, per in config["overrides"].items() if per}
    plan["passes"] = {n: e for n, e in plan["passes"].items() if n in names}
    plan["sites"] = {s: {n: e for n, e in per.items() if n in names} for s, per in plan["sites"].items()}
    return plan


@pytest.mark.ci
@pytest.mark.parametrize("head", BAD_HEADS, ids=lambda h: json.dumps(h)[:60])
def test_every_bad_attention_head_is_refused(bases, tmp_path, head):
    base = bases["attention"]
    plan = _only(base.plan, {"head_patterns", "sparse_attention"})
    plan["sites"]["attn:blocks.0.attn"]["sparse_attention"]["decision"]["heads"][1] = copy.deepcopy(head)
    with pytest.raises(sg.PlanError, match=r"sites\['attn:blocks.0.attn'\]\['sparse_attention'\]"
                                           r"\['decision'\]\['heads'\]"):
        _from_file(base, plan, tmp_path)


@pytest.mark.ci
@pytest.mark.parametrize("key,value", BAD_TOKEN_EDITS, ids=lambda v: str(v)[:30])
def test_every_bad_token_pruning_edit_is_refused(bases, tmp_path, key, value):
    base = bases["attention"]
    plan = _only(base.plan, {"token_pruning"})
    plan["sites"]["attn:blocks.1.attn"]["token_pruning"]["decision"][key] = copy.deepcopy(value)
    with pytest.raises(sg.PlanError, match=r"sites\['attn:blocks.1.attn'\]\['token_pruning'\]"):
        _from_file(base, plan, tmp_path)


# -- properties: configs -------------------------------------------------------------------------------------


@st.composite
def config_mutations(draw):
    """(a `Mutation` of the MLP config, whether it is still the same config)."""
    config = copy.deepcopy(MLP_CONFIG)
    paths = list(_paths(config))
    kind = draw(st.sampled_from(["retype", "nonfinite", "delete", "add_key", "rename_key", "garbage",
                                 "same"]))
    path = draw(st.sampled_from(paths))
    # a refusal names a key on the path or the top-level key whose entry it found wrong (deleting 'passes'
    # makes the overrides name passes that are not in the pipeline: the error is about 'overrides')
    names = {str(k) for k in path if isinstance(k, str)} | {"passes", "overrides", "backend"}
    if kind == "retype":
        old = _get(config, path)
        _set(config, path, draw(GARBAGE.filter(lambda v: _category(v) != _category(old))))
    elif kind == "nonfinite":
        leaves = [p for p in paths if _category(_get(config, p)) == "number"]
        path = draw(st.sampled_from(leaves))
        names = {str(k) for k in path if isinstance(k, str)}
        _set(config, path, draw(NON_FINITE))
    elif kind == "delete":
        del _get(config, path[:-1])[path[-1]]
    elif kind in ("add_key", "rename_key"):
        dicts = [p for p in [(), *paths] if isinstance(_get(config, p), dict) and _get(config, p)]
        path = draw(st.sampled_from(dicts))
        target, key = _get(config, path), draw(JUNK_TEXT | st.integers() | st.none())
        names = {str(key), repr(key)}
        if kind == "add_key":
            target[key] = draw(GARBAGE)
        else:
            target[key] = target.pop(draw(st.sampled_from(sorted(target))))
    elif kind == "garbage":
        _set(config, path, draw(GARBAGE))
    else:  # the same config, written differently: keys in another order
        config["overrides"] = dict(reversed(list(config["overrides"].items())))
    shown = repr(_get(config, path))[:80] if kind in ("retype", "garbage") and _has(config, path) else ""
    return Mutation(config, names, f"{kind} at {list(path)} {shown}"), kind == "same"


@pytest.fixture(scope="module")
def profile(bases):
    """The MLP base plan, whose activation_profile facts a config reuses instead of calibrating."""
    return bases["mlp"]


def _config_property(profile, mutation, same):
    config, names = mutation.value, mutation.names
    try:
        cfg = Config.from_dict(config)
    except sg.ConfigError as e:
        assert str(e).strip() and any(name in str(e) for name in names), f"names none of {names}: {e}"
        return
    assert Config.from_dict(cfg.to_dict()) == cfg  # whatever was accepted is a complete, valid config
    try:
        cm = _compile(profile.model, profile.example, config=cfg, plan=copy.deepcopy(profile.plan))
    except SparsegraphError as e:
        _check_refusal(e, {""})
        return
    if same:
        with torch.no_grad():
            assert torch.equal(cm(*profile.example), profile.output)


@pytest.mark.ci
@FAST
@given(mutation=config_mutations())
def test_mutated_configs_are_refused_by_name_or_compile(profile, mutation):
    _config_property(profile, *mutation)


@pytest.mark.slow
@SLOW
@given(mutation=config_mutations())
def test_mutated_configs_long_run(profile, mutation):
    _config_property(profile, *mutation)


@pytest.mark.ci
def test_non_finite_numbers_are_refused_wherever_they_are(bases, tmp_path):
    """NaN and Infinity (Python's json reads both) anywhere in a plan file: refused naming the key."""
    base = bases["mlp"]
    for path in [p for p in base.paths if _category(_get(base.plan, p)) == "number"][:: 7]:
        for value in (math.nan, math.inf):
            plan = copy.deepcopy(base.plan)
            _set(plan, path, value)
            (tmp_path / "plan.json").write_text(json.dumps(plan, allow_nan=True))
            with pytest.raises(sg.PlanError) as err:
                sg.load_plan(tmp_path / "plan.json")
            where = (f"{path[0]}{''.join(f'[{k!r}]' for k in path[1:])}" if path[0] != "schema_version"
                     else "schema")
            assert where in str(err.value) and ("NaN" in str(err.value) or "Infinity" in str(err.value))
