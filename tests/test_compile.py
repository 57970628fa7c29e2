"""sparsegraph.compile: the user's model is untouched, the empty pipeline is exact, errors are clear."""

import hashlib

import pytest
import torch

import sparsegraph as sg
from sparsegraph import models

FAST = [
    # ~6 s; test_runtime_contract's dense MiniLM checks the same by default
    pytest.param("minilm", marks=[pytest.mark.slow, pytest.mark.ci]),
    "explicit_attention"]
HEAVY = ["vit_b_16", "resnet50", "vit_small", "llama_tiny"]


def _digest(model: torch.nn.Module) -> dict[str, str]:
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {k: hashlib.sha256(v.detach().contiguous().numpy().tobytes()).hexdigest()
            for k, v in state.items()}


def _check_dense_and_untouched(name):
    model, example = models.load(name)
    before, training = _digest(model), model.training
    with torch.no_grad():
        expected = model(*example)
    cm = sg.compile(model, "dense", example_inputs=example, quiet=True)
    with torch.no_grad():
        got = cm(*example)
    for g, e in zip(*(torch.utils._pytree.tree_leaves(t) for t in (got, expected))):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-6)
    cm_nm = sg.compile(model, "nm-2-4", example_inputs=example, quiet=True)
    with torch.no_grad():
        cm_nm(*example)
    assert _digest(model) == before and model.training == training


@pytest.mark.parametrize("name", FAST)
def test_empty_pipeline_is_exact_and_model_untouched(name):
    _check_dense_and_untouched(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", HEAVY)
def test_empty_pipeline_is_exact_and_model_untouched_heavy(name):
    _check_dense_and_untouched(name)


def test_compiled_model_is_a_module_with_plan_report_and_cost():
    model, example = models.load("explicit_attention")
    cm = sg.compile(model, "nm-2-4", example_inputs=example, quiet=True)
    assert isinstance(cm, torch.nn.Module)
    assert cm.plan.model["class"] == "ExplicitTransformer"
    assert cm.cost.macs < cm.dense_cost.macs  # N:M MLPs execute half their MACs
    assert set(cm.timings) == {"cost", "nm_weights"}
    md = cm.report().to_markdown()
    assert "| nm_weights | rewrite | 6 | 6 | 0 |" in md


@pytest.mark.slow
@pytest.mark.ci  # ~9 s: exports MiniLM; tests/test_threads.py runs the ONNX backend by default
def test_onnx_backend_runs_the_exported_file():
    model, example = models.load("explicit_attention")
    eager = sg.compile(model, "nm-2-4", example_inputs=example, quiet=True)
    onnx_cm = sg.compile(model, {**eager.config.to_dict(), "backend": "onnx"}, example_inputs=example,
                         quiet=True)
    torch.testing.assert_close(onnx_cm(*example), eager(*example), rtol=1e-4, atol=1e-4)


def test_calibration_required_by_a_profiling_pass():
    @sg.register_pass("test_needs_calibration")
    class NeedsCalibration(sg.AnalysisPass):
        needs_calibration = True

        def analyze(self, gm, ctx, stats):
            stats.matched = len(ctx.calibration)

    model, example = models.load("explicit_attention")
    config = {"passes": ["test_needs_calibration"]}
    with pytest.raises(sg.ConfigError, match="calibration=\\[batch"):
        sg.compile(model, config, example_inputs=example, quiet=True)
    cm = sg.compile(model, config, example_inputs=example, calibration=[example, example], quiet=True)
    assert cm.plan.passes["test_needs_calibration"]["stats"]["matched"] == 2
