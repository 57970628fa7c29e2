"""token_pruning: the graph it produces, numerics against a hand-written pruned forward, counts and
refusals, plan replay, ONNX Runtime parity at several lengths, and MiniLM's mask and pooling."""

import math

import pytest
import torch

import sparsegraph as sg
from sparsegraph import models
from sparsegraph.codegen import token_gather, token_scores, token_select
from sparsegraph.onnx_export import OnnxModel
from sparsegraph.passes.analysis.roi import rois

PRUNE = {"passes": [{"token_pruning": {"layers": [1, 2], "keep": 0.5}}]}


def _targets(cm):
    return [n.target for n in cm.graph_module.graph.nodes if n.op == "call_function"]


@pytest.fixture(scope="module")
def explicit_pruned():
    model, example = models.load("explicit_attention")
    return model, example, sg.compile(model, PRUNE, example_inputs=example, quiet=True)


def _padded(B=2, L=64, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (B, L), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, L - 10:] = 0
    return ids, mask


def _reference(model, ids, mask, layers, keep, protect=1):
    """The explicit model run block by block, keeping [CLS] and the top tokens by the previous block's
    class-token attention before each pruned block (written from the model code, not from the graph)."""
    x = model.embed(ids) + model.pos[: ids.shape[1]]
    additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    probs = None
    for i, block in enumerate(model.blocks):
        if i in layers:
            cls = probs[:, :, 0].mean(1).masked_fill(additive[:, 0, 0] <= -1e4, float("-inf"))
            n = x.shape[1] - protect
            k = max(1, round(n * keep))
            top = cls[:, protect:].topk(k, dim=1).indices.sort(1).values + protect
            index = torch.cat([torch.arange(protect).expand(x.shape[0], protect), top], 1)
            x = torch.stack([x[b, index[b]] for b in range(x.shape[0])])
            additive = torch.stack([additive[b][..., index[b]] for b in range(x.shape[0])])
        h = block.norm1(x)
        att = block.attn
        b, s, _ = h.shape
        q, kk, v = (t.view(b, s, att.heads, att.head_dim).transpose(1, 2)
                    for t in (att.q(h), att.k(h), att.v(h)))
        probs = ((q @ kk.transpose(-1, -2)) / math.sqrt(att.head_dim) + additive).softmax(-1)
        x = x + att.out((probs @ v).transpose(1, 2).reshape(b, s, -1))
        x = x + block.mlp(block.norm2(x))
    return model.norm(x)


def test_structure_scores_select_and_the_mask_follows(explicit_pruned):
    _, _, cm = explicit_pruned
    targets = _targets(cm)
    assert targets.count(token_scores.OP.overload) == 2
    assert targets.count(token_select.OP.overload) == 2
    gathers = [n for n in cm.graph_module.graph.nodes if n.target is token_gather.OP.overload]
    assert gathers and all(n.args[2] == [3] for n in gathers), (
        "the [B, 1, 1, N] key mask follows the kept tokens")
    stats = cm.plan.passes["token_pruning"]["stats"]
    assert stats["counters"]["schedule"] == {"1": 33, "2": 17}  # 64 → 1 + round(63/2) → 1 + 16


def test_numerics_match_a_hand_written_pruned_forward(explicit_pruned):
    model, _, cm = explicit_pruned
    ids, mask = _padded()
    with torch.no_grad():
        got = cm(ids, mask)
        expected = _reference(model, ids, mask, {1, 2}, 0.5)
    assert got.shape == expected.shape == (2, 17, 128)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_one_graph_serves_other_lengths(explicit_pruned):
    model, _, cm = explicit_pruned
    for L in (40, 100):
        ids, mask = _padded(L=L, seed=L)
        with torch.no_grad():
            torch.testing.assert_close(cm(ids, mask), _reference(model, ids, mask, {1, 2}, 0.5),
                                       rtol=1e-4, atol=1e-4)


