"""``pyramid`` through head_patterns and sparse_attention: which heads take it and why (its output error
against block_topk's at the recall, measured in a second calibration pass), the rewritten graph, outputs
against the op's reference, replay at another grid, and the sites where it is not offered."""

import pytest
import torch
import torch.nn.functional as F
from test_window_patterns import LocalVideo  # the tests of window_3d: their video attention
from test_window_patterns import clip as window_clip

import sparsegraph as sg
from sparsegraph import attention_layouts
from sparsegraph.codegen import block_sparse_attention as bsa
from sparsegraph.errors import PlanError
from sparsegraph.passes.analysis.head_patterns import best_pyramid, choose, pyramid_candidates

GRID = (4, 6, 6)
SDPA = F.scaled_dot_product_attention  # the real one, for the tests that swap it


class Video(LocalVideo):
    """`LocalVideo` (q = k = per-axis [α cos(ω p), α sin(ω p)] features of the token's grid position, so
    q·k = Σ_axes α² cos(ω Δ)) with head 0 sharp (α 6) and head 1 broad (α 1.5). With these weights (seed
    0) the fit gives head 0 a pyramid (its frame neighbours exact, the rest pooled) and keeps head 1
    dense: no near part made its pyramid as faithful as block_topk at the recall."""

    def __init__(self, causal=False):
        super().__init__(causal=causal)
        self.alpha.copy_(torch.tensor([[6.0] * 3, [1.5] * 3]))


def clip(frames=4, side=6, seed=0):
    return window_clip(frames, side, seed)


CALIBRATION = [clip(seed=s) for s in range(2)]
CONFIG = {"passes": [{"head_patterns": {"block": 16, "recall": 0.9,
                                        "patterns": ["dense", "window_3d", "pyramid"]}},
                     {"sparse_attention": {"max_density": 1.0}}]}


# ------------------------------------------------------------------------------------ units (fast)


def test_candidates_start_with_the_reference_and_cost_the_pooled_keys():
    nq = nk = 9
    mass = torch.rand(nq, nk, generator=torch.Generator().manual_seed(0)).double() + torch.eye(nq) * 20
    found = pyramid_candidates(mass, 0.9, 16)  # no grid: local near parts
    reference, pyramids = found[0], found[1:]
    assert not reference["pooled"] and (mass * reference["mask"]).sum() >= 0.9 * mass.sum()
    assert pyramids and all(c["pooled"] and c["params"]["near"] == "local" for c in pyramids)
    assert len({c["params"]["window"] for c in pyramids}) == len(pyramids)  # distinct near parts only
    for c in pyramids:
        assert c["blocks"] == int(c["mask"].sum()) and c["cost"] == c["blocks"] + nq * nk / 16
        assert c["kept"] == pytest.approx(float((mass * c["mask"]).sum() / mass.sum()))


def test_best_pyramid_is_the_cheapest_within_the_reference_error():
    candidates = [{"pooled": False}] + [{"params": {"near": "local", "window": w}, "cost": 10 * w,
                                         "blocks": w, "kept": 0.5} for w in (1, 2, 3)]
    chosen = best_pyramid(candidates, torch.tensor([0.01, 0.02, 0.009, 0.001]))
    assert chosen["params"]["window"] == 2 and chosen["error"] == pytest.approx(0.009)
    assert chosen["error_bound"] == pytest.approx(0.01)
    assert best_pyramid(candidates, torch.tensor([0.01, 0.02, 0.03, 0.04])) is None


def test_choose_takes_an_offered_pyramid_only_when_cheapest_and_saving_enough():
    mass = torch.ones(4, 4, dtype=torch.float64)  # diffuse: only dense keeps the recall exactly
    offer = {"params": {"near": "local", "window": 1}, "cost": 4 + 16 / 16, "blocks": 4, "kept": 0.25,
             "error": 0.001, "error_bound": 0.002}
    chosen = choose(mass, False, 0.9, ("dense", "local", "pyramid"), pyramid=offer)
    assert chosen["pattern"] == "pyramid" and chosen["density"] == pytest.approx(5 / 16)
    assert chosen["recall"] == pytest.approx(0.25) and chosen["error"] == 0.001
    assert choose(mass, False, 0.9, ("dense", "pyramid"), pyramid=None)["pattern"] == "dense"
    costly = {**offer, "cost": 14.0}  # saves less than min_saving (0.2 of 16 blocks)
    assert choose(mass, False, 0.9, ("dense", "pyramid"), pyramid=costly)["pattern"] == "dense"


def test_pyramid_is_not_a_default_candidate():
    from sparsegraph.passes.analysis.head_patterns import HeadPatterns

    assert "pyramid" not in HeadPatterns().patterns
    assert "pyramid" in attention_layouts.FAMILIES


# ------------------------------------------------------------------------------------ compiled


@pytest.fixture(scope="module")
def fitted():
    torch.manual_seed(0)
    model = Video().eval()
    return model, sg.compile(model, CONFIG, example_inputs=clip(), calibration=CALIBRATION, quiet=True)


