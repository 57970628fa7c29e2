"""PassManager: requires-checks, verification after every pass, errors naming pass and site, instruments."""

from dataclasses import dataclass

import pytest
import torch

import sparsegraph as sg
from sparsegraph import ir, models
from sparsegraph.registry import get_pass


@sg.register_pass("test_first")
@dataclass(frozen=True)
class First(sg.AnalysisPass):
    def analyze(self, gm, ctx, stats):
        stats.matched = 1


@sg.register_pass("test_needs_first")
@dataclass(frozen=True)
class NeedsFirst(sg.AnalysisPass):
    requires = ("test_first",)

    def analyze(self, gm, ctx, stats):
        pass


@sg.register_pass("test_fails_at_site")
@dataclass(frozen=True)
class FailsAtSite(sg.AnalysisPass):
    def analyze(self, gm, ctx, stats):
        site = ir.mlp_sites(gm)[1]
        with ctx.at(site.id):
            raise ValueError("boom")


@sg.register_pass("test_sneaky_analysis")
@dataclass(frozen=True)
class SneakyAnalysis(sg.AnalysisPass):
    def analyze(self, gm, ctx, stats):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            gm.graph.call_function(torch.ops.aten.relu.default, (out.args[0][0],))
        gm.recompile()


@sg.register_pass("test_breaks_shapes")
@dataclass(frozen=True)
class BreaksShapes(sg.RewritePass):
    def decide(self, gm, ctx, stats):
        site = ir.mlp_sites(gm)[0]
        return {site.id: sg.SiteDecision({"break": True})}

    def apply(self, gm, ctx, decisions, stats):
        site = ir.mlp_sites(gm)[0]
        x = ir.linear_parts(site.down).x
        with gm.graph.inserting_after(x):
            bad = gm.graph.call_function(torch.ops.aten.mm.default, (x, x))  # [.., 512] @ [.., 512]: wrong
        site.down.replace_input_with(x, bad)
        stats.rewritten += 1


@pytest.fixture(scope="module")
def explicit():
    return models.load("explicit_attention")


def _compile(explicit, passes, **kw):
    model, example = explicit
    return sg.compile(model, {"passes": passes}, example_inputs=example, quiet=True, **kw)


def test_requires_names_the_missing_pass(explicit):
    with pytest.raises(sg.ConfigError, match="'test_needs_first' requires 'test_first' earlier"):
        _compile(explicit, ["test_needs_first"])
    cm = _compile(explicit, ["test_first", "test_needs_first"])
    assert list(cm.plan.passes) == ["test_first", "test_needs_first"]


def test_errors_name_the_pass_and_the_site(explicit):
    with pytest.raises(sg.PassError) as err:
        _compile(explicit, ["test_fails_at_site"])
    assert err.value.pass_name == "test_fails_at_site" and err.value.site == "mlp:blocks.1.mlp"
    assert "boom" in str(err.value) and "mlp:blocks.1.mlp" in str(err.value)


def test_analysis_may_not_change_the_graph(explicit):
    with pytest.raises(sg.PassError, match="analysis pass changed the graph"):
        _compile(explicit, ["test_sneaky_analysis"])


def test_graph_is_verified_after_each_rewrite(explicit):
    with pytest.raises(sg.PassError) as err:
        _compile(explicit, ["test_breaks_shapes"])
    assert err.value.pass_name == "test_breaks_shapes" and "no longer runs at the example shapes" in str(err.value)


def test_dump_and_timing(explicit, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEGRAPH_DUMP", str(tmp_path))
    cm = _compile(explicit, ["cost", "nm_weights"])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["00_captured.py", "00_captured.txt", "01_cost.py", "01_cost.txt",
                     "02_nm_weights.py", "02_nm_weights.txt"]
    assert "nm_linear" in (tmp_path / "02_nm_weights.py").read_text()
    assert "nm_linear" not in (tmp_path / "01_cost.py").read_text()
    assert set(cm.timings) == {"cost", "nm_weights"} and all(t >= 0 for t in cm.timings.values())


def test_registry_errors_suggest_names():
    with pytest.raises(sg.ConfigError, match=r"unknown pass 'cots' \(did you mean 'cost'\?\)"):
        get_pass("cots")
    assert {"cost", "nm_weights"} <= set(sg.available_passes())
    with pytest.raises(ValueError, match="is taken"):
        @sg.register_pass("cost")
        @dataclass(frozen=True)
        class Impostor(sg.AnalysisPass):
            pass
