"""`Config`: loaded from a dict, a YAML or JSON file, or a named pipeline; every bad key or value is an
error naming it (with a did-you-mean); per-site overrides by glob; round-trips through dict and JSON."""

import json

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsegraph as sg
from sparsegraph import pipelines
from sparsegraph.config import Config
from sparsegraph.passes.rewrite.nm_weights import LINEAR_ROLES

CONFIG = {
    "passes": ["cost", {"nm_weights": {"n": 1, "m": 4, "roles": ["mlp.up", "mlp.down"]}}],
    "overrides": {"blocks.0.*": {"nm_weights": {"n": 2}}, "mlp:blocks.2.mlp": {"nm_weights": {"n": 3}}},
    "backend": "eager",
}


def _check_loaded(cfg: Config):
    assert [p.name for p in cfg.passes] == ["cost", "nm_weights"]
    cost, nm = cfg.passes
    assert cost.top == 10  # default
    assert (nm.n, nm.m, nm.roles) == (1, 4, ("mlp.up", "mlp.down"))  # lists become tuples
    assert cfg.backend == "eager"
    assert cfg.to_dict() == {
        "passes": [{"cost": {"top": 10}}, {"nm_weights": {"n": 1, "m": 4, "roles": ["mlp.up", "mlp.down"],
                                                          "schedule": "one-shot", "ramp": 0.5,
                                                          "score": "magnitude"}}],
        "overrides": CONFIG["overrides"], "backend": "eager"}


def test_config_from_dict():
    _check_loaded(Config.from_dict(CONFIG))
    _check_loaded(Config.load(CONFIG))


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_config_from_file(tmp_path, suffix):
    path = tmp_path / f"pipeline{suffix}"
    path.write_text(json.dumps(CONFIG, indent=2) if suffix == ".json" else yaml.safe_dump(CONFIG))
    _check_loaded(Config.load(path))
    _check_loaded(Config.load(str(path)))


def test_config_object_passes_through():
    cfg = Config.from_dict(CONFIG)
    assert Config.load(cfg) is cfg
    assert Config.load(None) == Config() and Config().passes == () and Config().backend == "auto"


def test_named_pipelines():
    names = pipelines.names()
    assert {"dense", "analyze", "nm-2-4"} <= set(names)
    assert Config.load("dense").passes == ()
    assert [p.name for p in Config.load("analyze").passes] == ["cost"]
    nm = Config.load("nm-2-4").passes[-1]
    assert (nm.name, nm.n, nm.m) == ("nm_weights", 2, 4)
    for name in names:
        cfg = Config.load(name)
        assert isinstance(cfg, Config)
        assert Config.from_dict(cfg.to_dict()) == cfg, name
        assert pipelines.describe()[name], f"pipeline {name} has no docstring"


