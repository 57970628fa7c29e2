"""`SparsityPlan`: exact JSON round-trips, refusal of plans for other models or other schema versions,
and replay: compiling from a saved plan reproduces the rewrites exactly without deciding again."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsegraph as sg
from sparsegraph.models.explicit import ExplicitTransformer
from sparsegraph.pass_contract import PassStats, SiteDecision
from sparsegraph.passes.rewrite.nm_weights import NMWeights
from sparsegraph.plan import SCHEMA_VERSION, SparsityPlan, load_plan


@pytest.fixture(scope="module")
def nm_compiled(explicit):
    """explicit_attention compiled with the "nm-2-4" pipeline."""
    model, example, _ = explicit
    return sg.compile(model, "nm-2-4", example_inputs=example, quiet=True)


def test_saved_plan_loads_back_exactly(nm_compiled, tmp_path):
    plan = nm_compiled.plan
    path = plan.save(tmp_path / "plan.json")
    again = load_plan(path)
    assert again.to_json() == plan.to_json()
    assert again.save(tmp_path / "again.json").read_text() == path.read_text()  # byte-identical re-save
    assert json.loads(path.read_text()) == plan.to_json()  # plain JSON on disk


def test_plan_holds_versions_model_config_and_per_site_entries(nm_compiled):
    data = nm_compiled.plan.to_json()
    assert data["schema_version"] == SCHEMA_VERSION == 1
    assert data["versions"] == {"sparsegraph": sg.__version__, "torch": torch.__version__.split("+")[0]}
    assert data["model"]["class"] == "ExplicitTransformer" and len(data["model"]["fingerprint"]) == 64
    assert [s["id"] for s in data["model"]["sites"]] == [
        *(f"attn:blocks.{i}.attn" for i in range(3)), *(f"mlp:blocks.{i}.mlp" for i in range(3))]
    assert data["config"] == sg.Config.load("nm-2-4").to_dict()
    assert {name: entry["kind"] for name, entry in data["passes"].items()} == {"cost": "analysis",
                                                                             "nm_weights": "rewrite"}
    for i in range(3):
        entry = data["sites"][f"mlp:blocks.{i}.mlp"]["nm_weights"]
        assert entry["decision"] == {f"blocks.{i}.mlp.0": {"n": 2, "m": 4},
                                     f"blocks.{i}.mlp.2": {"n": 2, "m": 4}}
        assert set(entry["evidence"][f"blocks.{i}.mlp.0"]) == {"kept_magnitude", "positions_sha256"}
        assert "nm_weights" not in data["sites"][f"attn:blocks.{i}.attn"]  # the pipeline's roles are MLP only


# -- property: any JSON values round-trip -------------------------------------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(max_size=8)
                | st.floats(allow_nan=False, allow_infinity=False))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=16)
json_objects = st.dictionaries(st.text(min_size=1, max_size=10), json_values, max_size=5)
site_ids = st.text(min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(evidence=st.dictionaries(site_ids, json_objects, max_size=3),
       decisions=st.dictionaries(site_ids, st.tuples(json_objects, json_objects), max_size=3),
       summary=json_objects)
def test_any_json_evidence_and_decisions_round_trip(tmp_path_factory, evidence, decisions, summary):
    plan = SparsityPlan(model={"class": "M", "fingerprint": "0" * 64, "sites": []}, config={"passes": []})
    for site, ev in evidence.items():
        plan.set_evidence("an_analysis", site, ev)
    plan.set_summary("an_analysis", summary)
    stats = PassStats(matched=len(decisions), counters={"note": "x"})
    stats.refuse("some site", "a reason")
    plan.record_decisions("a_rewrite", {s: SiteDecision(d, e) for s, (d, e) in decisions.items()}, stats)

    path = plan.save(tmp_path_factory.mktemp("plan") / "plan.json")
    again = load_plan(path)
    assert again.to_json() == plan.to_json()
    assert SparsityPlan.from_json(json.loads(json.dumps(plan.to_json()))).to_json() == plan.to_json()
    for site, ev in evidence.items():
        assert again.evidence("an_analysis", site) == ev
    assert again.summary("an_analysis") == summary
    replayed, replayed_stats = again.decisions("a_rewrite")
    assert {s: (d.decision, d.evidence) for s, d in replayed.items()} == decisions
    assert replayed_stats == stats


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), object()], ids=["nan", "inf", "object"])
def test_non_json_values_are_refused_when_written(bad):
    plan = SparsityPlan(model={"class": "M", "fingerprint": "f", "sites": []}, config={"passes": []})
    with pytest.raises(sg.PlanError, match="cannot store"):
        plan.set_evidence("p", "site", {"value": [1, bad]})


# -- refusal -------------------------------------------------------------------------------------------------


def test_plan_for_another_model_is_refused_naming_the_difference(minilm, explicit, tmp_path):
    model, example, _ = minilm
    path = sg.compile(model, "analyze", example_inputs=example, quiet=True).plan.save(
        tmp_path / "minilm.json")
    other, other_example, _ = explicit
    with pytest.raises(sg.PlanError) as err:
        sg.compile(other, plan=path, example_inputs=other_example, quiet=True)
    message = str(err.value)
    assert message.startswith("this plan was made for a different model: plan fingerprint ")
    assert "(SentenceEncoder, 12 sites)" in message and "(ExplicitTransformer, 6 sites)" in message
    assert "sites in the plan but not in the model: ['attn:encoder.encoder.layer.0.attention'" in message
    assert "sites in the model but not in the plan: ['attn:blocks.0.attn'" in message
    assert "Make a new plan for this model" in message


def test_plan_for_same_sites_but_other_shapes_is_refused(nm_compiled, tmp_path):
    path = nm_compiled.plan.save(tmp_path / "plan.json")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        smaller_vocab = ExplicitTransformer(vocab=500).eval()  # same sites, embedding table 500 × 128
    ids = torch.randint(0, 500, (2, 16))
    with pytest.raises(sg.PlanError, match="the sites agree, so parameter names, shapes or dtypes differ"):
        sg.compile(smaller_vocab, plan=path, example_inputs=(ids, torch.ones_like(ids)), quiet=True)


def test_bad_plan_files_are_refused(nm_compiled, tmp_path):
    good = nm_compiled.plan.to_json()
    cases = {
        "newer.json": (json.dumps({**good, "schema_version": 99}),
                       "plan schema version 99 is not supported by this sparsegraph (it reads version 1)"),
        "old.json": (json.dumps({**good, "schema_version": 0}), "plan schema version 0 is not supported"),
        "no_version.json": (json.dumps({k: v for k, v in good.items() if k != "schema_version"}),
                            "not a sparsegraph plan: no 'schema_version' key"),
        "a_list.json": ("[1, 2]", "not a sparsegraph plan"),
        "partial.json": (json.dumps({"schema_version": 1, "model": good["model"]}),
                         "plan is missing keys ['config', 'passes', 'sites', 'versions']"),
        "not_json.json": ("{'schema_version': 1,", "not_json.json is not valid JSON"),
        "empty.json": ("", "empty.json is not valid JSON"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(sg.PlanError) as err:
            load_plan(tmp_path / name)
        assert message in str(err.value), name
    with pytest.raises(sg.PlanError, match="no plan file at"):
        load_plan(tmp_path / "missing.json")


def test_config_with_a_plan_decides_afresh(explicit, nm_compiled):
    model, example, _ = explicit
    cm = sg.compile(model, {"passes": [{"nm_weights": {"n": 1, "m": 4}}]}, plan=nm_compiled.plan,
                    example_inputs=example, quiet=True)
    decision = next(e["nm_weights"]["decision"] for e in cm.plan.sites.values() if "nm_weights" in e)
    assert {d["n"] for d in decision.values()} == {1}  # the config's rewrite, not the plan's 2:4


# -- replay --------------------------------------------------------------------------------------------------


def test_replay_reproduces_outputs_exactly_without_deciding(explicit, nm_compiled, tmp_path, monkeypatch):
    model, example, _ = explicit
    path = nm_compiled.plan.save(tmp_path / "plan.json")

    def decide_again(*args, **kwargs):
        raise AssertionError("decide ran while replaying a plan")

    monkeypatch.setattr(NMWeights, "decide", decide_again)
    replayed = sg.compile(model, plan=path, example_inputs=example, quiet=True)

    assert replayed.config == nm_compiled.config  # the plan's own config ran
    assert replayed.plan.sites == nm_compiled.plan.sites
    assert replayed.plan.passes["nm_weights"]["stats"] == nm_compiled.plan.passes["nm_weights"]["stats"]
    assert replayed.plan.passes["nm_weights"]["stats"]["rewritten"] == 6
    ids = torch.randint(0, 1000, (3, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for inputs in (example, (ids, torch.ones_like(ids))):
            assert torch.equal(replayed(*inputs), nm_compiled(*inputs))


def test_replay_does_not_change_the_plan_given(explicit, nm_compiled):
    model, example, _ = explicit
    before = json.dumps(nm_compiled.plan.to_json(), sort_keys=True)
    replayed = sg.compile(model, plan=nm_compiled.plan, example_inputs=example, quiet=True)
    assert json.dumps(nm_compiled.plan.to_json(), sort_keys=True) == before
    assert replayed.plan is not nm_compiled.plan


# -- every key of a plan is checked when it is read (found by tests/test_fuzz.py) ----------------------------


def _edited(good: dict, edit) -> dict:
    data = json.loads(json.dumps(good))
    edit(data)
    return data


def _saved(tmp_path, data) -> str:
    """`data` written as a plan file (the way a hand-edited plan reaches compile)."""
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data, allow_nan=True))
    return path


def _first_site(data):
    return next(iter(data["sites"]))


MALFORMED = [
    ("model-null", lambda d: d.update(model=None), "plan entry model: is null, expected a mapping"),
    ("model-no-fingerprint", lambda d: d["model"].pop("fingerprint"),
     "plan entry model: misses key 'fingerprint'"),
    ("model-sites-mapping", lambda d: d["model"].update(sites={}), "plan entry model['sites']: "
     "is mapping {}, expected a list"),
    ("model-site-id-int", lambda d: d["model"]["sites"][0].update(id=3),
     "plan entry model['sites'][0]['id']: is 3, expected a string"),
    ("model-site-twice", lambda d: d["model"]["sites"].append(d["model"]["sites"][0]),
     "plan entry model['sites'][6]['id']: repeats the id of model['sites'][0]"),
    ("versions-list", lambda d: d.update(versions=["0.1.0"]), "plan entry versions: is list ['0.1.0'], "
     "expected a mapping"),
    ("schema-bool", lambda d: d.update(schema_version=True), "plan schema version True is not supported"),
    ("schema-float", lambda d: d.update(schema_version=1.0), "plan schema version 1.0 is not supported"),
    ("unknown-top-key", lambda d: d.update(sitse={}), "unknown plan key 'sitse' (did you mean 'sites'?)"),
    ("pass-entry-list", lambda d: d["passes"].update(cost=[]), "plan entry passes['cost']: is list [], "
     "expected a mapping"),
    ("pass-kind", lambda d: d["passes"]["cost"].update(kind="analyse"), "plan entry passes['cost']['kind']: "
     "is 'analyse', not one of 'analysis', 'rewrite', 'recovery' (did you mean 'analysis'?)"),
    ("pass-unknown-key", lambda d: d["passes"]["cost"].update(option={}), "plan entry passes['cost']: "
     "has unknown key 'option' (did you mean 'options'?)"),
    ("stats-matched-str", lambda d: d["passes"]["cost"]["stats"].update(matched="6"),
     "plan entry passes['cost']['stats']['matched']: is string '6', expected an integer"),
    ("stats-negative", lambda d: d["passes"]["nm_weights"]["decided"].update(rewritten=-1),
     "plan entry passes['nm_weights']['decided']['rewritten']: is -1, outside [0, inf]"),
    ("refusal-without-reason", lambda d: d["passes"]["cost"]["stats"]["refused"].append({"site": "x"}),
     "plan entry passes['cost']['stats']['refused'][0]: misses key 'reason'"),
    ("site-entry-list", lambda d: d["sites"].update({_first_site(d): []}), "is list [], expected a mapping"),
    ("decision-list", lambda d: d["sites"]["mlp:blocks.0.mlp"]["nm_weights"].update(decision=[]),
     "plan entry sites['mlp:blocks.0.mlp']['nm_weights']['decision']: is list [], expected a mapping"),
    ("site-entry-unknown-key", lambda d: d["sites"]["mlp:blocks.0.mlp"]["nm_weights"].update(decison={}),
     "has unknown key 'decison' (did you mean 'decision'?)"),
    ("pass-not-recorded", lambda d: d["sites"]["mlp:blocks.0.mlp"].update(nm_weight={"decision": {}}),
     "is filed under pass 'nm_weight', which the plan's 'passes' does not record (did you mean "
     "'nm_weights'?)"),
    ("decision-of-an-analysis", lambda d: d["sites"]["mlp:blocks.0.mlp"]["cost"].update(decision={}),
     "is a decision of pass 'cost', whose entry passes['cost'] records no deciding"),
    ("config-backend-int", lambda d: d["config"].update(backend=3),
     "plan entry config: config 'backend' must be one of"),
    ("config-option", lambda d: d["config"]["passes"][1]["nm_weights"].update(n="2"),
     "plan entry config: passes[1]: option 'n' of pass 'nm_weights' must be int, got '2'"),
    ("evidence-nan",
     lambda d: d["sites"]["mlp:blocks.0.mlp"]["nm_weights"]["evidence"]["blocks.0.mlp.0"].update(
         kept_magnitude=float("nan")),
     "plan entry sites['mlp:blocks.0.mlp']['nm_weights']['evidence']['blocks.0.mlp.0']['kept_magnitude']: "
     "is nan"),
    ("non-string-key", lambda d: d["passes"]["cost"]["stats"]["counters"].update({3: 1}),
     "plan entry passes['cost']['stats']['counters']: has the key 3, not a string"),
]


@pytest.mark.parametrize("edit,message", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_plans_are_refused_naming_the_key(nm_compiled, edit, message):
    data = _edited(nm_compiled.plan.to_json(), edit)
    with pytest.raises(sg.PlanError) as err:
        SparsityPlan.from_json(data)
    assert message in str(err.value)
    assert "Fix:" in str(err.value) or "recompile" in str(err.value) or "did you mean" in str(err.value)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_in_plan_files_are_refused_naming_the_key(nm_compiled, tmp_path, constant):
    """Python's json reads NaN and Infinity; a NaN threshold replayed as a layer that keeps every input."""
    data = nm_compiled.plan.to_json()
    data["sites"]["mlp:blocks.1.mlp"]["nm_weights"]["evidence"]["blocks.1.mlp.2"]["kept_magnitude"] = "@"
    (tmp_path / "plan.json").write_text(json.dumps(data).replace('"@"', constant))
    with pytest.raises(sg.PlanError) as err:
        load_plan(tmp_path / "plan.json")
    assert (f"plan entry sites['mlp:blocks.1.mlp']['nm_weights']['evidence']['blocks.1.mlp.2']"
            f"['kept_magnitude']: is {constant}: a plan holds finite numbers only") in str(err.value)


