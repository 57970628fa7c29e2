"""`SparsityPlan`: exact JSON round-trips, refusal of plans for other models or other schema versions,
and replay: compiling from a saved plan reproduces the rewrites exactly without deciding again."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsegraph as sg
from sparsegraph import pipelines
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
    assert data["config"] == pipelines.get("nm-2-4").to_dict()
    assert {name: entry["kind"] for name, entry in data["passes"].items()} == {"cost": "analysis",
                                                                             "nm_weights": "rewrite"}
    for i in range(3):
        entry = data["sites"][f"mlp:blocks.{i}.mlp"]["nm_weights"]
        assert entry["decision"] == {f"blocks.{i}.mlp.0": {"n": 2, "m": 4}, f"blocks.{i}.mlp.2": {"n": 2, "m": 4}}
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


# -- refusal ---------------------------------------------------------------------------------------------------


def test_plan_for_another_model_is_refused_naming_the_difference(minilm, explicit, tmp_path):
    model, example, _ = minilm
    path = sg.compile(model, "analyze", example_inputs=example, quiet=True).plan.save(tmp_path / "minilm.json")
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


# -- replay ----------------------------------------------------------------------------------------------------


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
