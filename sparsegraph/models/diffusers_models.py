"""Diffusers denoisers as model sources: ``diffusers:ClassName`` and ``diffusers:PATH``. Nothing downloads.

``diffusers:ClassName`` builds the class from a small default config with random weights (seeded,
`sparsegraph.models.seeded`): two blocks of width 32 (2 heads of 16; the UNet: two resolutions of 32
and 64 channels), 4 latent channels, prompts of 8 tokens of width 32, a latent of 3 frames × 16 × 16 for
video models (192 tokens after 2 × 2 patches; LTX's latents come patchified, 3 × 8 × 8) and 16 × 16 for
image models (64 tokens). That is for structure and speed: the capture, the sites and every
pass see the real architecture (its attention, AdaLN, RoPE, text path) in a few seconds, while random
weights give near-uniform attention, so patterns and profiles measured on them say nothing about a
trained model. Each table entry sets what the class needs to build that small (RoPE axes that sum to
the head width, an 8-head text pooler over 32 channels, ...); everything else is the class's default.

``diffusers:PATH`` loads a local model directory written by ``save_pretrained`` (its ``config.json``
names the class in ``_class_name``), or a pipeline directory (``model_index.json``), whose ``transformer``
or ``unet`` folder it takes; the class must be one of the table's, which say how to call it.

Example inputs are one denoising step of one sample, positional in ``forward``'s order (skipped
parameters at their defaults), sized from the model's config: the noisy latent ``hidden_states`` (or
``sample``), the ``timestep``, the prompt's ``encoder_hidden_states`` and, where the class takes them,
its attention mask (ones: an unpadded prompt), pooled text, class labels or latent grid sizes. Batch 1:
the capture widens it to 2 to keep the batch dynamic, except for Mochi, whose attention loops over
the samples (it keeps each prompt's unmasked tokens with ``nonzero``) and is traced at batch 1 (at
batch 2 its graph would hold two attention calls per block). CogVideoX's rotary embeddings, which its
pipeline computes outside the model, are left out (the sites are the same). The models return
diffusers' output object (``.sample``), as they do for a pipeline.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsegraph.errors import ModelSpecError, did_you_mean
from sparsegraph.models import seeded

BATCH = 1
TEXT_TOKENS = 8
FRAMES, SIDE = 3, 16  # latent frames and height = width

_SMALL = dict(num_attention_heads=2, attention_head_dim=16, num_layers=2)


@dataclass(frozen=True)
class _Entry:
    config: dict  # the small default config
    inputs: Callable[[dict, torch.Generator], dict]  # example arguments by name, from a config


def _video(c, g, channels_first=True) -> torch.Tensor:
    shape = (BATCH, c["in_channels"], FRAMES, SIDE, SIDE) if channels_first else (
        BATCH, FRAMES, c["in_channels"], SIDE, SIDE)
    return torch.randn(*shape, generator=g)


def _text(width: int, g) -> torch.Tensor:
    return torch.randn(BATCH, TEXT_TOKENS, width, generator=g)


def _step() -> torch.Tensor:
    return torch.full((BATCH,), 500, dtype=torch.long)


def _mask() -> torch.Tensor:
    return torch.ones(BATCH, TEXT_TOKENS, dtype=torch.long)


def _cogvideox(c, g):
    return {"hidden_states": _video(c, g, channels_first=False),
            "encoder_hidden_states": _text(c["text_embed_dim"], g), "timestep": _step(),
            **({"ofs": _step()} if c.get("ofs_embed_dim") else {})}


def _wan(c, g):
    return {"hidden_states": _video(c, g), "timestep": _step(),
            "encoder_hidden_states": _text(c["text_dim"], g),
            **({"encoder_hidden_states_image": _text(c["image_dim"], g)} if c.get("image_dim") else {})}


def _hunyuan(c, g):
    return {"hidden_states": _video(c, g), "timestep": _step(),
            "encoder_hidden_states": _text(c["text_embed_dim"], g), "encoder_attention_mask": _mask(),
            "pooled_projections": torch.randn(BATCH, c["pooled_projection_dim"], generator=g),
            **({"guidance": torch.full((BATCH,), 6000.0)} if c.get("guidance_embeds") else {})}


def _ltx(c, g):
    # LTX's latents come patchified from its VAE: tokens [B, frames · h · w, C], the grid given beside
    side = SIDE // 2
    tokens = torch.randn(BATCH, FRAMES * side * side, c["in_channels"], generator=g)
    return {"hidden_states": tokens, "encoder_hidden_states": _text(c["caption_channels"], g),
            "timestep": _step(), "encoder_attention_mask": _mask(), "num_frames": FRAMES, "height": side,
            "width": side}


def _pixart(c, g):
    additional = c.get("use_additional_conditions")
    if additional or (additional is None and c.get("sample_size") == 128):  # PixArt-α 1024px
        conditions = {"added_cond_kwargs": {"resolution": torch.tensor([[1024.0, 1024.0]] * BATCH),
                                            "aspect_ratio": torch.ones(BATCH, 1)}}
    else:
        conditions = {}
    return {"hidden_states": torch.randn(BATCH, c["in_channels"], SIDE, SIDE, generator=g),
            "encoder_hidden_states": _text(c.get("caption_channels") or c["cross_attention_dim"], g),
            "timestep": _step(), **conditions}


def _dit(c, g):
    return {"hidden_states": torch.randn(BATCH, c["in_channels"], SIDE, SIDE, generator=g),
            "timestep": _step(), "class_labels": torch.zeros(BATCH, dtype=torch.long)}


def _mochi(c, g):
    return {"hidden_states": _video(c, g), "encoder_hidden_states": _text(c["text_embed_dim"], g),
            "timestep": _step(), "encoder_attention_mask": _mask()}


def _unet(c, g):
    return {"sample": torch.randn(BATCH, c["in_channels"], SIDE, SIDE, generator=g), "timestep": _step(),
            "encoder_hidden_states": _text(c["cross_attention_dim"], g)}


CLASSES: dict[str, _Entry] = {
    "CogVideoXTransformer3DModel": _Entry(
        dict(_SMALL, in_channels=4, out_channels=4, time_embed_dim=32, text_embed_dim=32, sample_width=SIDE,
             sample_height=SIDE, sample_frames=4 * (FRAMES - 1) + 1, max_text_seq_length=TEXT_TOKENS),
        _cogvideox),
    "WanTransformer3DModel": _Entry(
        dict(_SMALL, in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
             rope_max_seq_len=32), _wan),
    "HunyuanVideoTransformer3DModel": _Entry(
        dict(_SMALL, in_channels=4, out_channels=4, num_single_layers=2, num_refiner_layers=1, patch_size=2,
             guidance_embeds=False, text_embed_dim=32, pooled_projection_dim=16, rope_axes_dim=(4, 6, 6)),
        _hunyuan),
    "LTXVideoTransformer3DModel": _Entry(
        dict(_SMALL, in_channels=8, out_channels=8, cross_attention_dim=32, caption_channels=32), _ltx),
    "PixArtTransformer2DModel": _Entry(
        dict(_SMALL, in_channels=4, out_channels=8, cross_attention_dim=32, caption_channels=32,
             sample_size=SIDE), _pixart),
    "DiTTransformer2DModel": _Entry(
        dict(_SMALL, in_channels=4, sample_size=SIDE, num_embeds_ada_norm=10), _dit),
    "MochiTransformer3DModel": _Entry(
        dict(_SMALL, in_channels=4, pooled_projection_dim=16, text_embed_dim=32, time_embed_dim=16,
             max_sequence_length=TEXT_TOKENS), _mochi),
    "UNet2DConditionModel": _Entry(
        dict(sample_size=SIDE, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
             attention_head_dim=8, norm_num_groups=8), _unet),
}


def load(spec: str) -> tuple[torch.nn.Module, tuple]:
    """``(model, example_inputs)`` for ``diffusers:SPEC``: a class of `CLASSES` or a local directory."""
    try:
        import diffusers
    except ImportError as e:
        raise ModelSpecError("diffusers: models need the diffusers package: pip install 'diffusers>=0.30' "
                             "(or sparsegraph[models])") from e
    if spec.isidentifier() and not Path(spec).exists():
        return _from_class(diffusers, spec)
    return _from_path(diffusers, Path(spec))


def example_inputs(model: torch.nn.Module, config: dict, seed: int = 0) -> tuple:
    """One denoising step's arguments for `model` (a class of `CLASSES`) of `config`, positional."""
    named = CLASSES[type(model).__name__].inputs(config, torch.Generator().manual_seed(seed))
    params = list(inspect.signature(model.forward).parameters.values())
    last = max(i for i, p in enumerate(params) if p.name in named)
    return tuple(named.get(p.name, p.default) for p in params[:last + 1])


