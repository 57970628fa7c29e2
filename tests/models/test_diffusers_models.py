"""Diffusers denoisers as sources (``diffusers:ClassName``, ``diffusers:PATH``) and what the IR finds in them.

Per class of the small default configs (two blocks): the exact self-attention, cross-attention and MLP
sites. The timestep embeddings and AdaLN modulations (``SiLU → linear``, one row per sample) are no MLP
sites; every MLP site reads tokens. The graph gives the model's own output, at another batch size too
(Mochi, whose attention loops over the samples, is traced at batch 1). On PixArt the attention passes
refuse the cross-attention sites, each with its reason, and work on the self-attention ones.

The default run takes joint attention (CogVideoX), cross-attention with q/k norms (Wan), PixArt and
Mochi (about 25 s with diffusers' import); the other classes run in CI.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import sparsegraph as sg
from sparsegraph import ir, models
from sparsegraph.errors import ModelSpecError
from sparsegraph.models import diffusers_models

# heavy for the default run (kept under 6 minutes on 2 cores): CI runs these after it
pytestmark = [pytest.mark.slow, pytest.mark.ci]


def _blocks(path: str, n: int = 2) -> list[str]:
    return [path.format(i) for i in range(n)]


# class: (self-attention, cross-attention, MLP) site ids of its small config
EXPECTED = {
    "CogVideoXTransformer3DModel": (
        _blocks("attn:transformer_blocks.{}.attn1"), [], _blocks("mlp:transformer_blocks.{}.ff.net")),
    "WanTransformer3DModel": (
        _blocks("attn:blocks.{}.attn1"), _blocks("xattn:blocks.{}.attn2"),
        ["mlp:condition_embedder.text_embedder", *_blocks("mlp:blocks.{}.ffn.net")]),
    "HunyuanVideoTransformer3DModel": (
        ["attn:context_embedder.token_refiner.refiner_blocks.0.attn",
         *_blocks("attn:transformer_blocks.{}.attn"), *_blocks("attn:single_transformer_blocks.{}.attn")], [],
        ["mlp:context_embedder.token_refiner.refiner_blocks.0.ff.net",
         *[f"mlp:transformer_blocks.{i}.{ff}.net" for i in range(2) for ff in ("ff", "ff_context")]]),
    "LTXVideoTransformer3DModel": (
        _blocks("attn:transformer_blocks.{}.attn1"), _blocks("xattn:transformer_blocks.{}.attn2"),
        ["mlp:caption_projection", *_blocks("mlp:transformer_blocks.{}.ff.net")]),
    "PixArtTransformer2DModel": (
        _blocks("attn:transformer_blocks.{}.attn1"), _blocks("xattn:transformer_blocks.{}.attn2"),
        ["mlp:caption_projection", *_blocks("mlp:transformer_blocks.{}.ff.net")]),
    "DiTTransformer2DModel": (
        _blocks("attn:transformer_blocks.{}.attn1"), [], _blocks("mlp:transformer_blocks.{}.ff.net")),
    "MochiTransformer3DModel": (
        _blocks("attn:transformer_blocks.{}.attn1"), ["xattn:time_embed.pooler"],  # attention pooling of text
        ["mlp:transformer_blocks.0.ff.net", "mlp:transformer_blocks.0.ff_context.net",
         "mlp:transformer_blocks.1.ff.net"]),  # the last block updates no text: no ff_context
    "UNet2DConditionModel": tuple(
        [f"{kind}:{block}.transformer_blocks.0.{part}"
         for block in ("down_blocks.0.attentions.0", "mid_block.attentions.0", "up_blocks.1.attentions.0",
                       "up_blocks.1.attentions.1")]
        for kind, part in (("attn", "attn1"), ("xattn", "attn2"), ("mlp", "ff.net"))),
}


DEFAULT = ("CogVideoXTransformer3DModel", "WanTransformer3DModel", "PixArtTransformer2DModel",
           "MochiTransformer3DModel")
CLASSES = [name if name in DEFAULT else pytest.param(name, marks=[pytest.mark.slow, pytest.mark.extended])
           for name in EXPECTED]


@pytest.fixture(scope="module")
def traced():
    cache = {}

    def get(name):
        if name not in cache:
            model, example = models.resolve(f"diffusers:{name}")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                gm = sg.trace(model, example)
            cache[name] = model, example, gm, [str(w.message) for w in caught]
        return cache[name]

    return get


def test_every_class_has_expected_sites():
    assert set(EXPECTED) == set(diffusers_models.CLASSES)


@pytest.mark.parametrize("name", CLASSES)
def test_sites_of_each_denoiser(traced, name):
    gm = traced(name)[2]
    found = ([s.id for s in ir.attention_sites(gm)], [s.id for s in ir.cross_attention_sites(gm)],
             [s.id for s in ir.mlp_sites(gm)])
    assert found == tuple(EXPECTED[name])
    # every MLP site transforms tokens: its input is [batch, tokens, features], never one row per sample
    assert all(len(ir.shape(ir.linear_parts(s.up).x)) == 3 for s in ir.mlp_sites(gm))
    for site in ir.cross_attention_sites(gm):
        assert site.cross and site.kind == "cross_attention"
        assert ir.shape(site.q)[2] != ir.shape(site.k)[2]  # queries of the stream, keys of the prompt


@pytest.mark.parametrize("name", CLASSES)
def test_graph_gives_the_models_output(traced, name):
    model, example, gm, _ = traced(name)
    with torch.no_grad():
        torch.testing.assert_close(gm(*example).sample, model(*example).sample, rtol=0, atol=0)
    if name == "MochiTransformer3DModel":
        return  # traced at batch 1 (test_mochi_is_traced_at_batch_one)
    two = tuple(torch.cat([x, x + 0.5 if torch.is_floating_point(x) else x]) if isinstance(x, torch.Tensor)
                else x for x in example)
    with torch.no_grad():
        torch.testing.assert_close(gm(*two).sample, model(*two).sample, rtol=1e-4, atol=1e-5)


def test_mochi_is_traced_at_batch_one(traced):
    """Mochi's attention runs once per sample (``nonzero`` keeps each prompt's unmasked tokens): widened
    to batch 2 for a dynamic batch, export fixed it at 2, so the capture falls back to the example's
    batch 1, one attention site per block, with shapes recorded from a real run past the ``nonzero``."""
    _, example, gm, caught = traced("MochiTransformer3DModel")
    assert example[0].shape[0] == 1
    assert any("fixes dimension 0 of input 'hidden_states'" in m for m in caught)
    assert ir.shape(ir.attention_sites(gm)[0].q)[0] == 1


def test_attention_passes_refuse_cross_attention_with_a_reason():
    model, example = models.resolve("diffusers:PixArtTransformer2DModel")
    config = {"passes": [{"activation_profile": {"attention": True}},
                         {"neuron_sparsity": {"attention": True, "target": 0.5}},
                         {"head_patterns": {"block": 16}}, "sparse_attention"]}
    calibration = [diffusers_models.example_inputs(model, dict(model.config), seed) for seed in range(2)]
    cm = sg.compile(model, config, example_inputs=example, calibration=calibration, quiet=True)
    cross = {"xattn:transformer_blocks.0.attn2", "xattn:transformer_blocks.1.attn2"}
    for name in ("neuron_sparsity", "head_patterns", "sparse_attention"):
        refused = {r["site"]: r["reason"] for r in cm.plan.passes[name]["stats"]["refused"]}
        assert cross <= set(refused), name
        assert all("cross-attention" in refused[s] for s in cross), name
    patterns = cm.plan.summary("head_patterns")["density_per_site"]
    assert set(patterns) == {"attn:transformer_blocks.0.attn1", "attn:transformer_blocks.1.attn1"}
    kinds = {s["id"]: s["kind"] for s in cm.plan.model["sites"]}
    assert {kinds[s] for s in cross} == {"cross_attention"}


def test_a_saved_model_directory_and_a_pipeline_directory(tmp_path):
    model, example = models.resolve("diffusers:DiTTransformer2DModel")
    model.save_pretrained(tmp_path / "pipe" / "transformer")
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    for spec in (tmp_path / "pipe" / "transformer", tmp_path / "pipe"):
        loaded, loaded_example = models.resolve(f"diffusers:{spec}")
        assert type(loaded).__name__ == "DiTTransformer2DModel"
        ours, theirs = loaded.state_dict(), model.state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        # the same weights: equal outputs up to fp32 rounding (bitwise on the Xeon; two copies of the same
        # weights gave outputs 5e-7 apart on a 2-core AMD EPYC with AVX2)
        with torch.no_grad():
            torch.testing.assert_close(loaded(*loaded_example).sample, model(*example).sample, rtol=1e-5,
                                       atol=1e-6)


def test_wrong_names_and_folders_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ModelSpecError, match="did you mean 'WanTransformer3DModel'"):
        models.resolve("diffusers:WanTransformer3D")
    with pytest.raises(ModelSpecError, match=r"has no config\.json"):
        models.resolve(f"diffusers:{tmp_path}")
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ModelSpecError, match=r"cannot make example inputs.*pkg\.module:factory"):
        models.resolve(f"diffusers:{tmp_path}")
