"""`sparsegraph.recover`: distillation toward the dense model lowers the loss on a fixed seed, trains only the
tensors the rewrites added, leaves the user's model and the input compiled model alone, is recorded in the
plan (refused on replay, drawn in the report) and survives save → load."""

from __future__ import annotations

import pytest
import torch

import sparsegraph as sg
from sparsegraph import graph_edit, models, svg
from sparsegraph.errors import ConfigError, InputError, PlanError
from sparsegraph.recover import LOSS, trainable

# heavy for the default run (kept under 6 minutes on 2 cores): CI runs these after it
pytestmark = [pytest.mark.slow, pytest.mark.ci]


def _batches(example, count=6, seed=0):
    ids, mask = example
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, int(ids.max()) + 1, ids.shape, generator=g), mask) for _ in range(count)]


@pytest.fixture(scope="module")
def pruned():
    """explicit_attention with half its MLP neurons removed, and its calibration batches."""
    torch.manual_seed(0)
    model, example = models.load("explicit_attention")
    batches = _batches(example)
    cm = sg.compile(model, "neuron-pruning", example_inputs=example, calibration=batches, quiet=True)
    return model, example, batches, cm


@pytest.fixture(scope="module")
def recovered(pruned):
    model, example, batches, cm = pruned
    state = {k: v.clone() for k, v in model.state_dict().items()}
    graph = {k: v.clone() for k, v in cm.graph_module.state_dict().items()}
    before = cm(*example)
    rc = sg.recover(cm, batches, steps=40, lr=1e-3, seed=0)
    return rc, state, graph, before


def test_recover_lowers_the_loss(recovered):
    rc = recovered[0]
    run = rc.plan.passes["recover"]["summary"]["runs"][0]
    assert run["loss_after"] < 0.5 * run["loss_before"]
    assert len(run["curve"]) == 40


def test_recover_is_seeded(pruned, recovered):
    again = sg.recover(pruned[3], pruned[2], steps=40, lr=1e-3, seed=0)
    assert again.plan.passes["recover"]["summary"] == recovered[0].plan.passes["recover"]["summary"]


def test_recover_touches_neither_the_model_nor_the_input(pruned, recovered):
    model, example, _, cm = pruned
    rc, state, graph, before = recovered
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert all(p.grad is None for p in model.parameters())
    for name, value in cm.graph_module.state_dict().items():
        assert torch.equal(value, graph[name]), name
    assert "recover" not in cm.plan.passes
    assert torch.equal(cm(*example), before)
    assert not torch.equal(rc(*example), before)


def test_recover_trains_only_added_weights(pruned, recovered):
    cm, rc = pruned[3], recovered[0]
    names = trainable(rc.graph_module)
    assert names and set(names) <= set(rc.graph_module.meta[graph_edit.ADDED])
    assert rc.plan.passes["recover"]["summary"]["runs"][0]["trained"] == names
    ours, theirs = dict(rc.graph_module.named_buffers()), dict(cm.graph_module.named_buffers())
    changed = {n for n in ours if not torch.equal(ours[n], theirs[n])}
    assert changed and changed <= set(names)
    theirs = dict(cm.graph_module.named_parameters())
    shared = {n for n, p in rc.graph_module.named_parameters() if p is theirs[n]}
    assert shared  # the untouched parameters are still the user's, shared, not copied


def test_recover_plan_entry_and_report(recovered, tmp_path):
    rc = recovered[0]
    plan = sg.load_plan(rc.plan.save(tmp_path / "plan.json"))
    assert plan.recovered() == ["recover"]
    assert plan.passes["recover"]["options"] == {"steps": 40, "lr": 1e-3, "seed": 0, "layers": 0.0,
                                                 "batches": 6, "loss": LOSS}
    report = rc.report()
    assert "Recovery (distillation toward the dense model)" in report.to_markdown()
    assert "<polyline" in dict(report.figures)["Recovery loss"]
    assert "sections not drawn" not in report.facts


def test_replaying_a_recovered_plan_is_refused(pruned, recovered):
    model, example = pruned[0], pruned[1]
    with pytest.raises(PlanError, match=r"passes\['recover'\].*sparsegraph.load\(dir\)"):
        sg.compile(model, plan=recovered[0].plan, example_inputs=example)


