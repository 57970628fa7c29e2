"""``head_patterns``' ``target_grid``: patterns of a video site costed at the grid the model will run at
(a longer clip, a larger canvas) rather than the short calibration clip's. Units of the costing, the
fitted plan (structure, densities recounted at the target, the counters) and its replay at the target
grid against the op's reference."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_pyramid_patterns import CALIBRATION, GRID, Video, _with_attention, clip

import sparsegraph as sg
from sparsegraph import attention_layouts
from sparsegraph.codegen import block_sparse_attention as bsa
from sparsegraph.errors import ConfigError
from sparsegraph.passes.analysis.head_patterns import blocks_at, choose, pyramid_candidates

TARGET = (8, 12, 12)
BLOCK = 16


def _config(target=TARGET):
    options = {"block": BLOCK, "recall": 0.9, "patterns": ["dense", "window_3d", "pyramid"]}
    if target is not None:
        options["target_grid"] = list(target)
    return {"passes": [{"head_patterns": options}, {"sparse_attention": {"max_density": 1.0}}]}


def _blocks(target=TARGET) -> int:
    return math.ceil(math.prod(target) / BLOCK)


# ------------------------------------------------------------------------------------ units (fast)


def test_blocks_at_lays_the_window_out_on_the_target_grid():
    params = {"near": "window_3d", "extent": [1, 2, 2], "grid": list(GRID)}
    n = _blocks()
    want = attention_layouts.window_block_mask([1, 2, 2], TARGET, BLOCK, n, n)
    assert blocks_at("pyramid", params, TARGET, BLOCK) == int(want.sum())
    assert blocks_at("dense", {}, TARGET, BLOCK) == n * n


def test_candidates_are_costed_at_the_target_and_judged_on_calibration():
    nq = nk = math.ceil(math.prod(GRID) / BLOCK)
    mass = torch.rand(nq, nk, generator=torch.Generator().manual_seed(0)).double() + torch.eye(nq) * 5
    shifts = torch.rand(7, 11, 11, generator=torch.Generator().manual_seed(1)).double()
    at_calibration = pyramid_candidates(mass, 0.9, BLOCK, GRID, shifts)
    at_target = pyramid_candidates(mass, 0.9, BLOCK, GRID, shifts, TARGET)
    assert len(at_calibration) == len(at_target) > 1
    n = _blocks()
    for short, long in zip(at_calibration[1:], at_target[1:]):
        assert long["params"] == short["params"] and long["kept"] == short["kept"]  # judged on calibration
        assert torch.equal(long["mask"], short["mask"])  # the mask the error pass measures: calibration's
        assert long["blocks"] == blocks_at("pyramid", long["params"], TARGET, BLOCK)
        assert long["cost"] == long["blocks"] + n * n / BLOCK


def test_at_a_target_only_dense_and_pyramid_are_candidates():
    """A window covering the whole short clip keeps every bit of its mass (recall 1) and says nothing
    about the mass beyond it on the long grid: it is not a candidate there. An offered pyramid is, costed
    at the target, where it saves what it could not at the calibration grid."""
    nq = nk = math.ceil(math.prod(GRID) / BLOCK)
    mass = torch.ones(nq, nk, dtype=torch.float64)
    whole = {"extent": [3, 5, 5], "grid": list(GRID)}
    assert choose(mass, False, 0.9, ("dense", "window_3d"), window=whole, block=BLOCK)["pattern"] == "dense"
    only = choose(mass, False, 0.9, ("dense", "window_3d"), window=whole, block=BLOCK, target=TARGET)
    assert only == {"pattern": "dense", "params": {}, "recall": 1.0, "density": 1.0, "blocks": _blocks() ** 2}
    near = {"near": "window_3d", "extent": [1, 1, 1], "grid": list(GRID)}
    n = _blocks()
    cost = blocks_at("pyramid", near, TARGET, BLOCK) + n * n / BLOCK
    offer = {"params": near, "cost": cost, "blocks": blocks_at("pyramid", near, TARGET, BLOCK), "kept": 0.3,
             "error": 0.001, "error_bound": 0.002}
    chosen = choose(mass, False, 0.9, ("dense", "window_3d", "pyramid"), window=whole, block=BLOCK,
                    pyramid=offer, target=TARGET)
    assert chosen["pattern"] == "pyramid" and chosen["density"] == pytest.approx(cost / (n * n), abs=1e-6)
    assert chosen["recall"] == pytest.approx(0.3) and chosen["blocks"] == offer["blocks"]


def test_a_malformed_target_grid_names_the_option():
    for bad in ([8, 12], [8, 0, 12]):
        with pytest.raises(ConfigError, match=r"'target_grid'.*T, H, W"):
            sg.compile(Video().eval(), _config(bad), example_inputs=clip(), calibration=CALIBRATION,
                       quiet=True)


# ------------------------------------------------------------------------------------ compiled


@pytest.fixture(scope="module")
def targeted():
    torch.manual_seed(0)
    model = Video().eval()
    return model, sg.compile(model, _config(), example_inputs=clip(), calibration=CALIBRATION, quiet=True)


def _facts(cm) -> dict:
    return cm.plan.to_json()["sites"]["attn:0"]["head_patterns"]["evidence"]


def test_the_plan_records_its_cost_grid_and_densities_there(targeted):
    _, cm = targeted
    facts = _facts(cm)
    assert facts["cost_grid"] == list(TARGET) and facts["grid"] == list(GRID)
    heads = facts["heads"]
    # head 1 (broad) stays dense at the calibration grid (test_pyramid_patterns); at the long grid its
    # pyramid saves enough: both heads pyramids, each within its error bound, near parts on the short grid
    assert [h["pattern"] for h in heads] == ["pyramid", "pyramid"]
    n = _blocks()
    for h in heads:
        assert h["params"]["grid"] == list(GRID) and h["error"] <= h["error_bound"]
        blocks = int(attention_layouts.window_block_mask(h["params"]["extent"], TARGET, BLOCK, n, n).sum())
        assert h["blocks"] == blocks
        assert h["density"] == pytest.approx((blocks + n * n / BLOCK) / (n * n), abs=1e-6)
    assert facts["density"] == pytest.approx(sum(h["density"] for h in heads) / 2)
    counters = cm.plan.passes["head_patterns"]["stats"]["counters"]
    assert "costed_at_calibration" not in counters and counters["pyramid_error_batches"] == len(CALIBRATION)
    assert cm.plan.passes["sparse_attention"]["stats"]["counters"]["pyramid_heads"] == 2


def test_replayed_at_the_target_grid_the_output_is_the_ops_reference(targeted):
    model, cm = targeted
    replayed = sg.compile(model, plan=cm.plan, example_inputs=clip(*TARGET[:2]), quiet=True)
    assert replayed.plan.passes["sparse_attention"]["stats"]["counters"]["respecialised_window_heads"] == 2
    node = next(n for n in replayed.graph_module.graph.nodes if n.target is bsa.OP.overload)
    table = getattr(replayed.graph_module, node.args[3].target)
    x = clip(*TARGET[:2], seed=4)[0]
    with torch.no_grad():
        got = replayed(x)
    want = _with_attention(model, x, lambda q, k, v: bsa.reference(q, k, v, table, None, BLOCK, False, 1.0))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_site_without_a_token_grid_is_costed_at_calibration_and_counted():
    class Flat(torch.nn.Module):  # 1-D tokens: no Conv3d, so no grid
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(8, 24)

        def forward(self, x):
            q, k, v = self.qkv(x).view(1, -1, 3, 2, 4).permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(q, k, v)

    torch.manual_seed(0)
    data = [(torch.randn(1, 64, 8),) for _ in range(2)]
    cm = sg.compile(Flat().eval(), {"passes": [{"head_patterns": {"block": 16, "target_grid": [8, 8, 8]}}]},
                    example_inputs=data[0], calibration=data, quiet=True)
    counters = cm.plan.passes["head_patterns"]["stats"]["counters"]
    assert list(counters["costed_at_calibration"]) == ["attn:0"]
    assert "no token grid" in counters["costed_at_calibration"]["attn:0"]
    assert "cost_grid" not in cm.plan.to_json()["sites"]["attn:0"]["head_patterns"]["evidence"]
