"""`PassManager` and the registry: requires-checks, verification after every pass, errors naming the
pass and the site, instruments (timing, IR dumps) attached from outside the passes."""

import time
from dataclasses import dataclass

import pytest
import torch

import sparsegraph as sg
from sparsegraph import ir, meta
from sparsegraph.config import Config
from sparsegraph.context import Batch, PassContext
from sparsegraph.instruments import Dump, Instrument, Timing, default_instruments
from sparsegraph.manager import PassManager
from sparsegraph.passes import BUILTIN
from sparsegraph.plan import SparsityPlan
from sparsegraph.registry import get_pass

aten = torch.ops.aten

# -- test-only passes (names prefixed test_mgr_ so they collide with no other test module) -----------------


@sg.register_pass("test_mgr_first")
@dataclass(frozen=True)
class First(sg.AnalysisPass):
    def analyze(self, gm, ctx, stats):
        stats.matched = len(ir.mlp_sites(gm))


@sg.register_pass("test_mgr_needs_first")
@dataclass(frozen=True)
class NeedsFirst(sg.AnalysisPass):
    requires = ("test_mgr_first",)

    def analyze(self, gm, ctx, stats):
        stats.counters["ran"] = True


@sg.register_pass("test_mgr_fails_at_site")
@dataclass(frozen=True)
class FailsAtSite(sg.AnalysisPass):
    def analyze(self, gm, ctx, stats):
        for site in ir.mlp_sites(gm):
            with ctx.at(site.id):
                if site.layer == 1:
                    raise ValueError(f"cannot handle hidden size {site.hidden}")


@sg.register_pass("test_mgr_fails_outside_sites")
@dataclass(frozen=True)
class FailsOutsideSites(sg.AnalysisPass):
    def analyze(self, gm, ctx, stats):
        raise sg.ConfigError("the model has no MLP of the kind this pass needs")


@sg.register_pass("test_mgr_changes_graph")
@dataclass(frozen=True)
class ChangesGraph(sg.AnalysisPass):
    """An analysis pass that (wrongly) rewrites: doubles the model's output."""

    def analyze(self, gm, ctx, stats):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        result = out.args[0][0]
        with gm.graph.inserting_before(out):
            doubled = gm.graph.call_function(aten.mul.Tensor, (result, 2.0))
        out.replace_input_with(result, doubled)
        gm.recompile()


@sg.register_pass("test_mgr_wrong_shapes")
@dataclass(frozen=True)
class WrongShapes(sg.RewritePass):
    """Feeds the second MLP's down projection an input of the wrong width (16 where it takes 32)."""

    def decide(self, gm, ctx, stats):
        site = ir.mlp_sites(gm)[1]
        stats.matched += 1
        return {site.id: sg.SiteDecision({"break": True})}

    def apply(self, gm, ctx, decisions, stats):
        site = next(s for s in ir.mlp_sites(gm) if s.id in decisions)
        x = ir.linear_parts(site.up).x  # [batch, 16]
        down_input = ir.linear_parts(site.down).x
        site.down.replace_input_with(down_input, x)
        stats.rewritten += 1


@sg.register_pass("test_mgr_use_before_def")
@dataclass(frozen=True)
class UseBeforeDef(sg.RewritePass):
    """Puts a user of the first down projection above it, and returns without recompiling: only the
    manager's lint stands between this graph and the next pass."""

    def run(self, gm, ctx):
        site = ir.mlp_sites(gm)[0]
        with gm.graph.inserting_before(site.up):
            early = gm.graph.call_function(aten.relu.default, (site.down,))
        out = next(n for n in gm.graph.nodes if n.op == "output")
        out.replace_input_with(out.args[0][0], early)
        return sg.PassResult(gm, True, sg.PassStats(matched=1, rewritten=1))