def test_plan_files_that_cannot_be_read_are_refused(nm_compiled, tmp_path):
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(sg.PlanError, match="cannot read the plan file"):
        load_plan(tmp_path / "folder.json")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(sg.PlanError, match="is not a text file"):
        load_plan(tmp_path / "binary.json")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(sg.PlanError, match="nests JSON values too deeply"):
        load_plan(tmp_path / "deep.json")
    text = json.dumps(nm_compiled.plan.to_json())
    (tmp_path / "twice.json").write_text(text.replace('"schema_version": 1',
                                                      '"schema_version": 1, "schema_version": 1'))
    with pytest.raises(sg.PlanError, match="gives key 'schema_version' twice in one object"):
        load_plan(tmp_path / "twice.json")


def test_a_plan_that_is_neither_a_plan_nor_a_path_is_refused(explicit):
    model, example, _ = explicit
    with pytest.raises(sg.PlanError, match="plan must be a SparsityPlan, its JSON dict or the path of a "
                                           "saved plan, got int"):
        sg.compile(model, plan=3, example_inputs=example, quiet=True)


def test_a_plan_edited_in_memory_is_checked_before_use(explicit, nm_compiled):
    model, example, _ = explicit
    edited = SparsityPlan.from_json(_edited(nm_compiled.plan.to_json(), lambda d: None))
    edited.model = None
    with pytest.raises(sg.PlanError, match="plan entry model: is null"):
        sg.compile(model, plan=edited, example_inputs=example, quiet=True)
    edited = SparsityPlan.from_json(_edited(nm_compiled.plan.to_json(), lambda d: None))
    edited.sites["mlp:blocks.0.mlp"]["nm_weights"]["evidence"]["blocks.0.mlp.0"]["kept_magnitude"] = (
        float("inf"))
    with pytest.raises(sg.PlanError, match="is inf: a plan holds finite numbers only"):  # the reuse path too
        sg.compile(model, "nm-2-4", plan=edited, example_inputs=example, quiet=True)


