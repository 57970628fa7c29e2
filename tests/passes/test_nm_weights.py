"""nm_weights: structure (what the graph becomes), numerics (vs the pruned dense model), counts."""

import copy

import pytest
import torch

import sparsegraph as sg
from sparsegraph import ir, models
from sparsegraph.codegen.nm_linear import OP, nm_pack, nm_unpack


@pytest.fixture(scope="module")
def explicit():
    return models.load("explicit_attention")


def _compile(model, example, **options):
    return sg.compile(model, {"passes": [{"nm_weights": options}]}, example_inputs=example, quiet=True)


def test_structure_every_matched_linear_becomes_nm_linear(explicit):
    model, example = explicit
    cm = _compile(model, example, roles=["mlp.up", "mlp.down"])
    gm = cm.graph_module
    nm_nodes = [n for n in gm.graph.nodes if n.target is OP.overload]
    assert len(nm_nodes) == 6  # 3 MLPs × (up, down)
    assert {sg.meta.get(n).role for n in nm_nodes} == {"mlp.up", "mlp.down"}
    assert all(sg.meta.get(n).site.startswith("mlp:") for n in nm_nodes)
    # attention projections untouched, MLP sites still found on the rewritten graph
    assert sum(ir.kind(n) == "linear" for n in gm.graph.nodes) > 0
    for n in nm_nodes:
        x, values, offsets, _, n_, m_ = n.args
        assert ir.shape(values) == ir.shape(offsets) and (n_, m_) == (2, 4)
        assert ir.shape(values)[1] * 4 // 2 == ir.shape(x)[-1]  # n/m of the inputs are stored


def test_numeric_equals_dense_model_with_pruned_weights(explicit):
    model, example = explicit
    cm = _compile(model, example)
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for mod in pruned.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.copy_(nm_unpack(*nm_pack(mod.weight, 2, 4), 2, 4))
        expected = pruned(*example)
        torch.testing.assert_close(cm(*example), expected, rtol=1e-5, atol=1e-5)


def test_counts_and_refusals(explicit):
    model, example = explicit
    cm = _compile(model, example, n=4, m=4, roles=["mlp.up"])
    stats = cm.plan.passes["nm_weights"]["stats"]
    assert stats["matched"] == 3 and stats["rewritten"] == 0
    assert [r["reason"] for r in stats["refused"]] == ["n == m == 4 keeps every weight (dense)"] * 3
    cm = _compile(model, example, n=2, m=3, roles=["mlp.up", "attn.out"])
    stats = cm.plan.passes["nm_weights"]["stats"]
    assert stats["matched"] == 6 and stats["rewritten"] == 0
    assert all("not a multiple of m=3" in r["reason"] for r in stats["refused"])
    cm = _compile(model, example)
    stats = cm.plan.passes["nm_weights"]["stats"]
    assert stats["rewritten"] == stats["matched"] > 0 and stats["counters"]["sites"] == 6


def test_overrides_keep_one_site_dense(explicit):
    model, example = explicit
    config = {"passes": [{"nm_weights": {}}], "overrides": {"blocks.0.*": {"nm_weights": {"roles": []}}}}
    cm = sg.compile(model, config, example_inputs=example, quiet=True)
    sites = {sg.meta.get(n).site for n in cm.graph_module.graph.nodes if n.target is OP.overload}
    assert sites and not any("blocks.0" in s for s in sites)


def test_replay_refuses_changed_weights(explicit, tmp_path):
    model, example = explicit
    cm = _compile(model, example)
    cm.plan.save(tmp_path / "plan.json")
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.blocks[0].mlp[0].weight.mul_(-1).add_(torch.randn_like(changed.blocks[0].mlp[0].weight))
    # the plan's fault
    with pytest.raises(sg.PlanError, match=r"^nm_weights: the weights of blocks\.0\.mlp\.0 differ"):
        sg.compile(changed, plan=tmp_path / "plan.json", example_inputs=example, quiet=True)


