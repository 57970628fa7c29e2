"""Named pipelines: plain functions that return a config as data (the dict a YAML/JSON config file holds).

``sparsegraph.compile(model, "analyze", ...)`` or ``sparsegraph compile zoo:minilm --config nm-2-4`` look
the name up here (through `Config.load`, which builds and validates it). Any of them is a valid config
to start a custom one from: ``pipelines.get("combined")`` is a dict to edit.
"""

from __future__ import annotations

from collections.abc import Callable

from sparsegraph.errors import ConfigError, did_you_mean


def dense() -> dict:
    """No passes: the traced graph as it is (the baseline every fidelity figure compares against)."""
    return {"passes": []}


def analyze() -> dict:
    """Analysis only: the cost model per site; the graph is not changed."""
    return {"passes": ["cost"]}


def nm_2_4() -> dict:
    """2:4 structured weights on the MLP linear layers (one-shot magnitude pruning, no fine-tuning).

    Fidelity drops on dense pretrained models; this pipeline exists for hardware with 2:4 support and
    for models fine-tuned for it.
    """
    return {"passes": ["cost", {"nm_weights": {"n": 2, "m": 4, "roles": ["mlp.up", "mlp.gate", "mlp.down"]}}]}


def activation_sparsity() -> dict:
    """Centred dynamic activation sparsity, 50% of every MLP's activations skipped (needs calibration)."""
    return {"passes": ["activation_profile", "cost",
                       {"neuron_sparsity": {"target": 0.5, "method": "centred"}}]}


def neuron_pruning() -> dict:
    """Static removal of the 50% coldest MLP neurons by contribution energy (needs calibration)."""
    return {"passes": ["activation_profile", "cost", {"neuron_pruning": {"fraction": 0.5}}]}


def llm_activation_sparsity() -> dict:
    """TEAL-style: 50% of the inputs of every projection skipped (q/k/v, o, gate/up, down; decoders,
    where each decode step is a GEMV that reads only the kept weight rows; needs calibration)."""
    return {"passes": [{"activation_profile": {"inputs": True, "attention": True}}, "cost",
                       {"neuron_sparsity": {"target": 0.5, "method": "magnitude", "inputs": True,
                                            "attention": True}}]}


def sparse_attention() -> dict:
    """Per-head block-sparse attention patterns keeping 95% of the attention mass (needs calibration)."""
    return {"passes": [{"head_patterns": {"recall": 0.95}}, "cost", "sparse_attention"]}


def vit_token_pruning() -> dict:
    """EViT-style: keep 70% of the tokens before blocks 3, 6 and 9 of a 12-block ViT, by class-token
    attention."""
    return {"passes": ["cost", {"token_pruning": {"layers": [3, 6, 9], "keep": 0.7}}]}


def text_token_pruning() -> dict:
    """Keep 70% of the tokens from block 4 of a 6-block text encoder on (MiniLM), by [CLS] attention."""
    return {"passes": ["cost", {"token_pruning": {"layers": [4], "keep": 0.7}}]}


def combined() -> dict:
    """Activation sparsity + attention patterns + token pruning in one plan (6-block encoders; needs
    calibration).

    Analyses run first on the dense graph; then tokens are pruned (before block 4, keep 0.7), attention
    sites become block-sparse where their pattern allows, MLPs skip 50% of their centred activations, and
    ``speed_check`` times every sparse op against its dense form and puts back those that do not pay.
    """
    return {"passes": [
        "activation_profile", {"head_patterns": {"recall": 0.95}}, "token_importance", "cost",
        {"token_pruning": {"layers": [4], "keep": 0.7}}, "sparse_attention",
        {"neuron_sparsity": {"target": 0.5, "method": "centred"}}, "speed_check"]}


_PIPELINES: dict[str, Callable[[], dict]] = {
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


def get(name: str) -> dict:
    """The pipeline `name` as config data (a fresh dict: edit it freely; `Config.load` builds it)."""
    if name not in _PIPELINES:
        raise ConfigError(f"no pipeline named {name!r}{did_you_mean(name, _PIPELINES)}")
    return _PIPELINES[name]()


def describe() -> dict[str, str]:
    """Pipeline name → the first paragraph of its docstring (its summary), on one line."""
    return {name: " ".join((fn.__doc__ or "").strip().split("\n\n")[0].split())
            for name, fn in _PIPELINES.items()}