def test_save_load_keeps_the_recovered_weights(pruned, recovered, tmp_path):
    example, rc = pruned[1], recovered[0]
    loaded = sg.load(rc.save(tmp_path / "model"))
    assert torch.equal(loaded(*example), rc(*example))
    assert loaded.plan.recovered() == ["recover"]
    with pytest.raises(InputError, match="compiled from"):
        sg.recover(loaded, pruned[2], steps=1)


def test_recover_twice_appends_a_run(pruned, recovered):
    again = sg.recover(recovered[0], pruned[2], steps=3, lr=1e-4, seed=1)
    runs = again.plan.passes["recover"]["summary"]["runs"]
    assert [r["options"]["steps"] for r in runs] == [40, 3]
    assert again.plan.passes["recover"]["options"]["seed"] == 1


def test_recover_nm_weights_keeps_positions():
    torch.manual_seed(0)
    model, example = models.load("explicit_attention")
    batches = _batches(example, count=4, seed=1)
    cm = sg.compile(model, "nm-2-4", example_inputs=example, calibration=batches, quiet=True)
    rc = sg.recover(cm, batches, steps=15, lr=1e-3)
    run = rc.plan.passes["recover"]["summary"]["runs"][0]
    assert run["loss_after"] < run["loss_before"]
    ours, theirs = dict(rc.graph_module.named_buffers()), dict(cm.graph_module.named_buffers())
    offsets = [n for n in ours if n.endswith("nm_offsets")]
    assert offsets and all(torch.equal(ours[n], theirs[n]) for n in offsets)
    assert all(n.endswith("nm_values") for n in run["trained"])


def test_recover_through_sparse_linear():
    """Activation sparsity: the input-major weights of ``sparse_linear`` train, centres stay."""
    torch.manual_seed(0)
    model, example = models.load("explicit_attention")
    batches = _batches(example, count=4, seed=2)
    cm = sg.compile(model, "activation-sparsity", example_inputs=example, calibration=batches, quiet=True)
    rc = sg.recover(cm, batches, steps=10, lr=1e-3)
    run = rc.plan.passes["recover"]["summary"]["runs"][0]
    assert run["loss_after"] < run["loss_before"]
    assert run["trained"] and not any("centre" in n for n in run["trained"])
    assert any(n.endswith("weight_t") for n in run["trained"])


def test_recover_layer_wise(pruned, recovered):
    """With a layer-wise term the MLP outputs are distilled too: the final-output loss still drops."""
    rc = sg.recover(pruned[3], pruned[2], steps=20, lr=1e-3, layers=1.0)
    run = rc.plan.passes["recover"]["summary"]["runs"][0]
    assert run["options"]["layers"] == 1.0 and run["loss_after"] < 0.5 * run["loss_before"]


def test_recover_refuses_bad_options(pruned):
    cm, batches = pruned[3], pruned[2]
    with pytest.raises(ConfigError, match="steps"):
        sg.recover(cm, batches, steps=0)
    with pytest.raises(ConfigError, match="lr"):
        sg.recover(cm, batches, lr=float("nan"))
    with pytest.raises(ConfigError, match="layers"):
        sg.recover(cm, batches, layers=-1.0)
    with pytest.raises(sg.CalibrationError, match="list of batches"):
        sg.recover(cm, batches[0][0])


def test_line_chart():
    chart = svg.line("loss", {"a": [3.0, 2.0, 1.0], "b": []}, x_label="step")
    assert chart.startswith("<svg") and chart.count("<polyline") == 1


