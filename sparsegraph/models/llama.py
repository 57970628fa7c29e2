"""A tiny Llama-style decoder (HF ``LlamaForCausalLM``, random init): 4 layers, hidden 256, 8 query heads,
2 KV heads (GQA), SwiGLU MLP with intermediate 688, vocabulary 1000."""

from __future__ import annotations

import torch

from sparsegraph.models import seeded

CONFIG = dict(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)


class CausalLM(torch.nn.Module):
    """``logits = lm(input_ids, attention_mask)`` without a KV cache (export cannot flatten HF caches)."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def load(seq_len: int = 32, batch: int = 1):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = seeded(lambda: CausalLM(LlamaForCausalLM(LlamaConfig(**CONFIG))))
    ids = torch.randint(0, CONFIG["vocab_size"], (batch, seq_len), generator=torch.Generator().manual_seed(0))
    return model, (ids,)


def load_7b_meta(seq_len: int = 128, batch: int = 1, dtype: torch.dtype = torch.float32):
    """A 7B-class Llama (``LlamaConfig`` defaults: 32 layers, hidden 4096, 32 heads, SwiGLU 11008) on the
    meta device: shapes and structure only, no weight is materialised (trace, cost and plan need none).

    The plan's fingerprint hashes parameter names, shapes and dtypes, so a plan made here applies to the
    real checkpoint loaded in the same `dtype`: ``sg.compile(real_model, config, plan=meta_plan, ...)``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = CausalLM(LlamaForCausalLM(LlamaConfig(torch_dtype=dtype))).to(dtype).eval()
    return model, (torch.zeros(batch, seq_len, dtype=torch.long, device="meta"),)
