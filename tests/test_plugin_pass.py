"""A pass from a separately installed package, found through the entry-point group by name."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparsegraph as sg
from sparsegraph import registry

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plugin_pass"


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(EXAMPLE)], check=True)
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    yield target
    sys.path.remove(str(target))
    registry._REGISTRY.pop("near_zero_rows", None)


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 10)
        self.b = torch.nn.Linear(10, 4)
        with torch.no_grad():
            self.a.weight[:6] = 0  # 6 of 10 rows are zero

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_plugin_is_listed_and_runs_by_name(installed_plugin):
    assert "near_zero_rows" in sg.available_passes()
    cm = sg.compile(TwoLayers(), {"passes": [{"near_zero_rows": {"fraction": 0.4}}]},
                    example_inputs=(torch.randn(3, 8),), quiet=True)
    stats = cm.plan.passes["near_zero_rows"]["stats"]
    assert stats["matched"] == 2 and stats["counters"]["flagged"] == ["a"]
    site = sg.ir.mlp_sites(cm.graph_module)[0].id  # a → relu → b is an MLP site; evidence is keyed by it
    assert cm.plan.evidence("near_zero_rows", site) == {"a": {"rows": 10, "near_zero_rows": 6, "share": 0.6},
                                                        "b": {"rows": 4, "near_zero_rows": 0, "share": 0.0}}
    assert cm.plan.summary("near_zero_rows")["flagged"] == ["a"]


def test_plugin_options_are_validated_like_builtins(installed_plugin):
    with pytest.raises(sg.ConfigError, match=r"has no option 'fractoin' \(did you mean 'fraction'\?\)"):
        sg.Config.from_dict({"passes": [{"near_zero_rows": {"fractoin": 0.4}}]})
    with pytest.raises(sg.ConfigError, match="outside"):
        sg.Config.from_dict({"passes": [{"near_zero_rows": {"fraction": 1.5}}]})
