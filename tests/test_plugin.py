"""A pass from a separately installed package (examples/plugin_pass), found by name through the
``sparsegraph.passes`` entry-point group, validated and run like a built-in."""

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import sparsegraph as sg
from sparsegraph import registry

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plugin_pass"
PLUGIN = "near_zero_rows"
PACKAGE = "sparsegraph_near_zero"


def _forget_plugin():
    registry._REGISTRY.pop(PLUGIN, None)  # the class registry caches what an entry point loaded
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
        del sys.modules[name]
    importlib.invalidate_caches()  # also drops importlib.metadata's cached view of sys.path


def test_plugin_is_unknown_before_it_is_installed():
    assert PLUGIN not in sg.available_passes()
    with pytest.raises(sg.ConfigError, match=f"unknown pass '{PLUGIN}'"):
        registry.get_pass(PLUGIN)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The example package pip-installed into a temporary directory that is put on sys.path."""
    root = tmp_path_factory.mktemp("plugin")
    source, target = root / "src", root / "site"
    # build from a copy, so that setuptools' build/ and egg-info land in the temporary directory
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True)
    assert list(target.glob("sparsegraph_near_zero-*.dist-info/entry_points.txt"))
    _forget_plugin()
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    try:
        yield target
    finally:
        sys.path.remove(str(target))
        _forget_plugin()
    assert PLUGIN not in sg.available_passes()  # nothing of the plugin outlives the module


class NearZeroNet(torch.nn.Module):
    """An MLP site (mlp.0 → GELU → mlp.2), a head outside any site, and a linear with a computed weight.

    head: 3 of 5 rows exactly zero (share 0.6); mlp.0: 4 of 10 rows at 1e-7 (share 0.4, near zero at the
    default atol 1e-6 but not at 1e-8); mlp.2: no zero rows.
    """

    def __init__(self):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(8, 10), torch.nn.GELU(), torch.nn.Linear(10, 8))
        self.head = torch.nn.Linear(8, 5)
        self.proj = torch.nn.Parameter(torch.randn(4, 8))
        with torch.no_grad():
            self.head.weight[1:4] = 0.0
            self.mlp[0].weight[:4] = 1e-7

    def forward(self, x):
        h = x + self.mlp(x)
        return self.head(h), F.linear(h, self.proj * 2.0)


@pytest.fixture
def net():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = NearZeroNet().eval()
    return model, (torch.randn(3, 8, generator=torch.Generator().manual_seed(1)),)


def _run(net, **options):
    model, example = net
    return sg.compile(model, {"passes": [{PLUGIN: options}]}, example_inputs=example, quiet=True)


def test_installed_plugin_is_listed_and_loaded_by_name(installed):
    assert PLUGIN in sg.available_passes()
    cls = registry.get_pass(PLUGIN)
    assert cls.__module__ == "sparsegraph_near_zero.near_zero_rows"
    assert Path(sys.modules[cls.__module__].__file__).is_relative_to(installed)  # the installed copy
    assert cls.name == PLUGIN and issubclass(cls, sg.AnalysisPass)
    assert cls().options() == {"fraction": 0.5, "atol": 1e-6}


def test_plugin_flags_exactly_the_mostly_zero_layer(installed, net):
    cm = _run(net, fraction=0.4)
    plan = cm.plan
    stats = plan.passes[PLUGIN]["stats"]
    assert plan.passes[PLUGIN]["kind"] == "analysis"
    assert plan.passes[PLUGIN]["options"] == {"fraction": 0.4, "atol": 1e-6}
    assert stats["matched"] == 3 and stats["rewritten"] == 0
    assert stats["counters"] == {"flagged": ["head"]}
    assert [r["reason"] for r in stats["refused"]] == ["weight is computed in the graph"]
    assert plan.summary(PLUGIN) == {"flagged": ["head"], "fraction": 0.4, "atol": 1e-6}
    # layers of a site are keyed by the site; the head, outside any site, by its module path
    (site,) = sg.ir.mlp_sites(cm.graph_module)
    assert site.id == "mlp:mlp"
    assert plan.evidence(PLUGIN, "mlp:mlp") == {
        "mlp.0": {"rows": 10, "near_zero_rows": 4, "share": 0.4},  # 0.4 is not more than 0.4
        "mlp.2": {"rows": 8, "near_zero_rows": 0, "share": 0.0}}
    assert plan.evidence(PLUGIN, "head") == {"head": {"rows": 5, "near_zero_rows": 3, "share": 0.6}}


def test_plugin_contributes_its_report_section(installed, net):
    """The report asks each pass for its section: the plugin's table shows like a built-in's, flagged first,
    in the compiled model's report and in a saved plan's."""
    from sparsegraph.report import Report

    cm = _run(net, fraction=0.4)
    for report in (cm.report(), Report.of_plan(cm.plan)):
        (table,) = [t for t in report.tables if t.title == "Near-zero weight rows per linear layer"]
        assert [row[:4] for row in table.rows] == [["head", "head", 5, 3], ["mlp:mlp", "mlp.0", 10, 4],
                                                   ["mlp:mlp", "mlp.2", 8, 0]]
        assert "Near-zero weight rows" in report.to_markdown()


def test_plugin_options_move_the_verdict(installed, net):
    assert _run(net, fraction=0.3).plan.summary(PLUGIN)["flagged"] == ["mlp.0", "head"]
    strict = _run(net, fraction=0.3, atol=1e-8).plan
    assert strict.summary(PLUGIN)["flagged"] == ["head"]
    assert strict.evidence(PLUGIN, "mlp:mlp")["mlp.0"]["near_zero_rows"] == 0
    assert _run(net).plan.summary(PLUGIN)["flagged"] == ["head"]  # default fraction 0.5
    assert _run(net, fraction=0.6).plan.summary(PLUGIN)["flagged"] == []


def test_plugin_leaves_the_model_alone(installed, net):
    model, example = net
    cm = _run(net, fraction=0.4)
    assert "near_zero" not in cm.graph_module.code
    with torch.no_grad():
        for got, want in zip(cm(*example), model(*example)):
            assert torch.equal(got, want)


def test_plugin_options_are_validated_like_builtins(installed):
    with pytest.raises(sg.ConfigError, match=r"has no option 'fractoin' \(did you mean 'fraction'\?\)"):
        sg.Config.from_dict({"passes": [{PLUGIN: {"fractoin": 0.4}}]})
    with pytest.raises(sg.ConfigError,
                       match=r"option 'fraction' of pass 'near_zero_rows' is 1.5, outside \[0.0, 1.0\]"):
        sg.Config.from_dict({"passes": [{PLUGIN: {"fraction": 1.5}}]})
    with pytest.raises(sg.ConfigError, match="option 'atol' of pass 'near_zero_rows' must be float"):
        sg.Config.from_dict({"passes": [{PLUGIN: {"atol": "tiny"}}]})
    with pytest.raises(sg.ConfigError,
                       match=r"unknown pass 'near_zero_row' \(did you mean 'near_zero_rows'\?\)"):
        sg.Config.from_dict({"passes": ["near_zero_row"]})
