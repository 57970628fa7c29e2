"""Who may import whom: the package's modules import each other without cycles, and each layer only
imports the layers below it (docs/ARCHITECTURE.md, "Layers"). Read from the source (every import,
module-level or inside a function; imports under ``if TYPE_CHECKING:`` are annotations, not
dependencies), so a cycle hidden in a function body fails here too."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"sparsegraph": ROOT / "sparsegraph", "sparsegraph.passes": ROOT / "passes",
            "sparsegraph.codegen": ROOT / "codegen"}

# From the bottom. A module may import its own layer and those below; the first layer that lists a
# module's name (or a package prefix of it; "sparsegraph" itself means the package's __init__ only) is its
# layer.
LAYERS = [
    ("base", ["sparsegraph.version", "sparsegraph.errors", "sparsegraph.meta", "sparsegraph.ir",
              "sparsegraph.svg", "sparsegraph.png", "sparsegraph.data", "sparsegraph.distributed"]),
    ("domain", ["sparsegraph.graph_edit", "sparsegraph.canonicalize", "sparsegraph.inputs",
                "sparsegraph.attention_layouts",
                "sparsegraph.boxes", "sparsegraph.cost_model", "sparsegraph.observe", "sparsegraph.measure",
                "sparsegraph.sections", "sparsegraph.kv_cache", "sparsegraph.fidelity"]),
    ("codegen", ["sparsegraph.codegen"]),
    ("measures", ["sparsegraph.attention_scores"]),  # reads the token_scores op's kernel: above codegen
    ("contract", ["sparsegraph.pass_contract", "sparsegraph.facts", "sparsegraph.registry",
                  "sparsegraph.pipelines", "sparsegraph.config", "sparsegraph.plan", "sparsegraph.context",
                  "sparsegraph.instruments", "sparsegraph.manager", "sparsegraph.trace",
                  "sparsegraph.onnx_export"]),
    ("passes", ["sparsegraph.passes"]),
    ("api", ["sparsegraph.compile", "sparsegraph.artifact", "sparsegraph.generation", "sparsegraph.report",
             "sparsegraph.recover",
             "sparsegraph.models", "sparsegraph"]),
    ("tools", ["sparsegraph.cli", "sparsegraph.demo", "sparsegraph.docgen", "sparsegraph.__main__"]),
]


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            # `from P import m` depends on the module P.m; `from P import name` on P itself
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def _graph() -> nx.DiGraph:
    modules = _modules()
    g = nx.DiGraph()
    for name, path in modules.items():
        g.add_node(name)
        for target in _imports(path, name, set(modules)):
            g.add_edge(name, target)
    return g


def _layer(name: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or (p != "sparsegraph" and name.startswith(p + ".")) for p in prefixes):
            return index
    raise AssertionError(f"{name} is in no layer of tests/test_layers.py: add it where it belongs")


def test_no_import_cycles():
    g = _graph()
    # a package's __init__ importing its own submodules is how Python packages work, not a cycle of design
    for name in list(g):
        for target in list(g.successors(name)):
            if target.startswith(name + "."):
                g.remove_edge(name, target)
    cycles = sorted(sorted(c) for c in nx.simple_cycles(g))
    assert not cycles, f"import cycles: {cycles[:5]}"


def test_each_layer_imports_only_layers_below():
    g = _graph()
    upward = sorted((a, b) for a, b in g.edges if _layer(b) > _layer(a) and not b.startswith(a + "."))
    assert not upward, "imports from a higher layer:\n" + "\n".join(
        f"  {a} ({LAYERS[_layer(a)][0]}) → {b} ({LAYERS[_layer(b)][0]})" for a, b in upward)


def test_passes_are_independent_and_the_core_names_none():
    """A pass reads another pass's facts in the plan, never its module; the core (every layer below the
    tools) imports no pass: the registry finds them by name through entry points, and the report asks
    each pass for its section."""
    g = _graph()
    tools = next(i for i, (name, _) in enumerate(LAYERS) if name == "tools")
    offending = sorted((a, b) for a, b in g.edges if b.startswith("sparsegraph.passes")
                       and not a.startswith("sparsegraph.passes") and _layer(a) < tools)
    siblings = sorted((a, b) for a, b in g.edges if a.startswith("sparsegraph.passes.")
                      and b.startswith("sparsegraph.passes.") and a.count(".") == b.count(".") == 3)
    assert not offending + siblings, "\n".join(f"  {a} → {b}" for a, b in offending + siblings)