def _from_class(diffusers, name: str):
    if name not in CLASSES:
        what = ("sparsegraph has no small config and inputs for it" if hasattr(diffusers, name)
                else "diffusers has no such class")
        raise ModelSpecError(f"diffusers:{name}: {what}{did_you_mean(name, CLASSES)}; sparsegraph builds "
                             f"{', '.join(CLASSES)}. For another class give a pkg.module:factory returning "
                             "(model, example_inputs)")
    cls = getattr(diffusers, name)
    model = seeded(lambda: cls(**CLASSES[name].config))
    return model, example_inputs(model, dict(model.config))


def _from_path(diffusers, path: Path):
    if not path.is_dir():
        raise ModelSpecError(f"diffusers:{path}: no such directory; give a diffusers model directory (with "
                             f"config.json) or one of the classes {', '.join(CLASSES)}")
    if not (path / "config.json").is_file() and (path / "model_index.json").is_file():
        folders = [path / sub for sub in ("transformer", "unet") if (path / sub / "config.json").is_file()]
        if not folders:
            raise ModelSpecError(f"diffusers:{path} is a pipeline directory without a transformer/ or unet/ "
                                 "folder holding a config.json; give the denoiser's folder")
        path = folders[0]
    if not (path / "config.json").is_file():
        raise ModelSpecError(f"diffusers:{path} has no config.json; give the folder save_pretrained wrote "
                             "(a pipeline's transformer/ or unet/ folder)")
    name = json.loads((path / "config.json").read_text()).get("_class_name")
    if name not in CLASSES:
        raise ModelSpecError(f"diffusers:{path} holds a {name or 'model without _class_name'}, for which "
                             f"sparsegraph cannot make example inputs{did_you_mean(str(name), CLASSES)}; "
                             f"supported: {', '.join(CLASSES)}. Load it in a pkg.module:factory returning "
                             "(model, example_inputs)")
    try:
        model = getattr(diffusers, name).from_pretrained(str(path), local_files_only=True).eval()
    except (OSError, ValueError) as e:
        raise ModelSpecError(f"diffusers:{path}: cannot load its {name}: {e}") from e
    return model, example_inputs(model, dict(model.config))