@pytest.mark.parametrize("edit,message", [
    pytest.param(lambda d: d["config"]["passes"][1]["nm_weights"].update(n=1),
                 "plan entry passes['nm_weights']['options']: differs from the plan's config at ['n']",
                 id="option"),
    pytest.param(lambda d: d["config"]["passes"].pop(1),
                 "plan entry passes['nm_weights']: records pass 'nm_weights', which the plan's config "
                 "['cost'] does not run", id="pass-dropped"),
    pytest.param(lambda d: d["passes"]["cost"].update(kind="rewrite"),
                 "plan entry passes['cost']: has kind 'rewrite'; pass 'cost' is an analysis pass", id="kind"),
    pytest.param(lambda d: d["passes"].pop("cost") and d["sites"].update(
        {s: {k: v for k, v in e.items() if k != "cost"} for s, e in d["sites"].items()}),
                 "plan entry passes: has no entry for pass 'cost', which the plan's config runs",
                 id="pass-missing"),
])
def test_replay_refuses_a_plan_whose_passes_disagree_with_its_config(explicit, nm_compiled, tmp_path, edit,
                                                                     message):
    """Replay runs the plan's config with the recorded decisions: an edit of one and not the other would
    replay into a model the plan does not describe (n=1 in the config, 2:4 weights in the graph)."""
    model, example, _ = explicit
    data = _edited(nm_compiled.plan.to_json(), edit)
    with pytest.raises(sg.PlanError) as err:
        sg.compile(model, plan=_saved(tmp_path, data), example_inputs=example, quiet=True)
    assert message in str(err.value)


