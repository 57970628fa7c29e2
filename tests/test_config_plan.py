"""Config (dict/YAML/JSON/named, did-you-mean errors, overrides) and plan (JSON round-trip, refusal)."""

import json

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsegraph as sg
from sparsegraph import models, pipelines
from sparsegraph.config import Config
from sparsegraph.plan import SparsityPlan, load_plan

CONFIG = {"passes": ["cost", {"nm_weights": {"n": 1, "m": 4}}],
          "overrides": {"blocks.0.*": {"nm_weights": {"n": 2}}}, "backend": "eager"}


@pytest.mark.parametrize("fmt", ["dict", "yaml", "json"])
def test_config_sources_agree(fmt, tmp_path):
    if fmt == "dict":
        cfg = Config.load(CONFIG)
    else:
        path = tmp_path / f"c.{fmt}"
        path.write_text(yaml.safe_dump(CONFIG) if fmt == "yaml" else json.dumps(CONFIG))
        cfg = Config.load(path)
    assert [p.name for p in cfg.passes] == ["cost", "nm_weights"] and cfg.backend == "eager"
    assert cfg.passes[1].n == 1 and cfg.to_dict()["overrides"] == CONFIG["overrides"]


def test_named_pipelines_are_configs():
    for name in pipelines.names():
        cfg = Config.load(name)
        assert Config.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("data,message", [
    ({"pases": []}, "unknown config key 'pases' (did you mean 'passes'?)"),
    ({"passes": ["nm_weight"]}, "unknown pass 'nm_weight' (did you mean 'nm_weights'?)"),
    ({"passes": [{"nm_weights": {"nn": 2}}]}, "has no option 'nn' (did you mean 'n'?)"),
    ({"passes": [{"nm_weights": {"n": 0}}]}, "option 'n' of pass 'nm_weights' is 0, outside [1, inf]"),
    ({"passes": [{"nm_weights": {"n": "two"}}]}, "option 'n' of pass 'nm_weights' must be int"),
    ({"passes": [{"cost": {}}], "backend": "triton2"}, "(did you mean 'triton'?)"),
    ({"passes": ["cost"], "overrides": {"a.*": {"nm_weights": {}}}}, "names pass 'nm_weights', which is not"),
    ({"passes": ["cost", "cost"]}, "appears twice"),
])
def test_bad_configs_name_the_key_and_the_fix(data, message):
    with pytest.raises(sg.ConfigError) as err:
        Config.from_dict(data)
    assert message in str(err.value)


def test_unknown_pipeline_name_suggests_one():
    with pytest.raises(sg.ConfigError, match=r"did you mean 'analyze'"):
        Config.load("analyse")


def test_overrides_apply_by_glob_in_order():
    cfg = Config.from_dict(CONFIG)
    nm = cfg.passes[1]
    assert cfg.for_site(nm, "mlp:blocks.0.mlp", "blocks.0.mlp").n == 2
    assert cfg.for_site(nm, "mlp:blocks.1.mlp", "blocks.1.mlp").n == 1


configs = st.builds(
    lambda cost, nm, top, n, extra, backend: {
        "passes": ([{"cost": {"top": top}}] if cost else []) + ([{"nm_weights": {"n": n, "m": n + extra}}] if nm else []),
        "backend": backend},
    st.booleans(), st.booleans(), st.integers(0, 50), st.integers(1, 8), st.integers(0, 8),
    st.sampled_from(["auto", "eager", "triton", "onnx"]))


@settings(max_examples=60, deadline=None)
@given(configs)
def test_config_round_trips(data):
    cfg = Config.from_dict(data)
    assert Config.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# -- plan -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def explicit_plan():
    model, example = models.load("explicit_attention")
    return model, example, sg.compile(model, "nm-2-4", example_inputs=example, quiet=True)


def test_plan_round_trips_exactly(explicit_plan, tmp_path):
    _, _, cm = explicit_plan
    path = cm.plan.save(tmp_path / "plan.json")
    again = load_plan(path)
    assert again.to_json() == cm.plan.to_json()
    assert again.schema_version == 1 and again.versions["torch"] and again.model["fingerprint"]
    site = next(s for s in again.sites if s.startswith("mlp:"))
    assert set(again.sites[site]["nm_weights"]) == {"decision", "evidence"}


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.text(max_size=8)
                           | st.floats(allow_nan=False, allow_infinity=False),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                        max_size=4), max_leaves=12)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=10), json_values, max_size=5))
def test_any_json_evidence_round_trips(evidence):
    plan = SparsityPlan(model={"class": "M", "fingerprint": "f", "sites": []}, config={"passes": []})
    plan.set_evidence("some_pass", "mlp:x", evidence)
    assert SparsityPlan.from_json(json.loads(json.dumps(plan.to_json()))).to_json() == plan.to_json()


def test_replay_reproduces_the_outputs_without_deciding(explicit_plan, tmp_path, monkeypatch):
    model, example, cm = explicit_plan
    path = cm.plan.save(tmp_path / "plan.json")
    from sparsegraph.passes.rewrite.nm_weights import NMWeights

    monkeypatch.setattr(NMWeights, "decide", lambda *a: pytest.fail("decide ran on replay"))
    again = sg.compile(model, plan=path, example_inputs=example, quiet=True)
    assert (again(*example) == cm(*example)).all()
    assert again.plan.sites == cm.plan.sites


def test_plan_for_another_model_is_refused(explicit_plan, tmp_path):
    _, _, cm = explicit_plan
    path = cm.plan.save(tmp_path / "plan.json")
    other, example = models.load("minilm")
    with pytest.raises(sg.PlanError) as err:
        sg.compile(other, plan=path, example_inputs=example, quiet=True)
    message = str(err.value)
    assert "different model" in message and "ExplicitTransformer" in message and "sites in the" in message


def test_bad_plan_files_are_refused(tmp_path, explicit_plan):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(sg.PlanError, match="not valid JSON"):
        load_plan(tmp_path / "x.json")
    data = explicit_plan[2].plan.to_json() | {"schema_version": 99}
    (tmp_path / "v.json").write_text(json.dumps(data))
    with pytest.raises(sg.PlanError, match="schema version 99"):
        load_plan(tmp_path / "v.json")
    with pytest.raises(sg.PlanError, match="no plan file"):
        load_plan(tmp_path / "missing.json")