@pytest.mark.extended  # minutes on 2 cores; the sparse conv's autograd is checked in tests/codegen
def test_recover_efficientnet_conv_sparsity(tmp_path):
    """EfficientNet-Lite0 (ImageNet weights) with 80% of its 1x1 conv weights pruned (batch norm and ReLU6
    folded into the sparse ops): recovery lowers the loss on a fixed seed, trains only the kept values and
    folded biases, leaves the user's model alone, and every form of the recovered model agrees: the
    kernel (reads the block-CSR values), the reference (reads the dense mirror), the ONNX export (a dense
    Conv of the mirror, validated in onnxruntime) and the saved model."""
    from sparsegraph.codegen import use_backend
    from sparsegraph.codegen.sparse_conv1x1 import OP, unpack
    from sparsegraph.data.sample_images import crops

    model, example = models.load("efficientnet_lite0")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    images = crops(8, seed=1)
    batches = [(images[i:i + 2],) for i in range(0, 8, 2)]
    config = {"passes": ["conv_profile", {"conv_sparsity": {"target": 0.8}}]}
    cm = sg.compile(model, config, example_inputs=example, calibration=batches, quiet=True)
    x = crops(2, seed=2)
    with torch.no_grad():
        before = cm(x)
    rc = sg.recover(cm, batches, steps=8, lr=1e-4, seed=0)
    run = rc.plan.passes["recover"]["summary"]["runs"][0]
    assert run["loss_after"] < run["loss_before"]
    assert run["trained"] and all(n.endswith(("csr_values", "sparse_bias")) for n in run["trained"])
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(cm(x), before)
        ours = rc(x)
        assert not torch.equal(ours, before)
        with use_backend("reference"):
            torch.testing.assert_close(rc(x), ours, rtol=1e-4, atol=1e-4)
    gm = rc.graph_module
    nodes = [n for n in gm.graph.nodes if n.target is OP.overload]
    assert len(nodes) == 31
    for node in nodes:  # the mirror is exactly the values laid out dense
        weight, _, values, indices, indptr = (gm.get_buffer(a.target) if a is not None else None
                                              for a in node.args[1:6])
        assert torch.equal(weight[:, :, 0, 0], unpack(values, indices, indptr, *weight.shape[:2]))
    rc.export_onnx(tmp_path / "recovered.onnx")  # validated against rc in onnxruntime
    loaded = sg.load(rc.save(tmp_path / "model"))
    with torch.no_grad():
        assert torch.equal(loaded(x), ours)


def test_recover_progressive_nm_ends_at_the_recorded_2_4_mask(tmp_path):
    """``schedule: progressive``: recovery tightens the mask from dense to 3:4, then 2:4 while it trains; the
    result is a valid 2:4 layer whose kept positions are the ones the plan records (its hash), lower in loss
    than the one-shot model; the user's model is untouched; replay is refused, the saved model keeps it."""
    from sparsegraph.codegen.nm_linear import OP, nm_unpack, positions_digest

    torch.manual_seed(0)
    model, example = models.load("explicit_attention")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batches = _batches(example, count=4, seed=1)
    config = {"passes": [{"nm_weights": {"roles": ["mlp.up", "mlp.down"], "schedule": "progressive"}}]}
    cm = sg.compile(model, config, example_inputs=example, calibration=batches, quiet=True)
    rc = sg.recover(cm, batches, steps=12, lr=1e-3)
    run = rc.plan.passes["recover"]["summary"]["runs"][0]
    assert run["loss_after"] < run["loss_before"]
    assert run["progressive"] and all(s == [[0, 3], [6, 2]] for s in run["progressive"].values())
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    gm = rc.graph_module
    nodes = [n for n in gm.graph.nodes if n.target is OP.overload]
    assert len(nodes) == 6
    moved = 0
    for node in nodes:
        info, path = sg.meta.get(node), sg.ir.module_path(node)
        values, offsets = gm.get_buffer(node.args[1].target), gm.get_buffer(node.args[2].target)
        assert node.args[4:] == (2, 4)
        assert bool((offsets.reshape(offsets.shape[0], -1, 2).diff(dim=-1) > 0).all())  # 2 distinct of 4
        evidence = rc.plan.sites[info.site]["nm_weights"]["evidence"][path]
        assert evidence["positions_sha256"] == positions_digest(offsets)
        before = cm.plan.sites[info.site]["nm_weights"]["evidence"][path]["positions_sha256"]
        moved += before != evidence["positions_sha256"]
        dense = nm_unpack(values, offsets, 2, 4)
        assert bool(((dense != 0).reshape(dense.shape[0], -1, 4).sum(-1) <= 2).all())
    assert moved  # the schedule chose other positions than one-shot magnitude somewhere
    with pytest.raises(PlanError, match="recover"):
        sg.compile(model, plan=rc.plan, example_inputs=example)
    loaded = sg.load(rc.save(tmp_path / "model"))
    assert torch.equal(loaded(*example), rc(*example))