# -- facts a plan supplies to a config are checked as strictly -----------------------------------------------


@pytest.fixture(scope="module")
def profiled(explicit):
    """explicit_attention's activation profile (a plan of facts only)."""
    model, example, _ = explicit
    g = torch.Generator().manual_seed(2)
    batches = [(ids, torch.ones_like(ids))
               for ids in (torch.randint(0, 1000, (2, 32), generator=g) for _ in range(2))]
    return sg.compile(model, {"passes": ["activation_profile"]}, example_inputs=example, calibration=batches,
                      quiet=True).plan.to_json()


@pytest.mark.parametrize("config,edit,message", [
    pytest.param({"neuron_sparsity": {"target": 0.5}},
                 lambda e: e.update(centre=e["centre"][:-1]),
                 "['activation_profile']['evidence']['down_input']['centre']: has 511 items, 512 expected",
                 id="centre"),
    pytest.param({"neuron_sparsity": {"target": 0.5}},
                 lambda e: e["thresholds"]["centred"].update({"0.5": -1.0}),
                 "['thresholds']['centred']['0.5']: is -1.0, outside [0.0, inf]", id="threshold"),
    pytest.param({"neuron_sparsity": {"target": 0.5}},
                 lambda e: e["thresholds"]["centred"].update({"half": 0.1}),
                 "the key 'half' is not a sparsity in [0, 1]", id="threshold-key"),
    pytest.param({"neuron_pruning": {"fraction": 0.5}}, lambda e: e.update(rms=None),
                 "['down_input']['rms']: is null, expected a list", id="rms"),
    pytest.param({"neuron_pruning": {"fraction": 0.5}}, lambda e: e.update(hot=[0, 0]),
                 "['down_input']['hot'][1]: neuron 0 appears twice", id="hot"),
    pytest.param({"neuron_pruning": {"fraction": 0.5}}, lambda e: e.pop("mean"),
                 "['down_input']: misses key 'mean'", id="mean-missing"),
])
def test_reused_facts_are_checked_against_the_graph(explicit, profiled, tmp_path, config, edit, message):
    model, example, _ = explicit
    data = json.loads(json.dumps(profiled))
    edit(data["sites"]["mlp:blocks.1.mlp"]["activation_profile"]["evidence"]["down_input"])
    with pytest.raises(sg.PlanError) as err:
        sg.compile(model, {"passes": ["activation_profile", config]}, plan=_saved(tmp_path, data),
                   example_inputs=example, quiet=True)
    assert "plan entry sites['mlp:blocks.1.mlp']" in str(err.value) and message in str(err.value)
    assert "profile again" in str(err.value)