@sg.register_pass("test_mgr_bad_meta")
@dataclass(frozen=True)
class BadMeta(sg.RewritePass):
    """Writes a plain dict under our meta key instead of a NodeInfo."""

    def decide(self, gm, ctx, stats):
        return {ir.mlp_sites(gm)[0].id: sg.SiteDecision({})}

    def apply(self, gm, ctx, decisions, stats):
        ir.mlp_sites(gm)[0].act.meta[meta.KEY] = {"site": "mlp:0", "role": "mlp.act"}
        stats.rewritten += 1


@sg.register_pass("test_mgr_no_result")
@dataclass(frozen=True)
class NoResult(sg.RewritePass):
    def run(self, gm, ctx):
        return gm


@sg.register_pass("test_mgr_sleeps")
@dataclass(frozen=True)
class Sleeps(sg.AnalysisPass):
    seconds: float = sg.option(0.05, "how long to sleep", range=(0.0, 1.0))

    def analyze(self, gm, ctx, stats):
        time.sleep(self.seconds)


# -- a tiny model with two MLP sites ------------------------------------------------------------------------


class TwoMLPs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
            for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


@pytest.fixture
def tiny():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TwoMLPs().eval()
    return model, (torch.randn(4, 16, generator=torch.Generator().manual_seed(1)),)


def _compile(tiny, passes, **kwargs):
    model, example = tiny
    return sg.compile(model, {"passes": passes}, example_inputs=example, quiet=True, **kwargs)


def _context(gm, example, passes=()):
    config = Config(passes=tuple(passes))
    return PassContext(plan=SparsityPlan.for_graph(gm, config.to_dict(), "TwoMLPs"), config=config,
                       example=Batch(example), quiet=True)


# -- requires ------------------------------------------------------------------------------------------------


def test_requires_error_names_the_missing_pass():
    message = "pass 'test_mgr_needs_first' requires 'test_mgr_first' earlier in the pipeline"
    with pytest.raises(sg.ConfigError, match=message):
        PassManager([NeedsFirst()])
    with pytest.raises(sg.ConfigError, match=message):
        PassManager([NeedsFirst(), First()])  # present but later does not count
    PassManager([First(), NeedsFirst()])


def test_requires_is_checked_when_compiling(tiny):
    with pytest.raises(sg.ConfigError, match=r"add `- test_mgr_first: \{\}` before it"):
        _compile(tiny, ["test_mgr_needs_first"])
    cm = _compile(tiny, ["test_mgr_first", "test_mgr_needs_first"])
    assert list(cm.plan.passes) == ["test_mgr_first", "test_mgr_needs_first"]
    assert cm.plan.passes["test_mgr_first"]["stats"]["matched"] == 2
    assert cm.plan.passes["test_mgr_needs_first"]["stats"]["counters"] == {"ran": True}


# -- errors name the pass and the site --------------------------------------------------------------------


def test_error_inside_a_site_names_the_pass_and_the_site(tiny):
    with pytest.raises(sg.PassError) as err:
        _compile(tiny, ["test_mgr_first", "test_mgr_fails_at_site"])
    e = err.value
    assert (e.pass_name, e.site) == ("test_mgr_fails_at_site", "mlp:blocks.1")
    assert str(e) == ("pass 'test_mgr_fails_at_site' failed at site 'mlp:blocks.1': "
                      "ValueError: cannot handle hidden size 16")
    assert isinstance(e.__cause__, ValueError)


def test_error_outside_sites_names_the_pass(tiny):
    with pytest.raises(sg.PassError) as err:
        _compile(tiny, ["test_mgr_fails_outside_sites"])
    assert err.value.site is None
    assert str(err.value) == ("pass 'test_mgr_fails_outside_sites' failed: "
                              "the model has no MLP of the kind this pass needs")


def test_site_context_is_left_when_the_error_propagates(tiny):
    model, example = tiny
    gm = sg.trace(model, example)
    ctx = _context(gm, example)
    with pytest.raises(sg.PassError):
        PassManager([FailsAtSite()]).run(gm, ctx)
    assert ctx.error_site == "mlp:blocks.1"
    PassManager([First()]).run(gm, ctx)  # the next run starts clean
    assert ctx.error_site is None


