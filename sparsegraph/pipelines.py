"""Named pipelines: plain functions that return a `Config`.

``sparsegraph.compile(model, "analyze", ...)`` or ``sparsegraph compile zoo:minilm --config nm-2-4`` look
the name up here. A pipeline is data (a `Config`), so ``Config.to_dict()`` of any of them is a valid
YAML/JSON config to start a custom one from.
"""

from __future__ import annotations

from collections.abc import Callable

from sparsegraph.config import Config
from sparsegraph.errors import ConfigError, did_you_mean


def dense() -> Config:
    """No passes: the traced graph as it is (the baseline every fidelity figure compares against)."""
    return Config.from_dict({"passes": []})


def analyze() -> Config:
    """Analysis only: the cost model per site; the graph is not changed."""
    return Config.from_dict({"passes": ["cost"]})


def nm_2_4() -> Config:
    """2:4 structured weights on the MLP linear layers (one-shot magnitude pruning, no fine-tuning).

    Fidelity drops on dense pretrained models; this pipeline exists for hardware with 2:4 support and
    for models fine-tuned for it.
    """
    return Config.from_dict({"passes": ["cost", {"nm_weights": {"n": 2, "m": 4, "roles": ["mlp.up", "mlp.gate",
                                                                                           "mlp.down"]}}]})


def activation_sparsity() -> Config:
    """Centred dynamic activation sparsity, 50% of every MLP's activations skipped (needs calibration)."""
    return Config.from_dict({"passes": ["activation_profile", "cost",
                                        {"neuron_sparsity": {"target": 0.5, "method": "centred"}}]})


def neuron_pruning() -> Config:
    """Static removal of the 50% coldest MLP neurons by contribution energy (needs calibration)."""
    return Config.from_dict({"passes": ["activation_profile", "cost", {"neuron_pruning": {"fraction": 0.5}}]})


def llm_activation_sparsity() -> Config:
    """TEAL-style: 50% of the inputs of up, gate and down projections skipped (decoders; needs calibration)."""
    return Config.from_dict({"passes": [{"activation_profile": {"inputs": True}}, "cost",
                                        {"neuron_sparsity": {"target": 0.5, "method": "magnitude",
                                                             "inputs": True}}]})


def sparse_attention() -> Config:
    """Per-head block-sparse attention patterns keeping 95% of the attention mass (needs calibration)."""
    return Config.from_dict({"passes": [{"head_patterns": {"recall": 0.95}}, "cost", "sparse_attention"]})


def vit_token_pruning() -> Config:
    """EViT-style: keep 70% of the tokens before blocks 3, 6 and 9 of a 12-block ViT, by class-token attention."""
    return Config.from_dict({"passes": ["cost", {"token_pruning": {"layers": [3, 6, 9], "keep": 0.7}}]})


def text_token_pruning() -> Config:
    """Keep 70% of the tokens from block 4 of a 6-block text encoder on (MiniLM), by [CLS] attention."""
    return Config.from_dict({"passes": ["cost", {"token_pruning": {"layers": [4], "keep": 0.7}}]})


def combined() -> Config:
    """Activation sparsity + attention patterns + token pruning in one plan (6-block encoders; needs calibration).

    Analyses run first on the dense graph; then tokens are pruned (before block 4, keep 0.7), attention
    sites become block-sparse where their pattern allows, MLPs skip 50% of their centred activations, and
    ``speed_check`` times every sparse op against its dense form and puts back those that do not pay.
    """
    return Config.from_dict({"passes": [
        "activation_profile", {"head_patterns": {"recall": 0.95}}, "token_importance", "cost",
        {"token_pruning": {"layers": [4], "keep": 0.7}}, "sparse_attention",
        {"neuron_sparsity": {"target": 0.5, "method": "centred"}}, "speed_check"]})


_PIPELINES: dict[str, Callable[[], Config]] = {
    "dense": dense,
    "analyze": analyze,
    "nm-2-4": nm_2_4,
    "activation-sparsity": activation_sparsity,
    "neuron-pruning": neuron_pruning,
    "llm-activation-sparsity": llm_activation_sparsity,
    "sparse-attention": sparse_attention,
    "vit-token-pruning": vit_token_pruning,
    "text-token-pruning": text_token_pruning,
    "combined": combined,
}

DEFAULT = "analyze"


def names() -> list[str]:
    return list(_PIPELINES)


def get(name: str) -> Config:
    if name not in _PIPELINES:
        raise ConfigError(f"no pipeline named {name!r}{did_you_mean(name, _PIPELINES)}")
    return _PIPELINES[name]()


def describe() -> dict[str, str]:
    """Pipeline name → the first line of its docstring."""
    return {name: (fn.__doc__ or "").strip().splitlines()[0] for name, fn in _PIPELINES.items()}
