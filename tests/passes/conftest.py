import pytest
import torch
import torch.nn.functional as F

from sparsegraph import models


class FusedGated(torch.nn.Module):
    """Phi-3's MLP: gate and up are the halves of one linear's output (`cut` by chunk, or by a split at
    the width, which must be re-cut when neurons go)."""

    def __init__(self, cut: str = "chunk"):
        super().__init__()
        self.cut = cut
        self.gate_up_proj, self.down_proj = torch.nn.Linear(32, 128), torch.nn.Linear(64, 32)

    def forward(self, x):
        h = self.gate_up_proj(x)
        gate, up = h.chunk(2, dim=-1) if self.cut == "chunk" else h.split(h.shape[-1] // 2, dim=-1)
        return self.down_proj(up * F.silu(gate))


@pytest.fixture
def fused_gated():
    """``fused_gated(cut="chunk")``: a seeded `FusedGated` in eval mode."""
    def make(cut: str = "chunk") -> FusedGated:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return FusedGated(cut).eval()
    return make


@pytest.fixture(scope="session")
def explicit_calibrated():
    """explicit_attention with 4 calibration batches of random tokens, the last one padded."""
    model, example = models.load("explicit_attention")
    g = torch.Generator().manual_seed(1)
    batches = []
    for i in range(4):
        ids = torch.randint(0, 1000, (2, 48), generator=g)
        mask = torch.ones_like(ids)
        if i == 3:
            mask[1, 30:] = 0
        batches.append((ids, mask))
    return model, example, batches


def _moving(batch, seed, L=128, E=32, strength=20.0, block=16):
    """Heads whose query block I attends to key block π_b(I), a fresh permutation per input b: no static
    pattern short of listing every target of every input keeps the mass; the run-time estimate finds
    each input's target from the block means."""
    g = torch.Generator().manual_seed(seed)
    nb = L // block
    blocks = torch.arange(L) // block
    qs, ks = [], []
    for _ in range(batch):
        target = torch.randperm(nb, generator=g)  # query block I → key block target[I]
        source = torch.empty(nb, dtype=torch.long)
        source[target] = torch.arange(nb)  # key block J is the target of query block source[J]
        q = F.one_hot(blocks, E).float() * strength
        k = F.one_hot(source[blocks], E).float() * strength
        qs.append(q + torch.randn(L, E, generator=g) * 0.05)
        ks.append(k + torch.randn(L, E, generator=g) * 0.05)
    q, k = torch.stack(qs)[:, None] / E ** 0.25, torch.stack(ks)[:, None] / E ** 0.25
    return q, k, torch.randn(batch, 1, L, E, generator=g)


@pytest.fixture(scope="session")
def moving_heads():
    """`_moving`: q, k, v of one head that attends somewhere else for every input."""
    return _moving


class _Explicit(torch.nn.Module):
    """softmax(q kᵀ · scale) v written out as an explicit chain, with a masked_fill of padded keys."""

    def __init__(self, head_dim=32, padded=0, length=128):
        super().__init__()
        self.scale = head_dim ** -0.5
        self.register_buffer("padding", torch.arange(length) >= length - padded)

    def forward(self, q, k, v):
        scores = (q @ k.transpose(-1, -2) * self.scale).masked_fill(self.padding, float("-inf"))
        return torch.softmax(scores, -1) @ v


@pytest.fixture(scope="session")
def explicit_chain():
    """`_Explicit`: the attention of `moving_heads` inputs as an explicit matmul-softmax-matmul chain."""
    return _Explicit