def test_keep_one_and_layer_zero_are_refused_with_reasons():
    model, example = models.load("explicit_attention")
    cm = sg.compile(model, {"passes": [{"token_pruning": {"layers": [0, 1], "keep": 1.0}}]},
                    example_inputs=example, quiet=True)
    stats = cm.plan.passes["token_pruning"]["stats"]
    assert stats["matched"] == 2 and stats["rewritten"] == 0
    reasons = " ".join(r["reason"] for r in stats["refused"])
    assert "nothing to drop" in reasons
    cm0 = sg.compile(model, {"passes": [{"token_pruning": {"layers": [0, 7], "keep": 0.5}}]},
                     example_inputs=example, quiet=True)
    stats0 = cm0.plan.passes["token_pruning"]["stats"]
    assert "no attention before this block" in stats0["refused"][0]["reason"]
    assert stats0["counters"]["layers_not_found"] == [7]
    assert token_select.OP.overload not in _targets(cm0)
    with torch.no_grad():
        torch.testing.assert_close(cm0(*example), model(*example))


def test_a_token_count_equal_to_another_axis_is_refused():
    model, _ = models.load("explicit_attention")
    ids = torch.randint(0, 1000, (2, 128), generator=torch.Generator().manual_seed(0))  # 128 = model width
    cm = sg.compile(model, PRUNE, example_inputs=(ids, torch.ones_like(ids)), quiet=True)
    stats = cm.plan.passes["token_pruning"]["stats"]
    assert stats["rewritten"] == 0 and all("equals another axis" in r["reason"] for r in stats["refused"])


def test_the_users_model_is_untouched(explicit_pruned):
    model, example, _ = explicit_pruned
    fresh, _ = models.load("explicit_attention")
    with torch.no_grad():
        torch.testing.assert_close(model(*example), fresh(*example))


def test_plan_replays_without_calibration(explicit_pruned, tmp_path):
    model, example, cm = explicit_pruned
    cm.plan.save(tmp_path / "plan.json")
    again = sg.compile(model, plan=tmp_path / "plan.json", example_inputs=example, quiet=True)
    ids, mask = _padded(seed=9)
    with torch.no_grad():
        torch.testing.assert_close(again(ids, mask), cm(ids, mask))


@pytest.mark.slow
@pytest.mark.ci
def test_onnx_matches_in_onnxruntime_at_several_lengths(explicit_pruned, tmp_path):
    _, _, cm = explicit_pruned
    path = cm.export_onnx(tmp_path / "pruned.onnx")
    session = OnnxModel(path, cm.graph_module)
    for L in (64, 40, 100):
        ids, mask = _padded(L=L, seed=L)
        with torch.no_grad():
            expected = cm(ids, mask)
        got = session(ids, mask)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.ci  # ~6 s: MiniLM
