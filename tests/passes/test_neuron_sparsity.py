"""neuron_sparsity: structure (down projections → sparse_linear), numerics, counts, target 0, replay."""

import pytest
import torch

import sparsegraph as sg
from sparsegraph import ir, meta
from sparsegraph.codegen.sparse_linear import OP


def _compile(model, example, batches, profile=None, **options):
    config = {"passes": [{"activation_profile": profile or {}}, {"neuron_sparsity": options}]}
    return sg.compile(model, config, example_inputs=example, calibration=batches, quiet=True)


def test_structure_down_projections_become_sparse_linear(explicit_calibrated):
    cm = _compile(*explicit_calibrated, target=0.5)
    gm = cm.graph_module
    nodes = [n for n in gm.graph.nodes if n.target is OP.overload]
    assert len(nodes) == 3 and {meta.get(n).role for n in nodes} == {"mlp.down"}
    for n in nodes:
        x, w_t, _, centre, threshold, k = n.args
        assert meta.get(x).role == "mlp.act"  # fed by the activation, as the site says
        assert ir.shape(w_t) == (512, 128) and ir.shape(centre) == (512,) and threshold > 0 and k == 0
        assert meta.get(n).density == pytest.approx(0.5)
    assert len(ir.mlp_sites(gm)) == 0  # the down linear is gone, so no plain MLP site remains
    assert cm.cost.macs < cm.dense_cost.macs


def test_numeric_equals_the_masked_dense_computation(explicit_calibrated):
    model, example, batches = explicit_calibrated
    cm = _compile(model, example, batches, target=0.5, method="centred")

    def masked(c, t):  # the dense MLP fed masked(a − c) + c: what sparse_linear computes, W c folded in
        return lambda module, args: (torch.where((args[0] - c).abs() > t, args[0] - c, 0) + c,)

    hooks = [block.mlp[2].register_forward_pre_hook(masked(*_ct(cm, i)))
             for i, block in enumerate(model.blocks)]
    try:
        with torch.no_grad():
            expected = model(*example)
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(cm(*example), expected, rtol=1e-4, atol=1e-4)


def _ct(cm, i):
    d = cm.plan.sites[f"mlp:blocks.{i}.mlp"]["neuron_sparsity"]["decision"]["down_input"]
    return torch.tensor(d["centre"]), d["threshold"]


def test_target_zero_is_exactly_dense_and_refused_with_reason(explicit_calibrated):
    model, example, batches = explicit_calibrated
    cm = _compile(model, example, batches, target=0.0)
    with torch.no_grad():
        torch.testing.assert_close(cm(*example), model(*example), rtol=0, atol=1e-6)
    stats = cm.plan.passes["neuron_sparsity"]["stats"]
    assert stats["matched"] == 3 and stats["rewritten"] == 0
    assert {r["reason"] for r in stats["refused"]} == {"target 0: the site stays dense"}


def test_counts_overrides_and_unrecorded_target(explicit_calibrated):
    model, example, batches = explicit_calibrated
    config = {"passes": [{"activation_profile": {}}, {"neuron_sparsity": {"target": 0.5}}],
              "overrides": {"blocks.1.*": {"neuron_sparsity": {"target": 0.0}},
                            "blocks.2.*": {"neuron_sparsity": {"target": 0.55}}}}
    cm = sg.compile(model, config, example_inputs=example, calibration=batches, quiet=True)
    stats = cm.plan.passes["neuron_sparsity"]["stats"]
    assert (stats["matched"], stats["rewritten"], len(stats["refused"])) == (3, 1, 2)
    reasons = {r["site"]: r["reason"] for r in stats["refused"]}
    assert ("not 0.55" in reasons["mlp:blocks.2.mlp"]
            and "add it to activation_profile" in reasons["mlp:blocks.2.mlp"])


@pytest.mark.slow  # two calibrated compiles per method: 10 s
@pytest.mark.ci
@pytest.mark.parametrize("method", ["magnitude", "topk"])
def test_other_methods_and_input_sparsity(explicit_calibrated, method):
    cm = _compile(*explicit_calibrated, profile={"inputs": True}, target=0.5, method=method, inputs=True)
    nodes = [n for n in cm.graph_module.graph.nodes if n.target is OP.overload]
    assert sorted(meta.get(n).role for n in nodes) == sorted(["mlp.down", "mlp.up"] * 3)
    k = {meta.get(n).role: n.args[5] for n in nodes}
    if method == "topk":
        assert k == {"mlp.down": 256, "mlp.up": 64}
    else:
        assert set(k.values()) == {0} and all(n.args[3] is None for n in nodes)  # magnitude: no centre


@pytest.mark.slow  # compile and replay: 6 s
@pytest.mark.ci
def test_replay_from_plan_needs_no_calibration(explicit_calibrated, tmp_path):
    model, example, batches = explicit_calibrated
    cm = _compile(model, example, batches, target=0.6)
    path = cm.plan.save(tmp_path / "plan.json")
    again = sg.compile(model, plan=path, example_inputs=example, quiet=True)
    assert torch.equal(again(*example), cm(*example))
    assert again.plan.passes["activation_profile"]["stats"]["counters"].get("replayed") is True