@pytest.mark.parametrize("data,message", [
    pytest.param({"pases": ["cost"]}, "unknown config key 'pases' (did you mean 'passes'?)", id="top-key"),
    pytest.param({"passes": ["cost"], "backend": "trition"}, "(did you mean 'triton'?)", id="backend"),
    pytest.param({"passes": ["nm_weight"]}, "unknown pass 'nm_weight' (did you mean 'nm_weights'?)",
                 id="pass-name"),
    pytest.param({"passes": [{"cots": {}}]}, "unknown pass 'cots' (did you mean 'cost'?)",
                 id="pass-name-mapping"),
    pytest.param({"passes": [{"nm_weights": {"rols": ["mlp.up"]}}]},
                 "pass 'nm_weights' has no option 'rols' (did you mean 'roles'?)", id="option"),
    pytest.param({"passes": [{"cost": {"topp": 3}}]},
                 "pass 'cost' has no option 'topp' (did you mean 'top'?)", id="option-cost"),
    pytest.param({"passes": [{"nm_weights": {"n": 0}}]},
                 "option 'n' of pass 'nm_weights' is 0, outside [1, inf]", id="below-range"),
    pytest.param({"passes": [{"cost": {"top": -1}}]}, "option 'top' of pass 'cost' is -1, outside [0, inf]",
                 id="below-range-cost"),
    pytest.param({"passes": [{"nm_weights": {"n": 3, "m": 2}}]}, "n=3 must not exceed m=2", id="n-above-m"),
    pytest.param({"passes": [{"nm_weights": {"n": "two"}}]},
                 "option 'n' of pass 'nm_weights' must be int, got 'two'", id="type-str"),
    pytest.param({"passes": [{"nm_weights": {"n": 2.0}}]},
                 "option 'n' of pass 'nm_weights' must be int, got 2.0", id="type-float"),
    pytest.param({"passes": [{"cost": {"top": True}}]}, "option 'top' of pass 'cost' must be int, got True",
                 id="type-bool"),
    pytest.param({"passes": [{"nm_weights": {"roles": ["mlp.upp"]}}]},
                 "roles ['mlp.upp'] are not linear roles", id="bad-role"),
    pytest.param({"passes": ["cost"], "overrides": {"blocks.*": {"nm_weights": {"n": 1}}}},
                 "overrides['blocks.*'] names pass 'nm_weights', which is not in the pipeline",
                 id="override-pass"),
    pytest.param({"passes": ["nm_weights"], "overrides": {"blocks.*": {"nm_weights": {"mm": 8}}}},
                 "overrides['blocks.*']['nm_weights']: pass 'nm_weights' has no option 'mm' "
                 "(did you mean 'm'?)", id="override-option"),
    pytest.param({"passes": ["nm_weights"], "overrides": {"blocks.*": {"nm_weights": {"n": 0}}}},
                 "option 'n' of pass 'nm_weights' is 0", id="override-range"),
    pytest.param({"passes": ["cost", "cost"]}, "pass 'cost' appears twice", id="duplicate"),
    pytest.param({"passes": "cost"}, "config 'passes' must be a list", id="passes-not-list"),
    pytest.param({"passes": [{"cost": {}, "nm_weights": {}}]},
                 "passes[0] must be a pass name or a one-key mapping", id="two-key-item"),
    pytest.param({"passes": [{"cost": 3}]}, "options of pass 'cost' must be a mapping",
                 id="options-not-mapping"),
])
def test_bad_config_is_an_error_naming_the_key(data, message):
    with pytest.raises(sg.ConfigError) as err:
        Config.from_dict(data)
    assert message in str(err.value)


def test_bad_sources_are_errors(tmp_path):
    with pytest.raises(sg.ConfigError) as err:
        Config.load("analyse")
    assert str(err.value) == ("config 'analyse' is neither a file nor a named pipeline (did you mean "
                              "'analyze'?)")
    with pytest.raises(sg.ConfigError, match="does not exist"):
        Config.load(tmp_path / "missing.yaml")
    (tmp_path / "bad.json").write_text("{passes: [")
    with pytest.raises(sg.ConfigError, match="is not valid JSON"):
        Config.load(tmp_path / "bad.json")
    (tmp_path / "bad.yaml").write_text("passes: [cost\n")
    with pytest.raises(sg.ConfigError, match="is not valid YAML"):
        Config.load(tmp_path / "bad.yaml")
    with pytest.raises(sg.ConfigError, match="a config is a mapping"):
        Config.from_dict(["cost"])
    with pytest.raises(sg.ConfigError, match="config must be a dict, a path or a Config, got int"):
        Config.load(3)


def test_for_site_applies_matching_overrides_in_order():
    cfg = Config.from_dict({
        "passes": ["cost", {"nm_weights": {"n": 1, "m": 4}}],
        "overrides": {"blocks.*": {"nm_weights": {"n": 2}},
                      "blocks.1.*": {"nm_weights": {"n": 3, "roles": ["mlp.down"]}},  # later wins
                      "attn:*": {"nm_weights": {"m": 8}}},  # globs also match the site id
    })
    cost, nm = cfg.passes
    assert cfg.for_site(nm, "mlp:blocks.0.mlp", "blocks.0.mlp").n == 2
    one = cfg.for_site(nm, "mlp:blocks.1.mlp", "blocks.1.mlp")
    assert (one.n, one.m, one.roles) == (3, 4, ("mlp.down",))
    attn = cfg.for_site(nm, "attn:blocks.1.attn", "blocks.1.attn")
    assert (attn.n, attn.m) == (3, 8)
    assert cfg.for_site(nm, "mlp:head", "head") is nm  # nothing matches: the pass itself
    assert cfg.for_site(cost, "mlp:blocks.0.mlp", "blocks.0.mlp") is cost  # no override for this pass
    assert nm.n == 1  # the pipeline's pass is unchanged (frozen)


# -- property: random valid configs round-trip --------------------------------------------------------------

roles = st.lists(st.sampled_from(LINEAR_ROLES), min_size=1, max_size=len(LINEAR_ROLES), unique=True)


