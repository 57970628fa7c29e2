"""A small hand-written transformer encoder whose attention is explicit: ``softmax(q kᵀ/√d + mask) v``
written as matmul → softmax → matmul (no SDPA), with a pre-norm GELU MLP. 3 layers, width 128, 4 heads.

It stands for the many research and vendor models that spell attention out by hand.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sparsegraph.models import seeded


class ExplicitAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        split = lambda t: t.view(b, s, self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim) + mask
        probs = torch.softmax(scores, dim=-1)
        return self.out(torch.matmul(probs, v).transpose(1, 2).reshape(b, s, -1))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = ExplicitAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x, mask):
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class ExplicitTransformer(nn.Module):
    """Token ids [batch, seq] (and an optional 0/1 padding mask) → hidden states [batch, seq, dim]."""

    def __init__(self, vocab: int = 1000, dim: int = 128, heads: int = 4, layers: int = 3,
                 max_len: int = 1024):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, 4 * dim) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(input_ids) + self.pos[: input_ids.shape[1]]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # additive mask over keys: 0 where attended, a large negative number at padding
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)


def load(seq_len: int = 64, batch: int = 2):
    model = seeded(ExplicitTransformer)
    ids = torch.randint(0, 1000, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    return model, (ids, torch.ones_like(ids))
