"""Plans written by an earlier sparsegraph still replay, to the same outputs.

`tests/fixtures/plans-8e00b3d/` holds plans (and the outputs their compiled models gave) written by
sparsegraph at commit 8e00b3d, before the reliability and architecture work changed how layouts, facts
and evidence are held in code: the plan schema (version 1) did not change, so those plans must compile
here with the same rewrites and give the same outputs. Regenerate nothing here: these files are the
record of what older versions wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sparsegraph as sg
from sparsegraph import models, pipelines

FIXTURES = Path(__file__).parent / "fixtures" / "plans-8e00b3d"
# The default run replays one plan per kind of evidence; CI replays them all.
DEFAULT = ("explicit_attention--activation-sparsity", "explicit_attention--nm-2-4",
           "digits_vit--sparse-attention", "digits_vit--vit-token-pruning")
NAMES = sorted(p.stem for p in FIXTURES.glob("*.json"))  # "<zoo model>--<pipeline>"
CASES = [case if case in DEFAULT else pytest.param(case, marks=[pytest.mark.slow, pytest.mark.ci])
         for case in NAMES]


@pytest.fixture(scope="module")
def zoo():
    return {"explicit_attention": models.load("explicit_attention", seq_len=64),
            "digits_vit": models.load("digits_vit")}


def test_every_pipeline_that_rewrites_has_a_fixture():
    assert {name.split("--")[1] for name in NAMES} == set(pipelines.names()) - {"dense", "analyze"}
    assert set(DEFAULT) <= set(NAMES)


@pytest.mark.parametrize("case", CASES)
def test_an_older_plan_replays_to_the_same_outputs(case, zoo):
    model_name = case.split("--")[0]
    model, example = zoo[model_name]
    plan = json.loads((FIXTURES / f"{case}.json").read_text())
    cm = sg.compile(model, plan=FIXTURES / f"{case}.json", example_inputs=example, quiet=True)
    for name, record in plan["passes"].items():
        rewritten = record.get("stats", {}).get("rewritten")
        if rewritten is not None:
            assert cm.plan.passes[name]["stats"]["rewritten"] == rewritten, name
    expected = load_file(FIXTURES / f"{case}.safetensors")["output"]
    with torch.no_grad():
        got = cm(*example)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_an_option_added_since_must_be_at_its_default(zoo, tmp_path):
    """An older plan does not record options added later (activation_profile's ``min_tokens``): they
    replay at their defaults, and a plan whose config sets one anyway is refused, naming it."""
    plan = json.loads((FIXTURES / "explicit_attention--activation-sparsity.json").read_text())
    assert "min_tokens" not in plan["passes"]["activation_profile"]["options"]
    plan["config"]["passes"][0]["activation_profile"]["min_tokens"] = 32
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    model, example = zoo["explicit_attention"]
    with pytest.raises(sg.PlanError, match=r"differs from the plan's config at \['min_tokens'\]"):
        sg.compile(model, plan=tmp_path / "plan.json", example_inputs=example, quiet=True)