def test_reused_facts_for_a_site_the_graph_lacks_are_refused(explicit, profiled, tmp_path):
    model, example, _ = explicit
    data = json.loads(json.dumps(profiled))
    data["sites"]["mlp:elsewhere"] = data["sites"]["mlp:blocks.1.mlp"]
    with pytest.raises(sg.PlanError, match="plan entry sites\\['mlp:elsewhere'\\]\\['activation_profile'\\]"
                                           "\\['evidence'\\]: names 'mlp:elsewhere', which is not an MLP"):
        sg.compile(model, {"passes": ["activation_profile", "neuron_pruning"]}, plan=_saved(tmp_path, data),
                   example_inputs=example, quiet=True)


@pytest.fixture(scope="module")
def roi_plan():
    """The digits ViT with RoIs read at block 3 and RoI tokens kept from block 4 on."""
    from sparsegraph.models import digits_vit

    model, example = sg.models.load("digits_vit")
    config = {"passes": ["roi", {"token_pruning": {"layers": [4], "select": "roi"}}]}
    cm = sg.compile(model, config, example_inputs=example,
                    calibration=[(digits_vit.dataset("train").images[:64],)], quiet=True)
    return model, example, cm.plan.to_json()


@pytest.mark.parametrize("edit,message", [
    pytest.param(lambda d: d["sites"]["attn:blocks.3.attn"]["roi"]["evidence"].update(grid=5),
                 "['roi']['evidence']['grid']: 1 protected + 5² patches are not the 65 tokens", id="grid"),
    pytest.param(lambda d: d["sites"]["attn:blocks.3.attn"]["roi"]["evidence"].update(patch=0),
                 "['roi']['evidence']['patch']: is 0", id="patch"),
    pytest.param(
        lambda d: d["sites"]["attn:blocks.3.attn"]["roi"]["evidence"].update(layers=["attn:blocks.5.attn"]),
        "['roi']['evidence']['layers'][0]: must be an attention site at or before", id="later-layer"),
    pytest.param(lambda d: d["passes"]["roi"]["summary"].update(site="attn:blocks.0.attn"),
                 "passes['roi']['summary']['site']: names 'attn:blocks.0.attn', for which the plan holds no "
                 "roi evidence", id="summary-site"),
    pytest.param(
        lambda d: d["sites"]["attn:blocks.4.attn"]["token_pruning"]["decision"]["roi"].update(grid=7),
        "['token_pruning']['decision']['roi']['grid']: 1 protected + 7² patches are not the 65 tokens",
        id="decision-grid"),
])
def test_roi_settings_from_a_plan_are_checked(roi_plan, tmp_path, edit, message):
    """What `CompiledModel.roi` and the RoI token selection replay: refused when it cannot fit the graph
    (before, the replay ran and `cm.roi` failed or drew boxes on the wrong grid later)."""
    model, example, data = roi_plan
    with pytest.raises(sg.PlanError) as err:
        sg.compile(model, plan=_saved(tmp_path, _edited(data, edit)), example_inputs=example, quiet=True)
    assert message in str(err.value)