def test_bad_options_are_config_errors():
    with pytest.raises(sg.ConfigError, match="must not exceed"):
        sg.Config.from_dict({"passes": [{"nm_weights": {"n": 5, "m": 4}}]})
    with pytest.raises(sg.ConfigError, match="not linear roles"):
        sg.Config.from_dict({"passes": [{"nm_weights": {"roles": ["mlp.upp"]}}]})


def test_a_fused_gate_up_needs_both_roles(fused_gated):
    """The one linear computes gate and up: roles naming one of them refuse it by name; both pack it."""
    model, example = fused_gated(), (torch.randn(2, 8, 32),)
    for roles in (["mlp.gate"], ["mlp.up"]):
        stats = _compile(model, example, roles=roles).plan.passes["nm_weights"]["stats"]
        assert (stats["matched"], stats["rewritten"]) == (1, 0)
        (refusal,) = stats["refused"]
        assert refusal["site"].endswith("[gate_up_proj]") and "computes gate and up" in refusal["reason"]
        assert f"roles name only {roles[0]}" in refusal["reason"]
    cm = _compile(model, example, roles=["mlp.up", "mlp.gate", "mlp.down"])
    assert [sg.meta.get(n).role for n in cm.graph_module.graph.nodes if n.target is OP.overload] == [
        "mlp.up", "mlp.down"]


def test_progressive_stages_and_masks():
    """The schedule goes 3:4 (from step 0: a dense level would train nothing) → 2:4 over the ramp, the last
    level at the latest on the last step;
    each mask is nested in the one before and the last keeps exactly n of every m, packed at its own
    positions (a kept weight trained to zero stays kept)."""
    from sparsegraph.codegen.nm_linear import pack_mask, stages, tighten

    assert stages(2, 4, 0.5, 100) == [(0, 3), (50, 2)]
    assert stages(2, 4, 1.0, 10) == [(0, 3), (9, 2)]
    assert stages(1, 4, 0.0, 10) == [(0, 3), (0, 2), (0, 1)]
    assert stages(2, 8, 0.5, 100) == [(0, 7), (10, 6), (20, 5), (30, 4), (40, 3), (50, 2)]
    w = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(w, dtype=torch.bool)
    three = tighten(w, mask, 3, 4)
    w2 = w.clone()
    w2[~three] = 100.0  # a pruned weight that grew back large is still pruned
    two = tighten(w2, three, 2, 4)
    assert bool((two <= three).all()) and bool((two.reshape(6, 4, 4).sum(-1) == 2).all())
    row, col = two.nonzero()[0].tolist()
    w2[row, col] = 0.0
    values, offsets = pack_mask(w2, two, 2, 4)
    assert torch.equal(nm_unpack(values, offsets, 2, 4) != 0, two & (w2 != 0))
    assert torch.equal(nm_unpack(values, offsets, 2, 4), w2 * two)
    one_shot = nm_pack(w, 2, 4)
    assert torch.equal(pack_mask(w, tighten(w, mask, 2, 4), 2, 4)[1], one_shot[1])
    with pytest.raises(ValueError, match="exactly 2 of every 4"):
        pack_mask(w, three, 2, 4)


@pytest.mark.slow
@pytest.mark.ci
def test_progressive_is_recorded_and_compiles_one_shot(explicit):
    """At compile, progressive is the one-shot model; the decision records the schedule; plans of the
    one-shot schedule do not change (no key added)."""
    model, example = explicit
    one = _compile(model, example, roles=["mlp.up"])
    prog = _compile(model, example, roles=["mlp.up"], schedule="progressive", ramp=0.25)
    assert torch.equal(prog(*example), one(*example))
    def decisions(cm):
        return [d for s in cm.plan.sites.values() for d in s["nm_weights"]["decision"].values()]

    assert decisions(prog) and all(d == {"n": 2, "m": 4, "schedule": "progressive", "ramp": 0.25}
                                   for d in decisions(prog))
    assert decisions(one) and all(d == {"n": 2, "m": 4} for d in decisions(one))