@pytest.mark.slow
@pytest.mark.ci  # ~5 s: MiniLM
def test_core_mode_keeps_one_set_per_sequence(explicit_calibrated, tmp_path):
    from sparsegraph.codegen import core_linear
    from sparsegraph.onnx_export import OnnxModel

    model, example, batches = explicit_calibrated
    cm = _compile(model, example, batches, target=0.75, method="core", core_prefix=8)
    nodes = [n for n in cm.graph_module.graph.nodes if n.target is core_linear.OP.overload]
    assert len(nodes) == 3 and all(n.args[4:] == (128, 8) for n in nodes)  # k = 25% of 512, prefix 8
    x = torch.randn(2, 20, 512)
    w_t, c = torch.randn(512, 128), torch.randn(512) * 0.1
    ref = core_linear.reference(x, w_t, None, c, 128, 8)
    torch.testing.assert_close(core_linear.cpu(x, w_t, None, c, 128, 8), ref, rtol=1e-5, atol=1e-4)
    used = (core_linear.reference(x, torch.eye(512), None, None, 128, 8) != 0)
    assert (used.any(1).sum(-1) <= 128).all()  # every token of a sequence uses the same ≤ k inputs
    ort = OnnxModel(cm.export_onnx(tmp_path / "core.onnx"), cm.graph_module)
    torch.testing.assert_close(ort(*example), cm(*example), rtol=0, atol=1e-4)


@pytest.mark.slow
@pytest.mark.ci  # ~8 s: three compiles
def test_config_with_a_saved_profile_does_not_profile_again(explicit_calibrated, tmp_path, monkeypatch):
    from sparsegraph.passes.analysis.activation_profile import ActivationProfile

    model, example, batches = explicit_calibrated
    direct = _compile(model, example, batches, target=0.7)
    profile = sg.compile(model, {"passes": ["activation_profile"]}, example_inputs=example,
                         calibration=batches, quiet=True)
    path = profile.plan.save(tmp_path / "profile.json")
    monkeypatch.setattr(ActivationProfile, "analyze", lambda *a: pytest.fail("profiled again"))
    tuned = {}
    for target in (0.5, 0.7):
        config = {"passes": ["activation_profile", {"neuron_sparsity": {"target": target}}]}
        tuned[target] = sg.compile(model, config, plan=path, example_inputs=example, quiet=True)
        assert tuned[target].plan.passes["neuron_sparsity"]["stats"]["rewritten"] == 3
    assert torch.equal(tuned[0.7](*example), direct(*example))  # the same as profiling in this compile
    assert tuned[0.7].plan.passes["activation_profile"]["stats"]["matched"] == 3
    with pytest.raises(sg.ConfigError, match="ran with options"):
        sg.compile(model, {"passes": [{"activation_profile": {"reservoir": 64}}, "neuron_sparsity"]},
                   plan=path, example_inputs=example, quiet=True)


@pytest.mark.slow
@pytest.mark.ci  # ~8 s: llama_tiny, every projection
def test_teal_on_every_projection(explicit_calibrated, tmp_path):
    from sparsegraph.onnx_export import OnnxModel

    model, example, batches = explicit_calibrated
    cm = _compile(model, example, batches, profile={"inputs": True, "attention": True}, target=0.5,
                  method="magnitude", inputs=True, attention=True)
    stats = cm.plan.passes["neuron_sparsity"]["stats"]
    assert (stats["matched"], stats["rewritten"], stats["refused"]) == (6, 6, [])  # 3 MLP + 3 attention
    nodes = [n for n in cm.graph_module.graph.nodes if n.target is OP.overload]
    # per block: q/k/v fused (one input), out, MLP up, MLP down
    assert len(nodes) == 12 and sorted(ir.shape(n.args[1]) for n in nodes)[:3] == [(128, 128)] * 3
    assert sorted(ir.shape(n.args[1]) for n in nodes).count((128, 384)) == 3  # fused q, k, v weights
    ort = OnnxModel(cm.export_onnx(tmp_path / "teal.onnx"), cm.graph_module)
    torch.testing.assert_close(ort(*example), cm(*example), rtol=0, atol=1e-4)
    # without attention statistics the attention sites are refused, with the reason
    cm = _compile(model, example, batches, target=0.5, attention=True)
    refused = {r["site"]: r["reason"] for r in cm.plan.passes["neuron_sparsity"]["stats"]["refused"]}
    assert "attention: true" in refused["attn:blocks.0.attn"]


def test_fused_gate_up_is_one_sparse_op_and_dense_at_target_0(fused_gated):
    """Down-projection sparsity needs nothing of the fused form; input sparsity makes the one fused linear
    one op of 2I outputs, split as before."""
    model = fused_gated()
    g = torch.Generator().manual_seed(0)
    example, batches = (torch.randn(2, 8, 32, generator=g),), [(torch.randn(4, 8, 32, generator=g),)]
    cm = _compile(model, example, batches, profile={"inputs": True}, target=0.5, inputs=True)
    assert cm.plan.passes["neuron_sparsity"]["stats"]["rewritten"] == 1
    nodes = [n for n in cm.graph_module.graph.nodes if n.target is OP.overload]
    weights = {meta.get(n).role: ir.shape(n.args[1]) for n in nodes}  # Wᵀ: [inputs, outputs]
    assert weights == {"mlp.up": (32, 128), "mlp.down": (64, 32)}
    with torch.no_grad():
        assert torch.isfinite(cm(*example)).all() and not torch.equal(cm(*example), model(*example))
    cm = _compile(model, example, batches, profile={"inputs": True}, target=0.0, inputs=True)
    with torch.no_grad():
        torch.testing.assert_close(cm(*example), model(*example), rtol=0, atol=0)
