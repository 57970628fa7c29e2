"""facts: the typed schema of plan evidence. What each analysis pass writes reads back as its dataclass and
writes again to the same JSON; readers get typed values; a broken entry names its key."""

import pytest
import torch

import sparsegraph as sg
from sparsegraph import facts, models
from sparsegraph.codegen import token_scores


@pytest.fixture(scope="module")
def profiled():
    model, example = models.load("explicit_attention")
    g = torch.Generator().manual_seed(1)
    batches = [(ids := torch.randint(0, 1000, (2, 48), generator=g), torch.ones_like(ids)) for _ in range(3)]
    config = {"passes": [{"activation_profile": {"inputs": True}}, {"head_patterns": {"block": 16}},
                         "token_importance"]}
    return sg.compile(model, config, example_inputs=example, calibration=batches, quiet=True).plan


@pytest.mark.parametrize("pass_name,kind,context", [
    ("activation_profile", facts.SiteActivations, {"widths": {"down_input": 512, "mlp_input": 128}}),
    ("head_patterns", facts.SitePatterns, {"heads": 4}),
    ("token_importance", facts.TokenImportance, {"modes": token_scores.MODES}),
])
def test_evidence_round_trips_through_its_dataclass(profiled, pass_name, kind, context):
    sites = [s for s in profiled.sites if profiled.evidence(pass_name, s) is not None]
    assert sites
    for site in sites:
        found = facts.read(profiled, pass_name, site, kind, **context)
        assert isinstance(found, kind) and found.to_json() == profiled.evidence(pass_name, site)


def test_typed_reads(profiled):
    profile = facts.read(profiled, "activation_profile", "mlp:blocks.0.mlp", facts.SiteActivations,
                         widths={"down_input": 512})
    stats = profile.observed["down_input"]
    assert set(profile.observed) == {"down_input"}  # a reader gets the tensors it names
    assert stats.threshold("centred", 0.5) == profiled.evidence("activation_profile", "mlp:blocks.0.mlp")[
        "down_input"]["thresholds"]["centred"]["0.5"]
    assert stats.threshold("centred", 0.55) is None and 0.5 in stats.targets("magnitude")
    assert facts.read(profiled, "head_patterns", "no:such:site", facts.SitePatterns) is None


def test_a_broken_entry_names_its_key(profiled):
    plan = sg.SparsityPlan.from_json(profiled.to_json())
    plan.sites["mlp:blocks.0.mlp"]["activation_profile"]["evidence"]["down_input"]["centre"][3] = "x"
    with pytest.raises(sg.PlanError,
                       match=r"\['down_input'\]\['centre'\]\[3\]: is string 'x', expected a number"):
        facts.read(plan, "activation_profile", "mlp:blocks.0.mlp", facts.SiteActivations,
                   widths={"down_input": 512})
    site = next(s for s in plan.sites if plan.evidence("head_patterns", s))
    plan.sites[site]["head_patterns"]["evidence"]["heads"][0]["params"] = {"window": 0}
    with pytest.raises(sg.PlanError, match=r"\['heads'\]\[0\]\['params'\]"):
        facts.read(plan, "head_patterns", site, facts.SitePatterns)


def test_roi_settings_round_trip():
    model, example = models.load("vit_small")
    batches = [(torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)),)]
    plan = sg.compile(model, {"passes": ["roi"]}, example_inputs=example, calibration=batches,
                      quiet=True).plan
    site = plan.summary("roi")["site"]
    settings = facts.read(plan, "roi", site, facts.RoiSettings)
    assert settings.grid == 14 and settings.to_json() == plan.evidence("roi", site)
