"""neuron_pruning: structure (smaller weights), numerics (vs slicing by hand), counts, choice by profile,
fused gate/up (both halves sliced alike)."""

import pytest
import torch

import sparsegraph as sg
from sparsegraph import ir


def _compile(model, example, batches, **options):
    config = {"passes": ["activation_profile", {"neuron_pruning": options}]}
    return sg.compile(model, config, example_inputs=example, calibration=batches, quiet=True)


def test_structure_weights_are_sliced(explicit_calibrated):
    cm = _compile(*explicit_calibrated, fraction=0.25)
    sites = ir.mlp_sites(cm.graph_module)
    assert len(sites) == 3 and all(s.intermediate == 384 for s in sites)  # 512 − 128
    assert cm.cost.macs < cm.dense_cost.macs


def test_numeric_equals_slicing_by_hand(explicit_calibrated):
    model, example, batches = explicit_calibrated
    cm = _compile(model, example, batches, fraction=0.5)
    import copy

    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for i, block in enumerate(pruned.blocks):
            d = cm.plan.sites[f"mlp:blocks.{i}.mlp"]["neuron_pruning"]["decision"]
            keep, gone = torch.tensor(d["keep"]), torch.tensor(d["removed"])
            up, down = block.mlp[0], block.mlp[2]
            shift = down.weight[:, gone] @ torch.tensor(d["removed_mean"])
            new_up = torch.nn.Linear(128, len(keep))
            new_up.weight.copy_(up.weight[keep]), new_up.bias.copy_(up.bias[keep])
            new_down = torch.nn.Linear(len(keep), 128)
            new_down.weight.copy_(down.weight[:, keep]), new_down.bias.copy_(down.bias + shift)
            block.mlp[0], block.mlp[2] = new_up, new_down
        torch.testing.assert_close(cm(*example), pruned(*example), rtol=1e-5, atol=1e-5)


def test_choice_follows_the_profile_not_the_index(explicit_calibrated):
    model, example, batches = explicit_calibrated
    cm = _compile(model, example, batches, fraction=0.5, score="mass")
    d = cm.plan.sites["mlp:blocks.0.mlp"]["neuron_pruning"]["decision"]
    mass = torch.tensor(cm.plan.evidence("activation_profile", "mlp:blocks.0.mlp")["down_input"]["mass"])
    assert mass[d["keep"]].min() >= mass[d["removed"]].max()
    assert d["keep"] != list(range(256))


@pytest.mark.slow  # two calibrated compiles: 9 s
@pytest.mark.ci
def test_counts_and_zero_fraction_is_dense(explicit_calibrated):
    model, example, batches = explicit_calibrated
    cm = _compile(model, example, batches, fraction=0.0)
    stats = cm.plan.passes["neuron_pruning"]["stats"]
    assert (stats["matched"], stats["rewritten"], len(stats["refused"])) == (3, 0, 3)
    with torch.no_grad():
        torch.testing.assert_close(cm(*example), model(*example), rtol=0, atol=1e-6)
    cm = _compile(model, example, batches, fraction=0.5)
    stats = cm.plan.passes["neuron_pruning"]["stats"]
    assert stats["rewritten"] == 3 and stats["counters"]["neurons_removed"] == 3 * 256


@pytest.mark.parametrize("cut", ["chunk", "split"])
def test_fused_gate_up_loses_the_same_neurons_in_both_halves(cut, fused_gated):
    model = fused_gated(cut)
    g = torch.Generator().manual_seed(0)
    example, batches = (torch.randn(2, 8, 32, generator=g),), [(torch.randn(4, 8, 32, generator=g),)]
    cm = _compile(model, example, batches, fraction=0.25)
    (site,) = ir.mlp_sites(cm.graph_module)
    assert (site.fused, site.intermediate, ir.linear_parts(site.up).out_features) == (True, 48, 96)
    d = cm.plan.sites[site.id]["neuron_pruning"]["decision"]
    keep, gone = torch.tensor(d["keep"]), torch.tensor(d["removed"])
    w, b = model.gate_up_proj.weight, model.gate_up_proj.bias
    rows = torch.cat([keep, keep + 64])  # neuron j is row j of the gate half and row 64 + j of the up half
    with torch.no_grad():
        gate, up = torch.nn.functional.linear(example[0], w[rows], b[rows]).chunk(2, dim=-1)
        shift = model.down_proj.weight[:, gone] @ torch.tensor(d["removed_mean"])
        expected = torch.nn.functional.linear(up * torch.nn.functional.silu(gate),
                                              model.down_proj.weight[:, keep], model.down_proj.bias + shift)
        torch.testing.assert_close(cm(*example), expected, rtol=1e-5, atol=1e-5)