@st.composite
def nm_options(draw):
    m = draw(st.integers(1, 16))
    options = {"n": draw(st.integers(1, m)), "m": m}
    if draw(st.booleans()):
        options["roles"] = draw(roles)
    return options


cost_options = st.fixed_dictionaries({}, optional={"top": st.integers(0, 1000)})
globs = st.sampled_from(["*", "blocks.*", "blocks.0.*", "encoder.layer.?.attention", "mlp:*",
                         "attn:blocks.[01].attn"])


@st.composite
def configs(draw):
    passes = []
    if draw(st.booleans()):
        passes.append({"cost": draw(cost_options)})
    if draw(st.booleans()):
        passes.append({"nm_weights": draw(nm_options())})
    names = [next(iter(p)) for p in passes]
    overrides = {}
    if "nm_weights" in names:
        for glob in draw(st.lists(globs, max_size=3, unique=True)):
            overrides[glob] = {"nm_weights": draw(nm_options())}
    data = {"passes": passes, "backend": draw(st.sampled_from(["auto", "eager", "triton", "onnx"]))}
    if overrides or draw(st.booleans()):
        data["overrides"] = overrides
    return data


@settings(max_examples=80, deadline=None)
@given(configs())
def test_random_valid_configs_round_trip(data):
    cfg = Config.from_dict(data)
    as_dict = cfg.to_dict()
    assert Config.from_dict(as_dict).to_dict() == as_dict
    assert Config.from_dict(as_dict) == cfg
    assert Config.from_dict(json.loads(json.dumps(as_dict))) == cfg
    assert Config.from_dict(yaml.safe_load(yaml.safe_dump(as_dict))) == cfg
    # the dict form states every option, so it is a complete, self-contained config
    for item, p in zip(as_dict["passes"], cfg.passes):
        assert item == {p.name: p.options()}
    assert as_dict["overrides"] == data.get("overrides", {})


# -- wrongly typed values are refused by name, before anything uses them (found by tests/test_fuzz.py) -------


@pytest.mark.parametrize("data,message", [
    pytest.param({"passes": ["cost"], "backend": float("nan")}, "config 'backend' must be one of",
                 id="backend-nan"),
    pytest.param({"passes": ["cost"], "backend": None}, "config 'backend' must be one of", id="backend-null"),
    pytest.param({"passes": ["cost"], "backend": ["eager"]}, "config 'backend' must be one of",
                 id="backend-list"),
    pytest.param({3: ["cost"]}, "unknown config key 3", id="top-key-int"),
    pytest.param({"passes": 0}, "config 'passes' must be a list", id="passes-zero"),
    pytest.param({"passes": {}}, "config 'passes' must be a list", id="passes-empty-mapping"),
    pytest.param({"passes": [{1: {}}]}, "passes[0]: 1 is not a pass name", id="pass-name-int"),
    pytest.param({"passes": [{"cost": {1: 2}}]}, "pass 'cost': 1 is not an option name",
                 id="option-name-int"),
    pytest.param({"passes": ["cost"], "overrides": "blocks.*"}, "config 'overrides' must map globs",
                 id="overrides-str"),
    pytest.param({"passes": ["cost"], "overrides": [["blocks.*", {}]]}, "config 'overrides' must map globs",
                 id="overrides-pairs"),
    pytest.param({"passes": ["nm_weights"], "overrides": {0: {"nm_weights": {"n": 1}}}},
                 "overrides key 0 must be a glob string", id="override-glob-int"),
    pytest.param({"passes": ["nm_weights"], "overrides": {"blocks.*": {2: {}}}},
                 "overrides['blocks.*'] key 2 must be a pass name", id="override-pass-int"),
    pytest.param({"passes": ["nm_weights"], "overrides": {"blocks.*": {"nm_weights": ["n"]}}},
                 "the options of pass 'nm_weights' must be a mapping", id="override-options-list"),
    pytest.param({"passes": ["nm_weights"], "overrides": {"blocks.*": {"nm_weights": None}}},
                 "the options of pass 'nm_weights' must be a mapping", id="override-options-null"),
    pytest.param({"passes": ["nm_weights"], "overrides": {"blocks.*": {"nm_weights": {None: 1}}}},
                 "None is not an option name", id="override-option-name-null"),
])
def test_wrongly_typed_config_values_are_errors_naming_the_key(data, message):
    with pytest.raises(sg.ConfigError) as err:
        Config.from_dict(data)
    assert message in str(err.value)