def test_analysis_pass_may_not_change_the_graph(tiny):
    with pytest.raises(sg.PassError) as err:
        _compile(tiny, ["test_mgr_changes_graph"])
    assert err.value.pass_name == "test_mgr_changes_graph"
    assert "an analysis pass changed the graph; only rewrite passes may" in str(err.value)


# -- verification after each pass -------------------------------------------------------------------------


def test_rewrite_with_wrong_shapes_is_caught(tiny):
    with pytest.raises(sg.PassError) as err:
        _compile(tiny, ["test_mgr_wrong_shapes"])
    e = err.value
    assert e.pass_name == "test_mgr_wrong_shapes"
    assert "the graph no longer runs at the example shapes" in str(e)
    assert e.site == "mlp:blocks.1"  # the failing node is the down projection, annotated with its site
    assert "role mlp.down" in str(e)


def test_rewrite_leaving_a_malformed_graph_is_caught(tiny):
    with pytest.raises(sg.PassError) as err:
        _compile(tiny, ["test_mgr_use_before_def"])
    assert str(err.value).startswith("pass 'test_mgr_use_before_def' failed: left a malformed graph: ")
    assert "used before it has been defined" in str(err.value)


def test_rewrite_leaving_malformed_meta_is_caught(tiny):
    with pytest.raises(sg.PassError, match=r"left malformed meta: node relu: meta\['sparsegraph'\] is dict, "
                                           "expected NodeInfo"):
        _compile(tiny, ["test_mgr_bad_meta"])


def test_pass_must_return_a_pass_result(tiny):
    with pytest.raises(sg.PassError, match=r"run\(\) returned \w+, expected PassResult"):
        _compile(tiny, ["test_mgr_no_result"])


# -- instruments -----------------------------------------------------------------------------------------


def test_dump_writes_the_captured_graph_and_one_file_per_pass(tiny, tmp_path, monkeypatch):
    dump = tmp_path / "dump"  # created by the instrument
    monkeypatch.setenv("SPARSEGRAPH_DUMP", str(dump))
    cm = _compile(tiny, ["cost", {"nm_weights": {"roles": ["mlp.up"]}}])
    assert sorted(p.name for p in dump.iterdir()) == [
        "00_captured.py", "00_captured.txt", "01_cost.py", "01_cost.txt", "02_nm_weights.py",
        "02_nm_weights.txt"]
    captured, after_cost, after_nm = ((dump / f"{stem}.py").read_text()
                                      for stem in ("00_captured", "01_cost", "02_nm_weights"))
    assert captured == after_cost  # an analysis pass leaves the code as it was
    assert "nm_linear" not in after_cost and after_nm.count("sparsegraph.nm_linear") == 2
    assert after_nm == cm.graph_module.code
    table = (dump / "02_nm_weights.txt").read_text().splitlines()
    assert table[0] == "name\top\ttarget\tkind\tshape\tsite"
    assert len(table) == 1 + len(cm.graph_module.graph.nodes)
    assert any(row.endswith("mlp:blocks.0 mlp.down") for row in table)


def test_no_dump_without_the_environment_variable(monkeypatch):
    monkeypatch.delenv("SPARSEGRAPH_DUMP", raising=False)
    assert not any(isinstance(i, Dump) for i in default_instruments(3, quiet=True))
    assert [type(i) for i in default_instruments(3, quiet=True)] == [Timing]


def test_timing_fills_ctx_timings(tiny):
    model, example = tiny
    gm = sg.trace(model, example)
    ctx = _context(gm, example)
    PassManager([First(), Sleeps(seconds=0.05)], [Timing()]).run(gm, ctx)
    assert set(ctx.timings) == {"test_mgr_first", "test_mgr_sleeps"}
    assert ctx.timings["test_mgr_sleeps"] >= 0.05
    assert 0 <= ctx.timings["test_mgr_first"] < ctx.timings["test_mgr_sleeps"]


def test_compiled_model_reports_timings(tiny):
    cm = _compile(tiny, ["cost", {"test_mgr_sleeps": {"seconds": 0.02}}])
    assert set(cm.timings) == {"cost", "test_mgr_sleeps"} and cm.timings["test_mgr_sleeps"] >= 0.02


