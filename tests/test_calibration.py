"""Degenerate calibration is refused, naming the batch (or site) and the likely mistake, before it can
make a plan out of nothing; overrides that name no site are refused, and the documented ones work."""

import re
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsegraph as sg
from sparsegraph import models
from sparsegraph.data.calibration import calibration_for
from sparsegraph.passes.analysis.head_patterns import choose

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def explicit_model():
    return models.load("explicit_attention")


def _batches(n=2, seq=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(ids := torch.randint(0, 1000, (2, seq), generator=g), torch.ones_like(ids)) for _ in range(n)]


@pytest.mark.parametrize("pipeline", ["sparse-attention", "activation-sparsity", "combined"])
def test_an_all_zero_attention_mask_is_refused_naming_the_batch_and_the_mistake(minilm, pipeline):
    """The bug report: token_type_ids (all zeros) passed where the attention mask goes gave 72 skipped
    heads and cosine 0.30 with no warning."""
    model, example, _ = minilm
    batches = [(ids, torch.zeros_like(mask)) for ids, mask in calibration_for(model, example, 32)]
    with pytest.raises(sg.CalibrationError,
                       match=r"calibration batch 0: .*masks every token.*token_type_ids"):
        sg.compile(model, pipeline, example_inputs=example, calibration=batches, quiet=True)


def test_a_mask_of_token_ids_is_refused(explicit_model):
    model, example = explicit_model
    batches = _batches()
    batches[1] = (batches[1][0], batches[1][0])  # the ids where the mask goes
    with pytest.raises(sg.CalibrationError, match=r"calibration batch 1: .*not a 0/1 attention mask"):
        sg.compile(model, "activation-sparsity", example_inputs=example, calibration=batches, quiet=True)


def test_empty_calibration_is_refused(explicit_model):
    model, example = explicit_model
    with pytest.raises(sg.CalibrationError, match="calibration is empty"):
        sg.compile(model, "activation-sparsity", example_inputs=example, calibration=[], quiet=True)
    with pytest.raises(sg.CalibrationError, match="list of batches"):
        sg.compile(model, "activation-sparsity", example_inputs=example, calibration=example[0], quiet=True)


def test_non_finite_inputs_and_bad_batches_are_refused():
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).eval()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    nan = x.clone()
    nan[2, 3] = float("nan")
    with pytest.raises(sg.CalibrationError, match=r"calibration batch 1: input .* NaN or infinite"):
        sg.compile(model, "activation-sparsity", example_inputs=(x,), calibration=[x, nan], quiet=True)
    with pytest.raises(sg.CalibrationError, match=r"calibration batch 0 does not fit the model's inputs"):
        sg.compile(model, "activation-sparsity", example_inputs=(x,), calibration=[(x, x)], quiet=True)
    with pytest.raises(sg.CalibrationError, match=r"calibration batch 1: a calibration batch is a tensor"):
        sg.compile(model, "activation-sparsity", example_inputs=(x,), calibration=[x, "text"], quiet=True)


def test_constant_calibration_and_too_few_tokens_are_refused():
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).eval()
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(sg.CalibrationError, match="constant"):
        sg.compile(model, "activation-sparsity", example_inputs=(x,), calibration=[torch.zeros(64, 8)],
                   quiet=True)
    with pytest.raises(sg.CalibrationError,
                       match=r"activation_profile: saw 4 token\(s\) at site .*fewer than min_tokens=16"):
        sg.compile(model, "activation-sparsity", example_inputs=(x,), calibration=[x[:4]], quiet=True)
    cm = sg.compile(model, "activation-sparsity", example_inputs=(x,), calibration=[x], quiet=True)
    assert cm.plan.passes["neuron_sparsity"]["stats"]["rewritten"] == 1  # 64 real tokens are enough


def test_nan_activations_are_refused_naming_the_batch_and_site():
    class Overflow(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)

        def forward(self, x):
            return self.down(torch.nn.functional.gelu(self.up(x * 1e38 * 1e38 * x.sign().abs())))

    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(sg.CalibrationError, match=r"calibration batch 0: the activations at site mlp:.* NaN"):
        sg.compile(Overflow().eval(), "activation-sparsity", example_inputs=(x,), calibration=[x], quiet=True)


