"""Built-in passes: analysis passes under `analysis/`, rewrite passes under `rewrite/`, one per file.

`BUILTIN` maps each pass name to its module (what the config reference documents). The registry finds
them, as it finds plugins, through the ``sparsegraph.passes`` entry points declared in ``pyproject.toml``
(a test keeps the two lists equal) and imports a module the first time a config names its pass.
"""

BUILTIN: dict[str, str] = {
    # analysis
    "activation_profile": "sparsegraph.passes.analysis.activation_profile",
    "conv_profile": "sparsegraph.passes.analysis.conv_profile",
    "cost": "sparsegraph.passes.analysis.cost",
    "head_patterns": "sparsegraph.passes.analysis.head_patterns",
    "linear_profile": "sparsegraph.passes.analysis.linear_profile",
    "token_importance": "sparsegraph.passes.analysis.token_importance",
    "roi": "sparsegraph.passes.analysis.roi",
    # rewrite
    "budget": "sparsegraph.passes.rewrite.budget",
    "conv_sparsity": "sparsegraph.passes.rewrite.conv_sparsity",
    "decode_attention": "sparsegraph.passes.rewrite.decode_attention",
    "neuron_sparsity": "sparsegraph.passes.rewrite.neuron_sparsity",
    "neuron_pruning": "sparsegraph.passes.rewrite.neuron_pruning",
    "nm_weights": "sparsegraph.passes.rewrite.nm_weights",
    "sparse_attention": "sparsegraph.passes.rewrite.sparse_attention",
    "speed_check": "sparsegraph.passes.rewrite.speed_check",
    "token_pruning": "sparsegraph.passes.rewrite.token_pruning",
}
