"""`SparsityPlan`: every decision a compile made, per site, with its evidence, as versioned JSON.

Layout (``schema_version`` 1)::

    {
      "schema_version": 1,
      "versions": {"sparsegraph": "0.1.0", "torch": "2.14.1"},
      "model": {"class": "SentenceEncoder", "fingerprint": "sha256…",
                "sites": [{"id": "attn:encoder.layer.0.attention", "kind": "attention", "layer": 0, …}, …]},
      "config": {"passes": [...], "overrides": {...}, "backend": "auto"},
      "passes": {"<pass>": {"kind": "analysis" | "rewrite", "options": {...}, "stats": {...},
                            "summary": {...}}},
      "sites": {"<site id>": {"<pass>": {"decision": {...}, "evidence": {...}}}}
    }

Analysis passes write ``evidence`` (and a model-level ``summary``); rewrite passes write a ``decision`` per
site, which is all a later compile needs to reproduce the rewrite. The plan holds JSON values only, so
``load_plan(p.save(path)) == p`` exactly.

The fingerprint hashes the traced graph's structure: parameter and buffer names, shapes and dtypes, and
the sites found. It ignores the example shapes, so a plan made at one sequence length applies at any
other. A plan whose fingerprint differs from the model's is refused, naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparsegraph import __version__, ir
from sparsegraph.errors import PlanError
from sparsegraph.pass_contract import PassStats, SiteDecision

SCHEMA_VERSION = 1


@dataclass
class SparsityPlan:
    model: dict
    config: dict
    passes: dict[str, dict] = field(default_factory=dict)
    sites: dict[str, dict[str, dict]] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=lambda: {"sparsegraph": __version__,
                                                              "torch": torch.__version__.split("+")[0]})
    schema_version: int = SCHEMA_VERSION

    # -- construction ---------------------------------------------------------------------------------------

    @classmethod
    def for_graph(cls, gm: torch.fx.GraphModule, config: dict, model_class: str) -> SparsityPlan:
        return cls(model={"class": model_class, "fingerprint": fingerprint(gm), "sites": describe_sites(gm)},
                   config=jsonable(config))

    # -- what passes write ----------------------------------------------------------------------------------

    def record_pass(self, name: str, kind: str, options: dict, stats: PassStats) -> None:
        entry = self.passes.setdefault(name, {})
        entry.update(kind=kind, options=jsonable(options), stats=jsonable(stats.to_json()))

    def stats_of(self, pass_name: str) -> PassStats | None:
        """The stats a pass recorded (None if it has not run)."""
        stats = self.passes.get(pass_name, {}).get("stats")
        return PassStats.from_json(stats) if stats is not None else None

    def set_summary(self, pass_name: str, summary: dict) -> None:
        self.passes.setdefault(pass_name, {})["summary"] = jsonable(summary)

    def summary(self, pass_name: str) -> dict | None:
        return self.passes.get(pass_name, {}).get("summary")

    def set_evidence(self, pass_name: str, site: str, evidence: dict) -> None:
        self.sites.setdefault(site, {}).setdefault(pass_name, {})["evidence"] = jsonable(evidence)

    def evidence(self, pass_name: str, site: str) -> dict | None:
        return self.sites.get(site, {}).get(pass_name, {}).get("evidence")

    def record_decisions(self, pass_name: str, decisions: dict[str, SiteDecision], stats: PassStats) -> None:
        for site, d in decisions.items():
            self.sites.setdefault(site, {})[pass_name] = {"decision": jsonable(d.decision),
                                                          "evidence": jsonable(d.evidence)}
        self.passes.setdefault(pass_name, {})["decided"] = jsonable(stats.to_json())

    def decisions(self, pass_name: str) -> tuple[dict[str, SiteDecision], PassStats]:
        """The decisions `pass_name` recorded, and the stats of its deciding (for replay)."""
        if pass_name not in self.passes or "decided" not in self.passes[pass_name]:
            raise PlanError(f"the plan holds no decisions of pass {pass_name!r}; it was made by passes "
                            f"{sorted(self.passes)}. Compile with a config instead, or use the plan's own config")
        decisions = {site: SiteDecision(e[pass_name]["decision"], e[pass_name].get("evidence", {}))
                     for site, e in self.sites.items() if "decision" in e.get(pass_name, {})}
        return decisions, PassStats.from_json(self.passes[pass_name]["decided"])

    def adopt_facts(self, other: SparsityPlan, pass_names) -> None:
        """Copy the entries (summary, stats, per-site evidence) of analysis passes `pass_names` from `other`."""
        for name in pass_names:
            self.passes[name] = jsonable(other.passes[name])
            for site, per_pass in other.sites.items():
                if name in per_pass:
                    self.sites.setdefault(site, {})[name] = jsonable(per_pass[name])

    # -- checks ----------------------------------------------------------------------------------------------

    def check_model(self, gm: torch.fx.GraphModule, model_class: str) -> None:
        """Refuse this plan for a model whose structure differs from the one it was made for."""
        theirs = fingerprint(gm)
        if theirs == self.model["fingerprint"]:
            return
        planned = {s["id"] for s in self.model["sites"]}
        found = {s["id"] for s in describe_sites(gm)}
        lines = [f"this plan was made for a different model: plan fingerprint {self.model['fingerprint'][:12]} "
                 f"({self.model['class']}, {len(planned)} sites), this model {theirs[:12]} "
                 f"({model_class}, {len(found)} sites)."]
        if planned - found:
            lines.append(f"  sites in the plan but not in the model: {sorted(planned - found)[:5]}")
        if found - planned:
            lines.append(f"  sites in the model but not in the plan: {sorted(found - planned)[:5]}")
        if planned == found:
            lines.append("  the sites agree, so parameter names, shapes or dtypes differ")
        lines.append("Make a new plan for this model (compile with a config and calibration data).")
        raise PlanError("\n".join(lines))

    # -- JSON -------------------------------------------------------------------------------------------------

    def to_json(self) -> dict:
        return {"schema_version": self.schema_version, "versions": self.versions, "model": self.model,
                "config": self.config, "passes": self.passes, "sites": self.sites}

    @classmethod
    def from_json(cls, data: dict) -> SparsityPlan:
        if not isinstance(data, dict) or "schema_version" not in data:
            raise PlanError("not a sparsegraph plan: no 'schema_version' key")
        if data["schema_version"] != SCHEMA_VERSION:
            raise PlanError(f"plan schema version {data['schema_version']} is not supported by this sparsegraph "
                            f"(it reads version {SCHEMA_VERSION}); recompile the plan with this version")
        missing = {"versions", "model", "config", "passes", "sites"} - set(data)
        if missing:
            raise PlanError(f"plan is missing keys {sorted(missing)}")
        return cls(model=data["model"], config=data["config"], passes=data["passes"], sites=data["sites"],
                   versions=data["versions"], schema_version=data["schema_version"])

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n")
        return path


def load_plan(path: str | os.PathLike) -> SparsityPlan:
    """Read a plan saved with `SparsityPlan.save`."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise PlanError(f"no plan file at {path}") from e
    except json.JSONDecodeError as e:
        raise PlanError(f"{path} is not valid JSON: {e}") from e
    return SparsityPlan.from_json(data)