@pytest.mark.parametrize("item,message", [
    pytest.param({"neuron_sparsity": {"target": float("nan")}}, "option 'target' of pass 'neuron_sparsity' "
                 "must be a finite number, got nan", id="nan-target"),
    pytest.param({"speed_check": {"min_speedup": float("inf")}}, "option 'min_speedup' of pass 'speed_check' "
                 "must be a finite number, got inf", id="inf-speedup"),
    pytest.param({"activation_profile": {"targets": [0.5, float("nan")]}}, "option 'targets' of pass "
                 "'activation_profile' must be a finite number", id="nan-in-tuple"),
    # values that would silently do nothing, or something else than they say
    pytest.param({"token_pruning": {"layers": [2], "keep": 0.0}}, "option 'keep' of pass 'token_pruning' "
                 "is 0.0, outside [0.001, 1.0]", id="keep-zero"),
    pytest.param({"token_pruning": {"layers": [2], "keep": 0.0004}}, "outside [0.001, 1.0]",
                 id="keep-rounds-to-zero"),
    pytest.param({"token_pruning": {"layers": []}}, "option 'layers' of pass 'token_pruning' is empty",
                 id="no-layers"),
    pytest.param({"token_pruning": {}}, "option 'layers' of pass 'token_pruning' is empty",
                 id="layers-default"),
    pytest.param({"token_pruning": {"layers": [2, -1]}}, "option 'layers' of pass 'token_pruning' holds -1, "
                 "outside [0, inf]", id="negative-layer"),
    pytest.param({"activation_profile": {"targets": [0.5, 1.5]}}, "option 'targets' of pass "
                 "'activation_profile' holds 1.5, outside [0.0, 1.0]", id="target-above-one"),
    pytest.param({"token_importance": {"keeps": [0.7, 0.0]}}, "option 'keeps' of pass 'token_importance' "
                 "holds 0.0", id="keeps-zero"),
    pytest.param({"head_patterns": {"recall": 0.0}}, "option 'recall' of pass 'head_patterns' is 0.0, "
                 "outside [0.001, 1.0]", id="recall-zero"),
    pytest.param({"head_patterns": {"patterns": []}}, "option 'patterns' of pass 'head_patterns' is empty",
                 id="no-patterns"),
])
def test_option_values_that_mean_nothing_are_errors(item, message):
    with pytest.raises(sg.ConfigError) as err:
        Config.from_dict({"passes": [item]})
    assert message in str(err.value)


@pytest.mark.parametrize("options,message", [
    pytest.param({"neuron_sparsity": {"target": float("nan")}}, "must be a finite number, got nan", id="nan"),
    pytest.param({"token_pruning": {"keep": 0.0}}, "option 'keep' of pass 'token_pruning' is 0.0",
                 id="keep-zero"),
    pytest.param({"token_pruning": {"layers": []}}, "option 'layers' of pass 'token_pruning' is empty",
                 id="layers"),
])
def test_option_values_that_mean_nothing_are_errors_in_overrides_too(options, message):
    passes = ["activation_profile", "neuron_sparsity", {"token_pruning": {"layers": [1]}}]
    with pytest.raises(sg.ConfigError) as err:
        Config.from_dict({"passes": passes, "overrides": {"blocks.0.*": options}})
    assert message in str(err.value) and "overrides['blocks.0.*']" in str(err.value)


def test_unreadable_config_files_are_errors(tmp_path):
    (tmp_path / "folder.yaml").mkdir()
    with pytest.raises(sg.ConfigError, match="cannot read the config file"):
        Config.load(tmp_path / "folder.yaml")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(sg.ConfigError, match="is not a text file"):
        Config.load(tmp_path / "binary.json")
    with pytest.raises(sg.ConfigError, match="cannot read the config file"):
        Config.load("pipeline\x00.yaml")
    with pytest.raises(sg.ConfigError, match="is neither a file nor a named pipeline"):
        Config.load("pipeline\x00")
    (tmp_path / "nan.yaml").write_text("passes:\n  - neuron_sparsity: {target: .nan}\n")
    with pytest.raises(sg.ConfigError, match="must be a finite number"):
        Config.load(tmp_path / "nan.yaml")
    # `passes:` alone is an empty pipeline
    (tmp_path / "empty_passes.yaml").write_text("passes:\nbackend: eager\n")
    assert Config.load(tmp_path / "empty_passes.yaml").passes == ()
