"""Hugging Face causal LMs compile as ``from_config`` returns them (``use_cache`` on, its default): the
graph is captured without the cache, gives HF's logits at other batch sizes and lengths, finds one
attention and one MLP site per layer with ids from the module paths, and leaves the config as it was.
Phi-3's fused ``gate_up_proj`` and GPT-2's Conv1D MLP with its written-out tanh-GELU are MLP sites like
the others: activation sparsity runs on them (dense at target 0) and neuron pruning equals pruning the
HF modules by hand.

Small random-init configs (2 layers, hidden 64): structure and exactness, not quality."""

from __future__ import annotations

import copy

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


# Three in the default run (GQA with SDPA, soft-capped explicit attention, GPT-2's Conv1D); all with -m slow.
ARCHS = [a if a in ("llama", "gemma2", "gpt2")
         else pytest.param(a, marks=[pytest.mark.slow, pytest.mark.extended])
         for a in ("llama", "qwen2", "mistral", "phi3", "gemma", "gemma2", "gpt2", "opt")]
ATTENTION_PATH = {"gpt2": "transformer.h.{}.attn", "opt": "model.decoder.layers.{}.self_attn"}
# OPT's fc1/fc2 sit directly in the decoder layer, so the site is the layer
MLP_PATH = {"gpt2": "transformer.h.{}.mlp", "opt": "model.decoder.layers.{}"}
# (activation, gated, fused): Gemma's gelu_pytorch_tanh is one gelu node, GPT-2's gelu_new a written-out
# chain read as gelu, Phi-3's gate and up the halves of one linear
MLP_FORM = {"phi3": ("silu", True, True), "gemma": ("gelu", True, False), "gemma2": ("gelu", True, False),
            "gpt2": ("gelu", False, False), "opt": ("relu", False, False)}


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
    path = MLP_PATH.get(arch, "model.layers.{}.mlp")
    assert [s.id for s in mlps] == [f"mlp:{path.format(i)}" for i in range(LAYERS)]
    assert {(s.activation, s.gated, s.fused) for s in mlps} == {MLP_FORM.get(arch, ("silu", True, False))}


# The sparse passes on the two MLP forms that needed their own reading: GPT-2 in the default run
SPARSE_ARCHS = ["gpt2", pytest.param("phi3", marks=[pytest.mark.slow, pytest.mark.extended])]


def _ids(shape, seed):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


def _sparse(model, *passes):
    calibration = [(_ids((2, 16), 10 + i),) for i in range(3)]
    return sg.compile(model, {"passes": list(passes)}, example_inputs=(_ids((2, 16), 0),),
                      calibration=calibration, quiet=True)


def _stats(cm, name):
    stats = cm.plan.passes[name]["stats"]
    return stats["matched"], stats["rewritten"], [r["reason"] for r in stats["refused"]]


@pytest.mark.parametrize("arch", SPARSE_ARCHS)
def test_activation_sparsity_runs_on_the_mlps_and_is_dense_at_target_0(arch):
    model = _lm(arch)
    profile = {"activation_profile": {"inputs": True}}
    cm = _sparse(model, profile, {"neuron_sparsity": {"target": 0.5, "inputs": True}})
    assert _stats(cm, "neuron_sparsity") == (LAYERS, LAYERS, [])
    ops = [n for n in cm.graph_module.graph.nodes if "sparse_linear" in str(n.target)]
    assert len(ops) == 2 * LAYERS  # down, and up/gate: one op for Phi-3's fused gate_up_proj
    x = _ids((3, 24), 1)
    with torch.no_grad():
        dense, sparse = model(x).logits, cm(x).logits
    assert torch.isfinite(sparse).all() and not torch.equal(sparse, dense)

    cm = _sparse(model, profile, {"neuron_sparsity": {"target": 0.0, "inputs": True}})
    assert _stats(cm, "neuron_sparsity") == (LAYERS, 0, ["target 0: the site stays dense"] * LAYERS)
    with torch.no_grad():
        torch.testing.assert_close(cm(x).logits, dense, rtol=0, atol=0)


def _prune_by_hand(model, arch, plan):
    """`model` with each MLP's neurons sliced as the plan's neuron_pruning decisions say, on the HF
    modules themselves: Phi-3's gate_up_proj loses rows j and I + j per removed neuron j, GPT-2's Conv1D
    (weight [in, out]) columns of c_fc and rows of c_proj; the removed neurons' means go into the down
    bias."""
    pruned = copy.deepcopy(model)
    path = MLP_PATH.get(arch, "model.layers.{}.mlp")
    for i in range(LAYERS):
        d = plan.sites[f"mlp:{path.format(i)}"]["neuron_pruning"]["decision"]
        keep, gone = torch.tensor(d["keep"]), torch.tensor(d["removed"])
        means = torch.tensor(d["removed_mean"])
        mlp = pruned.get_submodule(path.format(i))
        if arch == "phi3":
            up, down = mlp.gate_up_proj, mlp.down_proj
            mlp.gate_up_proj = torch.nn.Linear(up.in_features, 2 * len(keep), bias=False)
            mlp.gate_up_proj.weight.copy_(up.weight[torch.cat([keep, keep + down.in_features])])
            mlp.down_proj = torch.nn.Linear(len(keep), down.out_features)
            mlp.down_proj.weight.copy_(down.weight[:, keep])
            mlp.down_proj.bias.copy_(down.weight[:, gone] @ means)
        else:
            fc, proj = mlp.c_fc, mlp.c_proj
            fc.weight, fc.bias = torch.nn.Parameter(fc.weight[:, keep]), torch.nn.Parameter(fc.bias[keep])
            fc.nf = len(keep)
            proj.bias = torch.nn.Parameter(proj.bias + means @ proj.weight[gone])
            proj.weight = torch.nn.Parameter(proj.weight[keep])
    return pruned


@pytest.mark.parametrize("arch", SPARSE_ARCHS)
def test_neuron_pruning_equals_pruning_the_hf_modules_by_hand(arch):
    model = _lm(arch)
    cm = _sparse(model, "activation_profile", {"neuron_pruning": {"fraction": 0.5}})
    assert _stats(cm, "neuron_pruning") == (LAYERS, LAYERS, [])
    intermediate = model.config.intermediate_size if arch == "phi3" else 4 * model.config.n_embd
    assert [s.intermediate for s in ir.mlp_sites(cm.graph_module)] == [intermediate // 2] * LAYERS
    with torch.no_grad():
        pruned = _prune_by_hand(model, arch, cm.plan)
        for shape in ((2, 16), (3, 24)):
            x = _ids(shape, 1)
            torch.testing.assert_close(cm(x).logits, pruned(x).logits, rtol=1e-5, atol=1e-5)
