"""`Config`: the pipeline as data.

::

    passes:                          # run in order; each item a name, or {name: {option: value}}
      - activation_profile: {}
      - neuron_sparsity: {target: 0.5}
    overrides:                       # per-site options; glob on the site's module path (or its id)
      "encoder.layer.0.*": {neuron_sparsity: {target: 0.0}}
    backend: auto                    # auto | eager | triton | onnx
    fidelity: {metric: cosine, min: 0.99, holdout: 0.25}   # optional: the quality floor (`fidelity`)

With a ``fidelity`` section the ``budget`` pass runs last (appended when the pipeline does not list it)
and keeps only the rewrites whose held-out fidelity meets the floor; ``budget`` without the section is
refused (it would have no floor to keep).

`Config.load` takes a dict, a YAML or JSON path, a named pipeline (`sparsegraph.pipelines`) or a
Config. Every key and value is checked when the config is built, types first (a YAML file gives
whatever its author typed: numbers as keys, a string where a list belongs, NaN): an unknown key, pass
or option raises `ConfigError` with the nearest valid name; a bad value names the option and what it
accepts.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsegraph import pipelines
from sparsegraph.errors import ConfigError, did_you_mean
from sparsegraph.fidelity import Fidelity
from sparsegraph.pass_contract import Pass
from sparsegraph.registry import get_pass

BACKENDS = ("auto", "eager", "triton", "onnx")
_TOP_KEYS = ("passes", "overrides", "backend", "fidelity")
BUDGET = "budget"  # the pass that enforces the fidelity section


@dataclass(frozen=True)
class Config:
    passes: tuple[Pass, ...] = ()
    overrides: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    backend: str = "auto"
    fidelity: Fidelity | None = None

    def __post_init__(self):
        if not isinstance(self.backend, str):
            raise ConfigError(f"config 'backend' must be one of {BACKENDS} (a string), got {self.backend!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend {self.backend!r} is not one of "
                              f"{BACKENDS}{did_you_mean(self.backend, BACKENDS)}")
        if not isinstance(self.passes, tuple) or not all(isinstance(p, Pass) for p in self.passes):
            raise ConfigError(f"Config(passes=...) takes a tuple of passes, got {self.passes!r}; build "
                              "configs with Config.from_dict or Config.load")
        if not isinstance(self.overrides, dict):
            raise ConfigError(f"config 'overrides' must map globs to {{pass: {{option: value}}}}, got "
                              f"{self.overrides!r}")
        names = [p.name for p in self.passes]
        if self.fidelity is not None and not isinstance(self.fidelity, Fidelity):
            raise ConfigError(f"Config(fidelity=...) takes a Fidelity, got {self.fidelity!r}; build configs "
                              "with Config.from_dict or Config.load")
        if BUDGET in names and self.fidelity is None:
            raise ConfigError("pass 'budget' keeps the rewrites that meet a fidelity floor, and the config "
                              "gives none: add e.g. fidelity: {metric: cosine, min: 0.99}")
        for glob, per_pass in self.overrides.items():
            if not isinstance(glob, str):
                raise ConfigError(f"overrides key {glob!r} must be a glob string (quote it in YAML)")
            if not isinstance(per_pass, dict):
                raise ConfigError(f"overrides[{glob!r}] must map pass names to options, got {per_pass!r}")
            for pass_name, opts in per_pass.items():
                if not isinstance(pass_name, str):
                    raise ConfigError(f"overrides[{glob!r}] key {pass_name!r} must be a pass name (a string)")
                if pass_name not in names:
                    raise ConfigError(f"overrides[{glob!r}] names pass {pass_name!r}, which is not in the "
                                      f"pipeline{did_you_mean(pass_name, names)}")
                base = self.passes[names.index(pass_name)]
                _with_options(base, opts, f"overrides[{glob!r}][{pass_name!r}]")

    # -- loading --------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, source: Config | dict | str | os.PathLike | None) -> Config:
        """A Config from a Config, a dict, a path to YAML/JSON, or a named pipeline."""
        if source is None:
            return cls()
        if isinstance(source, Config):
            return source
        if isinstance(source, dict):
            return cls.from_dict(source)
        if isinstance(source, (str, os.PathLike)):
            text = str(source)
            if text in pipelines.names():
                return cls.from_dict(pipelines.get(text))
            path = Path(source)
            try:
                is_file = path.suffix.lower() in (".yaml", ".yml", ".json") or path.exists()
            except (OSError, ValueError) as e:  # a name the OS cannot take (a NUL byte, too long)
                raise ConfigError(f"config {text!r} is neither a file nor a named pipeline: {e}") from e
            if is_file:
                return cls.from_dict(_read(path))
            raise ConfigError(f"config {text!r} is neither a file nor a named pipeline"
                              f"{did_you_mean(text, pipelines.names())}")
        raise ConfigError(f"config must be a dict, a path or a Config, got {type(source).__name__}")

    @classmethod
    def from_dict(cls, data: dict) -> Config:
        if not isinstance(data, dict):
            raise ConfigError(f"a config is a mapping with keys {_TOP_KEYS}, got {type(data).__name__}")
        for key in data:
            if key not in _TOP_KEYS:
                near = did_you_mean(key, _TOP_KEYS) if isinstance(key, str) else f" (valid: {_TOP_KEYS})"
                raise ConfigError(f"unknown config key {key!r}{near}")
        items = data.get("passes")
        items = [] if items is None else items  # `passes:` with nothing after it in YAML
        if not isinstance(items, list):
            raise ConfigError("config 'passes' must be a list of pass names or {name: {options}} items, got "
                              f"{items!r}")
        overrides = data.get("overrides")
        overrides = {} if overrides is None else overrides
        if not isinstance(overrides, dict):
            raise ConfigError(f"config 'overrides' must map globs to {{pass: {{option: value}}}}, got "
                              f"{overrides!r}")
        passes = tuple(_pass_from_item(item, i) for i, item in enumerate(items))
        seen = set()
        for p in passes:
            if p.name in seen:
                raise ConfigError(f"pass {p.name!r} appears twice in the pipeline; give it once and use "
                                  "overrides for per-site options")
            seen.add(p.name)
        fidelity = data.get("fidelity")
        fidelity = None if fidelity is None else Fidelity.from_dict(fidelity)
        if fidelity is not None and BUDGET not in seen:
            passes += (get_pass(BUDGET).from_options({}),)
        return cls(passes=passes, overrides=dict(overrides), backend=data.get("backend", "auto"),
                   fidelity=fidelity)

    def to_dict(self) -> dict:
        data = {"passes": [{p.name: p.options()} for p in self.passes],
                "overrides": json.loads(json.dumps(self.overrides)), "backend": self.backend}
        if self.fidelity is not None:
            data["fidelity"] = self.fidelity.to_dict()
        return data

    # -- per-site options -----------------------------------------------------------------------------------

    def for_site(self, p: Pass, site_id: str, module_path: str) -> Pass:
        """`p` with the options of every override whose glob matches the site (in config order)."""
        merged: dict[str, Any] = {}
        for glob, per_pass in self.overrides.items():
            if p.name in per_pass and matches(glob, site_id, module_path):
                merged.update(per_pass[p.name])
        return _with_options(p, merged, f"overrides for {site_id!r}") if merged else p


def matches(glob: str, site_id: str, module_path: str) -> bool:
    """Whether an override glob names a site: it matches the site's id or module path, and ``path.*``
    also matches the module ``path`` itself (the site's own module, not only what is below it)."""
    names = [site_id, module_path] if module_path else [site_id]
    if glob.endswith(".*"):
        names += [n + "." for n in names]
    return any(fnmatch.fnmatchcase(n, glob) for n in names)


def check_overrides(config: Config, sites) -> None:
    """Refuse overrides whose glob names no site of the traced model (they would silently do nothing)."""
    unmatched = [g for g in config.overrides if not any(matches(g, s.id, s.module_path) for s in sites)]
    if unmatched:
        listed = ", ".join(f"{s.id} ({s.module_path or 'no module path'})" for s in sites[:12])
        more = f" and {len(sites) - 12} more" if len(sites) > 12 else ""
        raise ConfigError(f"overrides {unmatched} match no site of this model, so they would change nothing. "
                          f"Globs match a site's id or module path (`path.*` includes `path`); the sites "
                          f"are: {listed or 'none'}{more}")


def _pass_from_item(item, index: int) -> Pass:
    if isinstance(item, str):
        name, options = item, {}
    elif isinstance(item, dict) and len(item) == 1:
        ((name, options),) = item.items()
    else:
        raise ConfigError(f"passes[{index}] must be a pass name or a one-key mapping {{name: {{options}}}}, "
                          f"got {item!r}")
    if not isinstance(name, str):
        raise ConfigError(f"passes[{index}]: {name!r} is not a pass name (a string)")
    if options is not None and not isinstance(options, dict):
        raise ConfigError(f"passes[{index}]: options of pass {name!r} must be a mapping, got {options!r}")
    try:
        return get_pass(name).from_options(_tuples(options or {}))
    except ConfigError as e:  # say where in the pipeline
        raise ConfigError(f"passes[{index}]: {e}") from e


def _with_options(p: Pass, options: dict, where: str) -> Pass:
    if not isinstance(options, dict):
        raise ConfigError(f"{where}: the options of pass {p.name!r} must be a mapping {{option: value}}, "
                          f"got {options!r}")
    known = {f.name for f in dataclasses.fields(p)}
    for key in options:
        if not isinstance(key, str):
            raise ConfigError(f"{where}: {key!r} is not an option name (a string) of pass {p.name!r}")
        if key not in known:
            raise ConfigError(f"{where}: pass {p.name!r} has no option {key!r}{did_you_mean(key, known)}")
    try:
        return dataclasses.replace(p, **_tuples(options))
    except ConfigError as e:  # a bad value: say which override gave it
        raise ConfigError(f"{where}: {e}") from e


def _tuples(options: dict) -> dict:
    """YAML/JSON give lists; pass options are tuples (frozen dataclasses)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}


def _read(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError as e:
        raise ConfigError(f"config file {path} does not exist") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not a text file (configs are UTF-8 YAML or JSON): "
                          f"{e}") from e
    except (OSError, ValueError) as e:  # a folder, no permission; a name the OS cannot take (a NUL byte)
        raise ConfigError(f"cannot read the config file {str(path)!r}: "
                          f"{getattr(e, 'strerror', None) or e}") from e
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
    import yaml

    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
