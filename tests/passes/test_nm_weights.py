"""nm_weights: structure (what the graph becomes), numerics (vs the pruned dense model), counts."""

import copy
import json

import pytest
import torch

import sparsegraph as sg
from sparsegraph import facts, ir, models
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


def _padded_calibration():
    """Two batches of the explicit model's inputs, the second sequence of each padded after token 40."""
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, 1000, (2, 64), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 40:] = 0
        batches.append((ids, mask))
    return batches


def _hand_rms(model, batches) -> dict[str, tuple[int, torch.Tensor]]:
    """Per linear module path: the rows (real tokens) and each input feature's rms over them, by hooks."""
    sums: dict[str, tuple[int, torch.Tensor]] = {}
    current = {}

    def hook(path):
        def record(module, inputs, output):
            x = inputs[0].double()[current["mask"].bool()]
            rows, total = sums.get(path, (0, 0.0))
            sums[path] = (rows + x.shape[0], total + x.square().sum(0))
        return record

    handles = [m.register_forward_hook(hook(path)) for path, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for ids, mask in batches:
            current["mask"] = mask
            model(ids, mask)
    for h in handles:
        h.remove()
    return {path: (rows, (total / rows).sqrt()) for path, (rows, total) in sums.items()}


ACTIVATION = {"passes": ["linear_profile", {"nm_weights": {"score": "activation"}}]}


def test_linear_profile_records_each_layer_s_input_rms_over_real_tokens(explicit):
    model, example = explicit
    batches = _padded_calibration()
    cm = sg.compile(model, {"passes": ["linear_profile"]}, example_inputs=example, calibration=batches,
                    quiet=True)
    got = {path: layer for site in cm.plan.sites
           for path, layer in (facts.read(cm.plan, "linear_profile", site, facts.LinearInputs) or
                               facts.LinearInputs({})).layers.items()}
    want = _hand_rms(model, batches)
    assert sorted(got) == sorted(want) and len(got) == 3 * 6  # q, k, v, out, up, down per block
    for path, (rows, rms) in got.items():
        assert rows == want[path][0] == 2 * (64 + 40)  # padding left out
        torch.testing.assert_close(torch.tensor(rms, dtype=torch.float64), want[path][1], rtol=1e-9, atol=0)
    assert cm.plan.passes["linear_profile"]["stats"]["matched"] == 6  # sites: 3 attention, 3 MLP


def test_activation_score_keeps_the_largest_weight_times_input_rms(explicit):
    """Structure (the decision carries the rms it ranked with), numerics (= the model pruned by hand with
    Wanda's score) and that the score changes which weights are kept."""
    model, example = explicit
    batches = _padded_calibration()
    cm = sg.compile(model, ACTIVATION, example_inputs=example, calibration=batches, quiet=True)
    rms = _hand_rms(model, batches)
    decisions = {path: d for site in cm.plan.sites
                 for path, d in cm.plan.sites[site].get("nm_weights", {}).get("decision", {}).items()}
    assert len(decisions) == 3 * 6 and cm.plan.passes["nm_weights"]["stats"]["rewritten"] == 18
    pruned, moved = copy.deepcopy(model), 0
    with torch.no_grad():
        for path, mod in pruned.named_modules():
            if isinstance(mod, torch.nn.Linear):
                torch.testing.assert_close(torch.tensor(decisions[path]["input_rms"], dtype=torch.float64),
                                           rms[path][1], rtol=1e-9, atol=0)
                by_activation = nm_pack(mod.weight, 2, 4, rms[path][1])[1]
                moved += int((by_activation != nm_pack(mod.weight, 2, 4)[1]).any())
                mod.weight.copy_(nm_unpack(nm_pack(mod.weight, 2, 4, rms[path][1])[0], by_activation, 2, 4))
        torch.testing.assert_close(cm(*example), pruned(*example), rtol=1e-5, atol=1e-5)
    assert moved == 18  # every layer keeps some other weight than magnitude would


def test_activation_score_needs_linear_profile_and_replays_without_it(explicit, tmp_path):
    model, example = explicit
    with pytest.raises(sg.ConfigError, match="nm_weights' requires 'linear_profile' earlier"):
        _compile(model, example, score="activation")
    overridden = {"passes": [{"nm_weights": {}}], "overrides": {"blocks.1.*": {"nm_weights": {
        "score": "activation"}}}}  # the pipeline's options need no profile; a site's do
    with pytest.raises(sg.PassError, match="add `- linear_profile` before nm_weights"):
        sg.compile(model, overridden, example_inputs=example, quiet=True)
    cm = sg.compile(model, ACTIVATION, example_inputs=example, calibration=_padded_calibration(), quiet=True)
    cm.plan.save(tmp_path / "plan.json")
    replayed = sg.compile(model, plan=tmp_path / "plan.json", example_inputs=example, quiet=True)
    assert torch.equal(replayed(*example), cm(*example))
    data = json.loads((tmp_path / "plan.json").read_text())
    site = next(s for s, e in data["sites"].items() if "nm_weights" in e)
    layer = next(iter(data["sites"][site]["nm_weights"]["decision"].values()))
    layer["input_rms"] = layer["input_rms"][:-1]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(sg.PlanError, match=r"input_rms.*one per input feature"):
        sg.compile(model, plan=tmp_path / "bad.json", example_inputs=example, quiet=True)


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