def test_instruments_are_called_around_every_pass_in_order(tiny):
    events = []

    class Recorder(Instrument):
        def before_pass(self, p, gm, ctx):
            events.append(("before", p.name))

        def after_pass(self, p, result, ctx):
            events.append(("after", p.name, result.modified, result.stats.matched))

    model, example = tiny
    gm = sg.trace(model, example)
    PassManager([First(), NeedsFirst()], [Recorder()]).run(gm, _context(gm, example))
    assert events == [("before", "test_mgr_first"), ("after", "test_mgr_first", False, 2),
                      ("before", "test_mgr_needs_first"), ("after", "test_mgr_needs_first", False, 0)]


# -- registry ---------------------------------------------------------------------------------------------


def test_unknown_pass_name_suggests_the_nearest():
    with pytest.raises(sg.ConfigError, match=r"^unknown pass 'cots' \(did you mean 'cost'\?\)$"):
        get_pass("cots")
    with pytest.raises(sg.ConfigError, match=r"^unknown pass 'zzzz' \(valid: 'activation_profile', "):
        get_pass("zzzz")


def test_available_passes_lists_builtins_and_registered():
    names = sg.available_passes()
    assert set(BUILTIN) <= set(names)
    assert {"cost", "nm_weights", "test_mgr_first", "test_mgr_sleeps"} <= set(names)
    assert names == sorted(names)


def test_builtin_passes_load_by_name():
    for name in ("cost", "nm_weights"):
        cls = get_pass(name)
        assert cls.name == name and issubclass(cls, sg.AnalysisPass | sg.RewritePass)


def test_register_pass_refuses_a_taken_name_and_non_passes():
    with pytest.raises(ValueError,
                       match=r"pass name 'cost' is taken by sparsegraph\.passes\.analysis\.cost\.Cost"):
        @sg.register_pass("cost")
        @dataclass(frozen=True)
        class Impostor(sg.AnalysisPass):
            pass

    with pytest.raises(TypeError, match=r"@register_pass\('test_mgr_not_a_pass'\) needs a Pass subclass"):
        sg.register_pass("test_mgr_not_a_pass")(object)
    assert "test_mgr_not_a_pass" not in sg.available_passes()


def test_every_built_in_pass_is_an_entry_point_of_its_module():
    """The registry finds built-ins through pyproject's entry points: that table and BUILTIN agree."""
    from importlib import metadata

    points = {ep.name: ep.value for ep in metadata.entry_points(group="sparsegraph.passes")
              if ep.value.startswith("sparsegraph.passes.")}
    assert {name: value.split(":")[0] for name, value in points.items()} == BUILTIN
    for name in BUILTIN:
        assert sg.registry.get_pass(name).name == name


@sg.register_pass("test_mgr_site_loop")
@dataclass(frozen=True)
class _SiteLoop(sg.RewritePass):
    """The contract's site loop: refuse MLP 1 (Refused), skip attention sites (None), decide the rest."""

    def sites(self, gm):
        return ir.sites(gm)

    def decide_site(self, site, opts, ctx):
        if isinstance(site, ir.AttentionSite):
            return None
        if site.layer == 1:
            raise sg.Refused("layer 1 is not for us")
        return sg.SiteDecision({"layer": site.layer})

    def apply(self, gm, ctx, decisions, stats):
        stats.counters["applied"] = sorted(decisions)


def test_the_site_loop_counts_matches_and_refusals(explicit):
    cm = sg.compile(explicit.model, {"passes": ["test_mgr_site_loop"]}, example_inputs=explicit.example,
                    quiet=True)
    stats = cm.plan.passes["test_mgr_site_loop"]["stats"]
    assert stats["matched"] == 3  # the three MLP sites; attention sites are not this pass's (None)
    assert stats["refused"] == [{"site": "mlp:blocks.1.mlp", "reason": "layer 1 is not for us"}]
    assert stats["counters"]["applied"] == ["mlp:blocks.0.mlp", "mlp:blocks.2.mlp"]