def fingerprint(gm: torch.fx.GraphModule) -> str:
    """sha256 of the graph's parameters/buffers (name, shape, dtype) and of its sites."""
    tensors = [(name, list(t.shape), str(t.dtype)) for name, t in [*gm.named_parameters(), *gm.named_buffers()]]
    sites = [[s["id"], s["kind"], s["layer"]] for s in describe_sites(gm)]
    blob = json.dumps({"tensors": sorted(tensors), "sites": sites}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def describe_sites(gm: torch.fx.GraphModule) -> list[dict]:
    out = []
    for s in ir.attention_sites(gm):
        out.append({"id": s.id, "kind": "attention", "layer": s.layer, "module_path": s.module_path, "form": s.form,
                    "heads": s.heads, "kv_heads": s.kv_heads, "head_dim": s.head_dim, "causal": s.causal})
    for s in ir.mlp_sites(gm):
        out.append({"id": s.id, "kind": "mlp", "layer": s.layer, "module_path": s.module_path, "gated": s.gated,
                    "activation": s.activation, "hidden": s.hidden, "intermediate": s.intermediate})
    return out


def jsonable(value: Any) -> Any:
    """`value` as JSON-native types (tuples → lists, tensors/numpy → lists and Python numbers)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return jsonable(value.tolist())
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # numpy arrays and scalars
        return jsonable(value.tolist())
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        raise PlanError(f"cannot store non-finite number {value} in a plan")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise PlanError(f"cannot store {type(value).__name__} in a plan; use JSON values")
