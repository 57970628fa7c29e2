"""speed_check: sites whose sparse ops do not pay are reverted to the dense form; the plan says why."""

import pytest
import torch

import sparsegraph as sg
from sparsegraph.codegen import op_of


def _compile(model, example, batches, **options):
    config = {"passes": ["activation_profile", {"neuron_sparsity": {"target": 0.5}},
                         {"speed_check": options}]}
    return sg.compile(model, config, example_inputs=example, calibration=batches, quiet=True)


@pytest.mark.slow
@pytest.mark.ci  # ~7 s: times every op, then ONNX
def test_revert_everything_gives_the_dense_result(explicit_calibrated, tmp_path):
    model, example, batches = explicit_calibrated
    cm = _compile(model, example, batches, min_speedup=1e9, repeats=2, warmup=0)  # nothing can be that fast
    assert not [n for n in cm.graph_module.graph.nodes if op_of(n) is not None]  # structure: all reverted
    stats = cm.plan.passes["speed_check"]["stats"]
    assert (stats["matched"], stats["rewritten"]) == (3, 3) and len(stats["counters"]["reverted"]) == 3
    with torch.no_grad():
        # dense form = original
        torch.testing.assert_close(cm(*example), model(*example), rtol=1e-5, atol=1e-5)
    evidence = cm.plan.sites["mlp:blocks.0.mlp"]["speed_check"]["evidence"]
    assert evidence["unit"] == "seconds" and evidence["sparse"] > 0 and evidence["dense"] > 0
    assert cm.cost.macs == cm.dense_cost.macs  # the put-back dense forms are costed like the original layers
    from sparsegraph.onnx_export import OnnxModel

    ort = OnnxModel(cm.export_onnx(tmp_path / "reverted.onnx"), cm.graph_module)
    torch.testing.assert_close(ort(*example), cm(*example), rtol=0, atol=1e-4)


def test_keep_everything_changes_nothing(explicit_calibrated):
    model, example, batches = explicit_calibrated
    cm = _compile(model, example, batches, min_speedup=0.0, repeats=2, warmup=0)
    assert len([n for n in cm.graph_module.graph.nodes if op_of(n) is not None]) == 3
    stats = cm.plan.passes["speed_check"]["stats"]
    assert stats["rewritten"] == 0 and all(r["reason"].startswith("kept sparse") for r in stats["refused"])


@pytest.mark.slow  # three compiles, one timed: 8 s
@pytest.mark.ci
def test_cost_model_mode_and_replay(explicit_calibrated, tmp_path):
    model, example, batches = explicit_calibrated
    cm = _compile(model, example, batches, measure=False)
    evidence = cm.plan.sites["mlp:blocks.0.mlp"]["speed_check"]["evidence"]
    assert evidence["unit"] == "cost" and evidence["dense"] > evidence["sparse"]  # half the MACs at 50%
    assert cm.plan.passes["speed_check"]["stats"]["rewritten"] == 0
    cm = _compile(model, example, batches, min_speedup=1e9, repeats=1, warmup=0)
    again = sg.compile(model, plan=cm.plan.save(tmp_path / "p.json"), example_inputs=example, quiet=True)
    assert torch.equal(again(*example), cm(*example))  # same sites reverted, without measuring


def test_reverted_attention_is_dense_attention(explicit_calibrated):
    model, example, batches = explicit_calibrated
    config = {"passes": [{"head_patterns": {"block": 16, "recall": 0.5, "min_saving": 0.0}},
                         "sparse_attention",
                         {"speed_check": {"min_speedup": 1e9, "repeats": 1, "warmup": 0}}]}
    cm = sg.compile(model, config, example_inputs=example, calibration=batches, quiet=True)
    stats = cm.plan.passes["speed_check"]["stats"]
    assert stats["rewritten"] == cm.plan.passes["sparse_attention"]["stats"]["rewritten"] > 0
    assert not [n for n in cm.graph_module.graph.nodes if op_of(n) is not None]
    with torch.no_grad():
        torch.testing.assert_close(cm(*example), model(*example), rtol=1e-5, atol=1e-5)


def test_reverting_a_site_leaves_its_ops_without_a_dense_form(explicit_calibrated):
    """Token selection shares a site with the attention it prunes before; reverting that site's attention
    keeps the selection (it has no dense form and was never timed) instead of failing on it."""
    from sparsegraph.codegen.token_select import OP as SELECT

    model, example, batches = explicit_calibrated
    config = {"passes": [{"head_patterns": {"block": 16, "recall": 0.5, "min_saving": 0.0}},
                         {"token_pruning": {"layers": [2], "keep": 0.5}}, "sparse_attention",
                         {"speed_check": {"min_speedup": 1e9, "repeats": 1, "warmup": 0}}]}
    cm = sg.compile(model, config, example_inputs=example, calibration=batches, quiet=True)
    left = [op_of(n).name for n in cm.graph_module.graph.nodes if op_of(n) is not None]
    assert "block_sparse_attention" not in left and SELECT.name in left
    refused = cm.plan.passes["speed_check"]["stats"]["refused"]
    assert any("no dense form" in r["reason"] for r in refused)
