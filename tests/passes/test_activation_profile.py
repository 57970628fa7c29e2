"""activation_profile: streaming statistics match a direct computation; bounded memory; padding ignored."""

import pytest
import torch

import sparsegraph as sg
from sparsegraph import ir
from sparsegraph.passes.analysis.activation_profile import Stream


def _profile(model, example, batches, **options):
    return sg.compile(model, {"passes": [{"activation_profile": options}]}, example_inputs=example,
                      calibration=batches, quiet=True)


def _direct_activations(model, batches, layer):
    """The GELU outputs of one MLP, non-padding tokens only, by a forward hook on the eager model."""
    seen, rows = [], []
    hook = model.blocks[layer].mlp[1].register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            for ids, mask in batches:
                model(ids, mask)
                rows.append(seen.pop()[mask.bool()])
    finally:
        hook.remove()
    return torch.cat(rows)


def test_statistics_match_a_direct_computation(explicit_calibrated):
    model, example, batches = explicit_calibrated
    cm = _profile(model, example, batches, reservoir=100000)  # reservoir holds every token: exact
    site = ir.mlp_sites(cm.graph_module)[1]
    ev = cm.plan.evidence("activation_profile", site.id)["down_input"]
    a = _direct_activations(model, batches, 1)
    assert ev["tokens"] == a.shape[0] == 2 * 48 * 4 - 18  # padding tokens left out
    torch.testing.assert_close(torch.tensor(ev["mean"]), a.mean(0).double().float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(ev["centre"]), a.median(0).values, rtol=1e-6, atol=1e-6)
    for target, t in ev["thresholds"]["magnitude"].items():
        reached = (a.abs() <= t).float().mean().item()
        assert abs(reached - float(target)) < 1e-3, (target, reached)
    for target, t in ev["thresholds"]["centred"].items():
        reached = ((a - a.median(0).values).abs() <= t).float().mean().item()
        assert abs(reached - float(target)) < 1e-3
    hot = ev["hot"]
    mass = a.abs().mean(0)
    assert (mass[hot].sum() / mass.sum() >= 0.8
            > mass.sort(descending=True).values[: len(hot) - 1].sum() / mass.sum())


def test_counts_and_summary(explicit_calibrated):
    model, example, batches = explicit_calibrated
    cm = _profile(model, example, batches, inputs=True)
    stats = cm.plan.passes["activation_profile"]["stats"]
    assert stats["matched"] == 3 and stats["rewritten"] == 0 and stats["counters"]["batches"] == 4
    ev = cm.plan.evidence("activation_profile", "mlp:blocks.0.mlp")
    assert set(ev) == {"down_input", "mlp_input"}
    assert len(ev["down_input"]["centre"]) == 512 and len(ev["mlp_input"]["centre"]) == 128
    assert sum(ev["down_input"]["histogram"]["counts"]) == ev["down_input"]["tokens"] * 512


def test_reservoir_bounds_memory_and_merges():
    g = torch.Generator().manual_seed(0)
    s = Stream(8, reservoir=50)
    for _ in range(10):
        s.add(torch.randn(40, 8, generator=g), g)
    assert s.tokens == 400 and s.sample.shape == (50, 8)
    # merging two halves equals one stream over both: the 50 smallest keys of the union
    a, b = Stream(8, 50), Stream(8, 50)
    rows, keys = torch.randn(200, 8, generator=g), torch.rand(200, generator=g)
    a.merge(rows[:100], keys[:100])
    b.merge(rows[100:], keys[100:])
    a.merge(b.sample, b.keys)
    whole = Stream(8, 50)
    whole.merge(rows, keys)
    assert torch.equal(a.keys.sort().values, whole.keys.sort().values)


def test_needs_calibration(explicit_calibrated):
    model, example, _ = explicit_calibrated
    with pytest.raises(sg.ConfigError, match=r"\['activation_profile'\] profile calibration data"):
        _profile(model, example, None)
