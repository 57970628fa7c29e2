"""token_importance: the per-layer statistics it writes, their numerics, and its counts."""

import pytest
import torch

import sparsegraph as sg
from sparsegraph import ir, models
from sparsegraph.attention_scores import mass_kept, score_mode


def test_mass_kept_by_hand():
    scores = torch.tensor([[9.0, 4.0, 3.0, 2.0, 1.0], [0.0, 1.0, 1.0, 1.0, float("-inf")]])
    # row 0, protect 1: n = 4, top ⌈0.5·4⌉ = 2 of (4, 3, 2, 1) → 7/10; row 1: n = 3 finite, top 2 → 2/3
    torch.testing.assert_close(mass_kept(scores, 0.5, 1), torch.tensor([0.7, 2 / 3]))
    torch.testing.assert_close(mass_kept(scores, 1.0, 1), torch.tensor([1.0, 1.0]))


def test_auto_score_mode():
    model, example = models.load("explicit_attention")
    site = ir.attention_sites(sg.trace(model, example))[0]
    assert score_mode(site, "auto", protect=1) == "cls"
    assert score_mode(site, "auto", protect=0) == "received"
    assert score_mode(site, "last", protect=1) == "last"


@pytest.mark.parametrize("score", ["cls", "received"])
def test_every_layer_gets_a_mass_curve(explicit_calibrated, score):
    model, example, batches = explicit_calibrated
    cm = sg.compile(model, {"passes": [{"token_importance": {"score": score}}]}, example_inputs=example,
                    calibration=batches, quiet=True)
    stats = cm.plan.passes["token_importance"]["stats"]
    assert stats["matched"] == 3 and stats["refused"] == [] and stats["counters"]["batches"] == 4
    table = cm.plan.summary("token_importance")["mass_kept_per_layer"]
    assert sorted(table) == ["0", "1", "2"]
    for curve in table.values():
        values = [curve[k] for k in ("0.3", "0.5", "0.7", "0.9")]
        # top r hold ≥ r of the mass
        assert values == sorted(values) and values[0] >= 0.3 and values[-1] <= 1.0
    evidence = cm.plan.evidence("token_importance", ir.attention_sites(cm.graph_module)[0].id)
    assert evidence["score"] == score and evidence["sequences"] == 8
    assert len(evidence["position_mean"]) == 48  # every calibration batch has 48 tokens


def test_statistics_match_the_attention_probabilities(explicit_calibrated):
    """Layer-0 cls mass at keep 0.5 recomputed by hand from the model's own softmax."""
    model, example, batches = explicit_calibrated
    cm = sg.compile(model, {"passes": ["token_importance"]}, example_inputs=example, calibration=batches,
                    quiet=True)
    expected = []
    with torch.no_grad():
        for ids, mask in batches:
            x = model.embed(ids) + model.pos[: ids.shape[1]]
            h = model.blocks[0].norm1(x)
            att = model.blocks[0].attn
            b, s, _ = h.shape
            q = att.q(h).view(b, s, att.heads, -1).transpose(1, 2)
            k = att.k(h).view(b, s, att.heads, -1).transpose(1, 2)
            additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
            p = ((q @ k.transpose(-1, -2)) / att.head_dim ** 0.5 + additive).softmax(-1)
            cls = p[:, :, 0].mean(1).masked_fill(mask == 0, float("-inf"))
            expected.append(mass_kept(cls, 0.5, 1))
    site = ir.attention_sites(cm.graph_module)[0].id
    got = cm.plan.evidence("token_importance", site)["mass_kept"]["0.5"]
    assert got == pytest.approx(torch.cat(expected).mean().item(), abs=1e-4)
