"""Activation sparsity on the zoo models: sparsity 0 is dense; llama_tiny (gated, GQA) compiles and
exports."""

import pytest
import torch

import sparsegraph as sg
from sparsegraph import models
from sparsegraph.codegen.sparse_linear import OP
from sparsegraph.onnx_export import OnnxModel


def _calibration(name, model, example):
    g = torch.Generator().manual_seed(3)
    if name == "minilm":
        from sparsegraph.data.stdlib_text import sentences

        texts = sentences("calibration", limit=16)
        return [model.tokenize(texts[:8]), model.tokenize(texts[8:])]
    if name == "vit_small":
        return [(torch.randn(2, 3, 224, 224, generator=g),)]
    return [(torch.randint(0, 1000, (2, 32), generator=g),) for _ in range(2)]


def _sparsity_zero_is_dense(name):
    model, example = models.load(name)
    calibration = _calibration(name, model, example)
    with torch.no_grad():
        expected = model(*example)
    for passes in ([{"neuron_sparsity": {"target": 0.0}}], [{"neuron_pruning": {"fraction": 0.0}}]):
        cm = sg.compile(model, {"passes": ["activation_profile", *passes]}, example_inputs=example,
                        calibration=calibration, quiet=True)
        with torch.no_grad():
            got = cm(*example)
        for g_, e in zip(*(torch.utils._pytree.tree_leaves(t) for t in (got, expected))):
            torch.testing.assert_close(g_, e, rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.ci  # ~10 s; the explicit model checks the same in the default run
def test_sparsity_zero_is_dense_minilm():
    _sparsity_zero_is_dense("minilm")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_small", "llama_tiny"])
def test_sparsity_zero_is_dense_heavy(name):
    _sparsity_zero_is_dense(name)


@pytest.mark.slow
@pytest.mark.ci
def test_llama_tiny_teal_sparsity_compiles_and_exports(tmp_path):
    model, example = models.load("llama_tiny")
    cm = sg.compile(model, "llm-activation-sparsity", example_inputs=example,
                    calibration=_calibration("llama_tiny", model, example), quiet=True)
    stats = cm.plan.passes["neuron_sparsity"]["stats"]
    assert (stats["matched"], stats["rewritten"], stats["refused"]) == (8, 8, [])  # 4 MLPs, 4 attentions
    nodes = [n for n in cm.graph_module.graph.nodes if n.target is OP.overload]
    assert len(nodes) == 16  # per layer: q/k/v fused (one shared input), o, gate+up fused, down
    ort = OnnxModel(cm.export_onnx(tmp_path / "llama.onnx"), cm.graph_module)
    _, other = models.load("llama_tiny", seq_len=20, batch=2)
    for inputs in (example, other):
        with torch.no_grad():
            expected = cm(*inputs)
        torch.testing.assert_close(ort(*inputs), expected, rtol=0, atol=1e-4)
