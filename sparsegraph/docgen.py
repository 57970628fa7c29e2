"""The config reference, generated from the passes themselves (``docs/config-reference.md``).

Every built-in pass is a frozen dataclass whose fields are its options, each declared with `option`
(type, default, documentation, range or choices). This module renders them, with the first paragraph
of each pass's module docstring, so the reference cannot drift from the code: a test regenerates it
and compares it with the committed file. Run ``python -m sparsegraph.docgen > docs/config-reference.md``
after changing a pass.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import typing

from sparsegraph import pipelines
from sparsegraph.config import BACKENDS
from sparsegraph.pass_contract import AnalysisPass
from sparsegraph.passes import BUILTIN
from sparsegraph.registry import get_pass


def render() -> str:
    lines = ["# Config reference", "",
             "Generated from the pass option dataclasses by `python -m sparsegraph.docgen`; do not edit "
             "by hand.",
             "", "A config has four keys:", "",
             "- `passes`: the pipeline, in order; each item a pass name or `{name: {option: value}}`;",
             "- `overrides`: `{glob: {pass: {option: value}}}`, applied to sites whose module path or id "
             "matches",
             "  (`path.*` matches the module `path` itself too); a glob that matches no site is an error "
             "listing the sites;",
             f"- `backend`: one of {', '.join(f'`{b}`' for b in BACKENDS)};",
             "- `fidelity` (optional): the quality floor, `{metric: cosine | top1 | kl | perplexity | "
             "'pkg.module:function', min: … (max: … for kl and perplexity), holdout: 0.25}`;",
             "  the `budget` pass enforces it on held-out calibration batches (appended to the pipeline when "
             "absent).", "",
             "## Named pipelines", ""]
    lines += [f"- `{name}`: {doc}" for name, doc in pipelines.describe().items()]
    for name in sorted(BUILTIN):
        cls = get_pass(name)
        kind = "analysis" if issubclass(cls, AnalysisPass) else "rewrite"
        needs = " Needs calibration data." if getattr(cls, "needs_calibration", False) else ""
        needed = cls.requires if isinstance(cls.requires, tuple) else ()  # a property: by the options
        requires = f" Requires {', '.join(f'`{r}`' for r in needed)} earlier." if needed else ""
        lines += ["", f"## `{name}` ({kind})", "", _summary(cls) + needs + requires, ""]
        fields = dataclasses.fields(cls)
        if not fields:
            lines.append("No options.")
            continue
        hints = typing.get_type_hints(cls)
        lines += ["| option | type | default | accepts | meaning |", "|---|---|---|---|---|"]
        for f in fields:
            lines.append(f"| `{f.name}` | `{_type(hints[f.name])}` | `{_value(f.default)}` | {_accepts(f)} | "
                         f"{f.metadata.get('doc', '')} |")
    return "\n".join(lines) + "\n"


def _summary(cls) -> str:
    doc = (importlib.import_module(cls.__module__).__doc__ or cls.__doc__ or "").strip()
    return " ".join(doc.split("\n\n")[0].split())


def _type(hint) -> str:
    return str(hint).replace("typing.", "") if not isinstance(hint, type) else hint.__name__


def _value(v) -> str:
    return str(list(v)) if isinstance(v, tuple) else repr(v)


def _accepts(f: dataclasses.Field) -> str:
    if f.metadata.get("choices"):
        return ", ".join(f"`{c}`" for c in f.metadata["choices"])
    lo, hi = f.metadata.get("range") or (None, None)
    if lo is None and hi is None:
        return ""
    return f"[{'-∞' if lo is None else lo}, {'∞' if hi is None else hi}]"


if __name__ == "__main__":
    sys.stdout.write(render())
