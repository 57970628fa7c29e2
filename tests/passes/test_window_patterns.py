"""window_3d through head_patterns and sparse_attention: the grid found from the Conv3d, what was chosen,
outputs against dense masked attention, and the resolution rule (window heads re-specialised at another
grid on replay, block-offset heads refused). Each compile exports a graph (seconds on 2 cores): slow + ci."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsegraph as sg
from sparsegraph import attention_layouts
from sparsegraph.codegen.block_sparse_attention import OP
from sparsegraph.errors import PassError, PlanError
from sparsegraph.passes.analysis.head_patterns import choose, fit_window

OMEGA = 0.3


class LocalVideo(nn.Module):
    """A video attention whose heads are local in (t, h, w) by construction: q = k = per-axis
    [α cos(ω p), α sin(ω p)] features of the token's grid position, so q_i·k_j = Σ_axes α² cos(ω Δ),
    largest at Δ = 0 and falling off as exp(−α² ω² Δ² / 2) (no wrap for |Δ| < π / ω ≈ 10). Head 0 is
    sharp on every axis, head 1 wide in time. Any grid: positions come from the Conv3d output's shape.
    `causal`: the same, with SDPA's causal mask."""

    def __init__(self, dim=16, causal=False):
        super().__init__()
        self.causal = causal
        self.embed = nn.Conv3d(1, dim, (1, 2, 2), stride=(1, 2, 2))
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("alpha", torch.tensor([[6.0, 6.0, 6.0], [1.5, 6.0, 6.0]]))

    def forward(self, x):
        z = self.embed(x)
        B, D, T, H, W = z.shape
        z = z.flatten(2).transpose(1, 2)  # [B, L, D] frame-major
        axes = [torch.arange(T).repeat_interleave(H * W), torch.arange(H).repeat_interleave(W).repeat(T),
                torch.arange(W).repeat(T * H)]
        feats = []
        for a, p in enumerate(axes):
            ang = OMEGA * p.float()
            feats += [self.alpha[:, a, None] * torch.cos(ang), self.alpha[:, a, None] * torch.sin(ang)]
        qk = torch.stack(feats, -1)  # [heads, L, 6]
        qk = F.pad(qk, (0, 2))[None].expand(B, -1, -1, -1)
        v = self.v(z).view(B, -1, 2, D // 2).transpose(1, 2)
        o = F.scaled_dot_product_attention(qk, qk, v, scale=1.0, is_causal=self.causal)
        return self.proj(o.transpose(1, 2).reshape(B, -1, D))


def test_fit_window_takes_the_smallest_box_that_keeps_the_recall():
    grid = (4, 6, 6)
    shifts = torch.zeros(7, 11, 11, dtype=torch.float64)  # index Δ + N − 1
    shifts[3, 5, 5] = 1.0  # Δ = 0
    shifts[3 + 2, 5 - 1, 5] = 0.5  # Δ = (2, −1, 0)
    shifts[0, 10, 0] = 0.01  # Δ = (−3, 5, −5): the far corner
    assert fit_window(shifts, grid, 0.5) == {"extent": [0, 0, 0], "grid": [4, 6, 6]}
    assert fit_window(shifts, grid, 0.99) == {"extent": [2, 1, 0], "grid": [4, 6, 6]}
    assert fit_window(shifts, grid, 1.0) == {"extent": [3, 5, 5], "grid": [4, 6, 6]}
    assert fit_window(torch.zeros(7, 11, 11), grid, 0.9) is None


def test_choose_takes_the_window_when_it_is_cheapest_and_dense_otherwise():
    grid, block = (4, 6, 6), 16
    window = {"extent": [0, 1, 1], "grid": list(grid)}
    inside = attention_layouts.window_block_mask([0, 1, 1], grid, block).double()
    chosen = choose(inside, False, 0.95, ("dense", "window_3d"), window=window, block=block)
    assert chosen["pattern"] == "window_3d" and chosen["recall"] == 1.0
    assert chosen["blocks"] == int(inside.sum())
    spread = torch.ones_like(inside)  # mass everywhere: the window keeps too little
    families = ("dense", "window_3d")
    assert choose(spread, False, 0.95, families, window=window, block=block)["pattern"] == "dense"
    assert choose(inside, False, 0.95, families, window=None, block=block)["pattern"] == "dense"


def clip(frames, side, seed=0):
    return (torch.randn(1, 1, frames, 2 * side, 2 * side, generator=torch.Generator().manual_seed(seed)),)


CONFIG = {"passes": [{"head_patterns": {"block": 16, "recall": 0.9, "min_saving": 0.0,
                                        "patterns": ["dense", "window_3d"]}},
                     {"sparse_attention": {"max_density": 1.0}}]}


@pytest.fixture(scope="module")
def fitted():
    torch.manual_seed(0)
    model = LocalVideo().eval()
    calib = [clip(4, 6, s) for s in range(2)]
    return model, sg.compile(model, CONFIG, example_inputs=clip(4, 6), calibration=calib, quiet=True)


def _masked_reference(model, x, extents, grid, block):
    """The model with its SDPA given the element mask of the window layouts (dense masked attention)."""
    allowed = torch.stack([attention_layouts.window_block_mask(e, grid, block) for e in extents])
    idx = torch.arange(math.prod(grid)) // block
    bias = torch.where(allowed[:, idx][:, :, idx], 0.0, float("-inf"))
    real = F.scaled_dot_product_attention

    def masked(q, k, v, **kw):
        return real(q, k, v, attn_mask=bias, **kw)

    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(F, "scaled_dot_product_attention", masked)
        return model(x)


def _facts(cm) -> dict:
    return cm.plan.to_json()["sites"]["attn:0"]["head_patterns"]["evidence"]


@pytest.mark.slow
@pytest.mark.ci
def test_grid_found_and_window_heads_chosen(fitted):
    _, cm = fitted
    facts = _facts(cm)
    assert facts["grid"] == [4, 6, 6]
    heads = facts["heads"]
    assert [h["pattern"] for h in heads] == ["window_3d", "window_3d"]
    (t0, h0, w0), (t1, h1, w1) = (h["params"]["extent"] for h in heads)
    assert h0 == w0 and h1 == w1 and h0 <= 2  # sharp in space in both heads (symmetric in h and w)
    assert t1 > t0  # head 1 is wide in time
    assert all(h["recall"] >= 0.9 and h["density"] < 1.0 for h in heads)
    stats = cm.plan.passes["sparse_attention"]["stats"]
    assert stats["rewritten"] == 1 and stats["counters"]["sparse_heads"] == 2


@pytest.mark.slow
@pytest.mark.ci
def test_compiled_output_matches_dense_masked_attention(fitted):
    model, cm = fitted
    x = clip(4, 6, seed=5)[0]
    facts = _facts(cm)
    extents = [h["params"]["extent"] for h in facts["heads"]]
    with torch.no_grad():
        got = cm(x)
    torch.testing.assert_close(got, _masked_reference(model, x, extents, (4, 6, 6), 16), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.ci
def test_replay_at_another_grid_respecialises_window_heads(fitted):
    model, cm = fitted
    replayed = sg.compile(model, plan=cm.plan, example_inputs=clip(6, 8), quiet=True)
    assert replayed.plan.passes["sparse_attention"]["stats"]["counters"]["respecialised_window_heads"] == 2
    node = next(n for n in replayed.graph_module.graph.nodes if n.target is OP.overload)
    table = getattr(replayed.graph_module, node.args[3].target)
    assert table[:, attention_layouts.HEADER + 3:attention_layouts.HEADER + 6].tolist() == [[6, 8, 8]] * 2
    facts = _facts(cm)
    extents = [h["params"]["extent"] for h in facts["heads"]]
    x = clip(6, 8, seed=3)[0]
    with torch.no_grad():
        got = replayed(x)
    torch.testing.assert_close(got, _masked_reference(model, x, extents, (6, 8, 8), 16), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.ci
def test_block_offset_heads_are_refused_at_another_grid():
    torch.manual_seed(0)
    model = LocalVideo().eval()
    config = {"passes": [{"head_patterns": {"block": 16, "recall": 0.9, "min_saving": 0.0,
                                            "patterns": ["dense", "multi_diagonal"]}},
                         {"sparse_attention": {"max_density": 1.0}}]}
    cm = sg.compile(model, config, example_inputs=clip(4, 6), calibration=[clip(4, 6, 1)], quiet=True)
    facts = _facts(cm)
    assert {h["pattern"] for h in facts["heads"]} == {"multi_diagonal"}
    sg.compile(model, plan=cm.plan, example_inputs=clip(4, 6), quiet=True)  # same grid: fine
    with pytest.raises(PlanError, match=r"4x6x6 .*6x8x8.*multi_diagonal.*window_3d"):
        sg.compile(model, plan=cm.plan, example_inputs=clip(6, 8), quiet=True)


@pytest.mark.slow
@pytest.mark.ci
def test_grid_option_must_match_the_site():
    model = LocalVideo().eval()
    config = {"passes": [{"head_patterns": {"block": 16, "grid": [4, 6, 5]}}, {"sparse_attention": {}}]}
    with pytest.raises(PassError, match=r"grid \[4, 6, 5\] has 120 tokens"):
        sg.compile(model, config, example_inputs=clip(4, 6), calibration=[clip(4, 6, 1)], quiet=True)


@pytest.mark.slow
@pytest.mark.ci
def test_window_heads_export_to_onnx(fitted, tmp_path):
    """The ONNX translation lays window rows out at the token level (`onnx_window_mask`); export_onnx
    checks onnxruntime against PyTorch at the example inputs (1e-4 × max(1, |output|))."""
    _, cm = fitted
    cm.export_onnx(str(tmp_path / "window.onnx"))


class LocalTokens(LocalVideo):
    """`LocalVideo` fed tokens [B, L, D] directly (no Conv3d: the grid cannot be found in the graph)."""

    def __init__(self, grid):
        super().__init__()
        self.grid = grid

    def forward(self, z):
        B, _, D = z.shape
        T, H, W = self.grid
        x = z.transpose(1, 2).reshape(B, D, T, H, W)
        embed, self.embed = self.embed, nn.Identity()
        try:
            return super().forward(x)
        finally:
            self.embed = embed


@pytest.mark.slow
@pytest.mark.ci
def test_without_a_grid_window_3d_is_not_a_candidate_until_the_option_gives_it():
    torch.manual_seed(0)
    model = LocalTokens((4, 6, 6)).eval()
    tokens = [(torch.randn(1, 144, 16, generator=torch.Generator().manual_seed(s)),) for s in range(2)]
    cm = sg.compile(model, CONFIG, example_inputs=tokens[0], calibration=tokens, quiet=True)
    facts = _facts(cm)
    assert "grid" not in facts and {h["pattern"] for h in facts["heads"]} == {"dense"}
    with_grid = {"passes": [{"head_patterns": {**CONFIG["passes"][0]["head_patterns"], "grid": [4, 6, 6]}},
                            CONFIG["passes"][1]]}
    cm = sg.compile(model, with_grid, example_inputs=tokens[0], calibration=tokens, quiet=True)
    facts = _facts(cm)
    assert facts["grid"] == [4, 6, 6] and [h["pattern"] for h in facts["heads"]] == ["window_3d"] * 2