def _facts(cm) -> dict:
    return cm.plan.to_json()["sites"]["attn:0"]["head_patterns"]["evidence"]


def _with_attention(model, x, attend):
    """`model(x)` with its SDPA call replaced by `attend(q, k, v)`."""
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(F, "scaled_dot_product_attention", lambda q, k, v, **kw: attend(q, k, v))
        return model(x)


def _table(cm):
    node = next(n for n in cm.graph_module.graph.nodes if n.target is bsa.OP.overload)
    return getattr(cm.graph_module, node.args[3].target)


def test_pyramid_heads_err_no_more_than_their_bound_as_recomputed(fitted):
    model, cm = fitted
    heads = _facts(cm)["heads"]
    assert [h["pattern"] for h in heads] == ["pyramid", "dense"]
    chosen = heads[0]
    assert chosen["params"]["near"] == "window_3d" and chosen["params"]["grid"] == list(GRID)
    assert 0 < chosen["error"] <= chosen["error_bound"] and chosen["density"] < 0.8
    counters = cm.plan.passes["head_patterns"]["stats"]["counters"]
    assert counters["pyramid_error_batches"] == len(CALIBRATION)
    assert "pyramid_not_offered" not in counters
    pyramids = [h["pattern"] == "pyramid" for h in heads]
    assert cm.plan.passes["sparse_attention"]["stats"]["counters"]["pyramid_heads"] == sum(pyramids)
    assert attention_layouts.pooled_heads(_table(cm)).tolist() == pyramids
    # the recorded error is the head's output error on calibration, recomputed here from its q, k, v
    single = attention_layouts.table([chosen], block=16)
    captured = []

    def keep(q, k, v):
        captured.append((q, k, v))
        return SDPA(q, k, v, scale=1.0)

    error = energy = 0.0
    for (x,) in CALIBRATION:
        captured.clear()
        _with_attention(model, x, keep)
        q, k, v = (t[:, 0:1] for t in captured[0])
        dense = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        approx = bsa.reference(q, k, v, single, None, 16, False, 1.0)
        error += float((approx - dense).double().pow(2).sum())
        energy += float(dense.double().pow(2).sum())
    assert error / energy == pytest.approx(chosen["error"], rel=1e-3)


def test_compiled_output_is_the_ops_reference(fitted):
    model, cm = fitted
    x = clip(seed=5)[0]
    table = _table(cm)
    with torch.no_grad():
        got = cm(x)
        dense = model(x)
    want = _with_attention(model, x, lambda q, k, v: bsa.reference(q, k, v, table, None, 16, False, 1.0))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert float((got - dense).pow(2).sum() / dense.pow(2).sum()) < 0.01  # unseen clip: close to dense


def test_replay_at_another_grid_respecialises_the_near_windows(fitted):
    model, cm = fitted
    replayed = sg.compile(model, plan=cm.plan, example_inputs=clip(6, 8), quiet=True)
    heads = _facts(cm)["heads"]
    windows = sum("extent" in h["params"] for h in heads)
    counters = replayed.plan.passes["sparse_attention"]["stats"]["counters"]
    assert counters["respecialised_window_heads"] == windows
    table = _table(replayed)
    x = clip(6, 8, seed=3)[0]
    with torch.no_grad():
        got = replayed(x)
    want = _with_attention(model, x, lambda q, k, v: bsa.reference(q, k, v, table, None, 16, False, 1.0))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grids = table[:, attention_layouts.HEADER + 3:attention_layouts.HEADER + 6].tolist()
    assert [g for g, h in zip(grids, heads) if "extent" in h["params"]] == [[6, 8, 8]] * windows


def test_not_offered_at_causal_sites_and_refused_there_from_a_plan():
    model = Video(causal=True).eval()
    config = {"passes": [{"head_patterns": {"block": 16, "recall": 0.9,
                                            "patterns": ["dense", "local", "pyramid"]}},
                         {"sparse_attention": {"max_density": 1.0}}]}
    causal = sg.compile(model, config, example_inputs=clip(), calibration=CALIBRATION, quiet=True)
    counters = causal.plan.passes["head_patterns"]["stats"]["counters"]
    assert "causal or masked" in counters["pyramid_not_offered"]["attn:0"]
    assert "pyramid_error_batches" not in counters
    assert all(h["pattern"] != "pyramid" for h in _facts(causal)["heads"])
    plan = causal.plan.to_json()
    decision = plan["sites"]["attn:0"]["sparse_attention"]["decision"]
    decision["heads"][0] = {"pattern": "pyramid", "params": {"near": "local", "window": 1}}
    with pytest.raises(PlanError, match="pyramid heads at a causal or masked site"):
        sg.compile(model, plan=plan, example_inputs=clip(), quiet=True)


def test_pyramid_heads_export_to_onnx(fitted, tmp_path):
    """export_onnx checks onnxruntime against PyTorch at the example inputs (the pooled keys appended)."""
    _, cm = fitted
    cm.export_onnx(str(tmp_path / "pyramid.onnx"))
