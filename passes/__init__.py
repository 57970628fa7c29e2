"""Built-in passes: analysis passes under `analysis/`, rewrite passes under `rewrite/`, one per file.

`BUILTIN` maps each pass name to its module; the registry imports a module the first time a config
names its pass. Plugins register through the ``sparsegraph.passes`` entry-point group instead.
"""

BUILTIN: dict[str, str] = {
    # analysis
    "cost": "sparsegraph.passes.analysis.cost",
    # rewrite
    "nm_weights": "sparsegraph.passes.rewrite.nm_weights",
}
