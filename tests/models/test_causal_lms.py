"""Hugging Face causal LMs compile as ``from_config`` returns them (``use_cache`` on, its default): the
graph is captured without the cache, gives HF's logits at other batch sizes and lengths, finds one
attention and one MLP site per layer with ids from the module paths, and leaves the config as it was.

Small random-init configs (2 layers, hidden 64): structure and exactness, not quality."""

from __future__ import annotations

import pytest
import torch

import sparsegraph as sg
from sparsegraph import ir

LAYERS = 2
_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def _config(arch: str):
    import transformers as T

    return {
        "llama": lambda: T.LlamaConfig(**_COMMON),
        "qwen2": lambda: T.Qwen2Config(**_COMMON),  # GQA: 4 query heads, 2 KV heads
        "mistral": lambda: T.MistralConfig(**_COMMON),
        "phi3": lambda: T.Phi3Config(**_COMMON, pad_token_id=0),
        "gemma": lambda: T.GemmaConfig(**_COMMON, head_dim=16),
        "gemma2": lambda: T.Gemma2Config(**_COMMON, head_dim=16),  # soft-capped scores, no SDPA
        "gpt2": lambda: T.GPT2Config(vocab_size=256, n_embd=64, n_layer=LAYERS, n_head=4, n_positions=128,
                                     bos_token_id=0, eos_token_id=0),
        "opt": lambda: T.OPTConfig(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=LAYERS,
                                   num_attention_heads=4, max_position_embeddings=128,
                                   word_embed_proj_dim=64),
    }[arch]()


def _lm(arch: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(_config(arch)).eval()


# Three in the default run (GQA with SDPA, soft-capped explicit attention, GPT-2's Conv1D); all in CI.
ARCHS = [a if a in ("llama", "gemma2", "gpt2") else pytest.param(a, marks=[pytest.mark.slow, pytest.mark.ci])
         for a in ("llama", "qwen2", "mistral", "phi3", "gemma", "gemma2", "gpt2", "opt")]
# Where the MLP blocks are not found yet (issue 16): Phi-3's fused gate_up_proj, GPT-2's Conv1D
# projections around an explicitly written tanh-GELU.
MLP_NOT_FOUND = {"phi3", "gpt2"}
ATTENTION_PATH = {"gpt2": "transformer.h.{}.attn", "opt": "model.decoder.layers.{}.self_attn"}


@pytest.mark.parametrize("arch", ARCHS)
def test_compiles_with_the_default_cache_flag_and_gives_hf_logits(arch):
    model = _lm(arch)
    assert model.config.use_cache is True
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    cm = sg.compile(model, "dense", example_inputs=(ids,), quiet=True)
    assert model.config.use_cache is True  # switched off for the capture only
    for shape in ((2, 16), (3, 24), (1, 5)):
        x = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.testing.assert_close(cm(x).logits, model(x).logits, rtol=0, atol=0, msg=str(shape))

    attention = ir.attention_sites(cm.graph_module)
    path = ATTENTION_PATH.get(arch, "model.layers.{}.self_attn")
    assert [s.id for s in attention] == [f"attn:{path.format(i)}" for i in range(LAYERS)]
    mlps = ir.mlp_sites(cm.graph_module)
    assert len(mlps) == (0 if arch in MLP_NOT_FOUND else LAYERS)