def test_skip_is_never_chosen_with_skip_share_zero(explicit_model):
    """skip_share 0 means never: heads whose output does not vary are not skipped (the report's 72 heads)."""
    model, example = explicit_model
    ids = torch.full((2, 48), 7)  # one token repeated: every head's output is the same at every position
    config = {"passes": [{"head_patterns": {"block": 16}}]}
    cm = sg.compile(model, config, example_inputs=example, calibration=[(ids, torch.ones_like(ids))],
                    quiet=True)
    for site in cm.plan.sites:
        assert all(h["pattern"] != "skip" for h in cm.plan.evidence("head_patterns", site)["heads"])


def test_patterns_are_not_fitted_where_calibration_saw_no_queries(explicit_model):
    """Short texts padded to a long traced length: query blocks past the texts saw nothing (the bug: one
    block per head at recall 1.0 on calibration, cosine 0.55 on long text)."""
    model, _ = explicit_model
    ids = torch.randint(0, 1000, (2, 96), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros_like(ids)
    mask[:, :20] = 1
    config = {"passes": [{"head_patterns": {"block": 16}}, "sparse_attention"]}
    with pytest.raises(sg.CalibrationError,
                       match=r"5 of 6 query blocks \(positions 16–95\) saw fewer than one block"):
        sg.compile(model, config, example_inputs=(ids, mask), calibration=[(ids, mask)], quiet=True)
    mask[1, :] = 1  # one full row: every block has seen queries
    sg.compile(model, config, example_inputs=(ids, mask), calibration=[(ids, mask)], quiet=True)


@settings(max_examples=60, deadline=None)
@given(nq=st.integers(1, 6), causal=st.booleans(), recall=st.floats(0.05, 1.0), seed=st.integers(0, 10_000),
       sparse=st.booleans())
def test_a_chosen_pattern_always_reaches_the_recall(nq, causal, recall, seed, sparse):
    g = torch.Generator().manual_seed(seed)
    mass = torch.rand(nq, nq, generator=g)
    if sparse:
        mass = mass * (torch.rand(nq, nq, generator=g) < 0.3)
    if float((mass * (torch.ones(nq, nq).tril() if causal else 1)).sum()) == 0:
        mass[0, 0] = 1.0
    head = choose(mass, causal, recall, min_saving=0.0)
    assert head["recall"] >= recall - 1e-6 or head["pattern"] == "dense"
    with pytest.raises(ValueError, match="no attention mass"):
        choose(torch.zeros(nq, nq), causal, recall)


# ------------------------------------------------------------------------------------------- overrides


def test_an_override_that_matches_no_site_is_refused_listing_the_sites(explicit_model):
    model, example = explicit_model
    config = {"passes": ["cost", "nm_weights"], "overrides": {"layer.0.*": {"nm_weights": {"roles": []}}}}
    with pytest.raises(sg.ConfigError, match=r"overrides \['layer.0.\*'\] match no site.*mlp:blocks.0.mlp"):
        sg.compile(model, config, example_inputs=example, quiet=True)


def _yaml_configs(path: Path) -> list[dict]:
    return [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", path.read_text(), re.S)]


@pytest.mark.slow
@pytest.mark.ci
def test_the_documented_overrides_take_effect(minilm):
    """README's nm_weights override keeps layer 0's MLP dense; getting-started's override sets layer 5's
    target."""
    model, example, _ = minilm
    (readme,) = _yaml_configs(ROOT / "README.md")
    cm = sg.compile(model, readme, example_inputs=example, quiet=True)
    decided = cm.plan.passes["nm_weights"]["stats"]
    assert "mlp:encoder.encoder.layer.0" not in {s for s, e in cm.plan.sites.items() if "nm_weights" in e
                                                 and e["nm_weights"].get("decision")}
    assert decided["rewritten"] > 0
    (guide,) = [c for c in _yaml_configs(ROOT / "docs" / "getting-started.md") if c.get("overrides")]
    guide["passes"] = [p for p in guide["passes"] if "speed_check" not in p]  # timing is not what is tested
    cm = sg.compile(model, guide, example_inputs=example, calibration=calibration_for(model, example, 32),
                    quiet=True)
    sparsity = {s: e["neuron_sparsity"]["evidence"]["down_input"]["measured_sparsity"]
                for s, e in cm.plan.sites.items() if "neuron_sparsity" in e}
    assert sparsity["mlp:encoder.encoder.layer.5"] == pytest.approx(0.3)
    assert sparsity["mlp:encoder.encoder.layer.0"] == pytest.approx(0.6)