def test_fused_token_is_appended(tmp_path):
    model, example = models.load("explicit_attention")
    cm = sg.compile(model, {"passes": [{"token_pruning": {"layers": [2], "keep": 0.5, "fuse": True}}]},
                    example_inputs=example, quiet=True)
    with torch.no_grad():
        out = cm(*example)
    assert out.shape[1] == 1 + 32 + 1
    session = OnnxModel(cm.export_onnx(tmp_path / "fused.onnx"), cm.graph_module)
    torch.testing.assert_close(session(*example), out, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def minilm():
    return models.load("minilm")


def test_minilm_mask_and_mean_pooling_follow_the_kept_tokens(minilm):
    model, example = minilm
    cm = sg.compile(model, {"passes": [{"token_pruning": {"layers": [4], "keep": 0.5}}]},
                    example_inputs=example, quiet=True)
    gathered = [n.args[0].name for n in cm.graph_module.graph.nodes if n.target is token_gather.OP.overload]
    assert any("attention_mask" in name for name in gathered), gathered  # pooling weights and their count
    texts = ["A short sentence.", "This sentence is noticeably longer than the first one, and so it is "
             "padded less than the other one in the batch."]
    ids, mask = model.tokenize(texts)
    with torch.no_grad():
        emb = cm(ids, mask)
        dense = model(ids, mask)
    assert torch.isfinite(emb).all()
    assert torch.nn.functional.cosine_similarity(emb, dense).min() > 0.9


@pytest.mark.slow
@pytest.mark.ci  # ~20 s: timm ViT-S export
def test_vit_small_onnx_matches_in_onnxruntime(tmp_path):
    """timm ViT-S/16 (class token, literal 197s in its reshapes) pruned at two blocks, ORT parity."""
    model, example = models.load("vit_small")
    cm = sg.compile(model, {"passes": [{"token_pruning": {"layers": [3, 6], "keep": 0.7}}]},
                    example_inputs=example, quiet=True)
    assert cm.plan.passes["token_pruning"]["stats"]["counters"]["schedule"] == {"3": 138, "6": 97}
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = cm(x)
    session = OnnxModel(cm.export_onnx(tmp_path / "vit_small.onnx"), cm.graph_module)
    torch.testing.assert_close(session(x), expected, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def digits():
    from sparsegraph.models import digits_vit

    model, example = models.load("digits_vit")
    return model, example, digits_vit.dataset("test"), [(digits_vit.dataset("train").images[:128],)]


def _accuracy(fn, data, batch=120):
    with torch.no_grad():
        pred = torch.cat([fn(data.images[i:i + batch]).argmax(-1) for i in range(0, len(data.labels), batch)])
    return (pred == data.labels).float().mean().item()


def test_digits_keep_half_from_block_2_costs_at_most_one_point(digits):
    model, example, test, _ = digits
    cm = sg.compile(model, {"passes": [{"token_pruning": {"layers": [2], "keep": 0.5}}]},
                    example_inputs=example, quiet=True)
    assert cm.plan.passes["token_pruning"]["stats"]["counters"]["schedule"] == {"2": 33}
    assert _accuracy(model, test) - _accuracy(cm, test) <= 0.01


@pytest.mark.slow  # trains nothing but compiles digits_vit with RoIs twice: 12 s
@pytest.mark.ci
def test_digits_rois_find_the_digit_and_roi_tokens_keep_accuracy(digits):
    model, example, test, calibration = digits
    cm = sg.compile(model, {"passes": ["roi", {"token_pruning": {"layers": [4], "select": "roi"}}]},
                    example_inputs=example, calibration=calibration, quiet=True)
    assert cm.plan.passes["token_pruning"]["stats"]["rewritten"] == 1
    targets = [n.target for n in cm.graph_module.graph.nodes]
    assert torch.ops.sparsegraph.roi_scores.default in targets
    boxes = rois(cm, test.images[:120])
    ious = [b[0].iou(tuple(t)) for b, t in zip(boxes, test.boxes[:120].tolist())]
    assert sum(ious) / len(ious) >= 0.5
    subset = type(test)(test.images[:120], test.labels[:120], test.boxes[:120], test.source[:120])
    assert _accuracy(model, subset, 1) - _accuracy(cm, subset, 1) <= 0.015
    with pytest.raises(sg.ExportError, match=r"roi_scores.*no ONNX translation"):
        cm.export_onnx("/nonexistent/never.onnx")


def test_roi_selection_without_the_roi_pass_is_refused(digits):
    model, example, _, _ = digits
    cm = sg.compile(model, {"passes": [{"token_pruning": {"layers": [4], "select": "roi"}}]},
                    example_inputs=example, quiet=True)
    (refusal,) = cm.plan.passes["token_pruning"]["stats"]["refused"]
    assert "needs the roi pass" in refusal["reason"]


def test_core_token_scores_read_the_previous_mlp(explicit_calibrated):
    model, example, batches = explicit_calibrated
    config = {"passes": ["activation_profile",
                         {"token_pruning": {"layers": [2], "keep": 0.5, "score": "core"}}]}
    cm = sg.compile(model, config, example_inputs=example, calibration=batches, quiet=True)
    (core,) = [n for n in cm.graph_module.graph.nodes
               if n.target is torch.ops.sparsegraph.core_scores.default]
    assert core.args[0].target is torch.ops.aten.gelu.default  # block 1's MLP activations
    decision = cm.plan.sites["attn:blocks.2.attn"]["token_pruning"]["decision"]
    hot = cm.plan.evidence("activation_profile", "mlp:blocks.1.mlp")["down_input"]["hot"]
    assert decision["core"]["hot"] == hot and decision["core"]["mlp_site"] == "mlp:blocks.1.mlp"
    with torch.no_grad():
        assert cm(*example).shape == (2, 33, 128)
    refused = sg.compile(model, {"passes": [{"token_pruning": {"layers": [2], "score": "core"}}]},
                         example_inputs=example, quiet=True)
    assert "needs activation_profile" in refused.plan.passes["token_pruning"]["stats"]["refused"][0]["reason"]
