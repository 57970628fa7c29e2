"""Pass registry: name → pass class.

Every pass, built-in or third-party, is found through the entry-point group ``sparsegraph.passes``::

    [project.entry-points."sparsegraph.passes"]
    near_zero_rows = "my_package.module:NearZeroRows"

and loaded lazily, by name, the first time a config asks for it (the built-ins are declared the same
way in sparsegraph's own ``pyproject.toml``), so the registry, and the core above it, imports no pass.
Passes defined in a running program register with `register_pass` alone.
"""

from __future__ import annotations

from importlib import metadata

from sparsegraph.errors import ConfigError, did_you_mean
from sparsegraph.pass_contract import Pass

ENTRY_POINT_GROUP = "sparsegraph.passes"

_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(name: str):
    """Class decorator: register `cls` under `name` (and set ``cls.name``)."""

    def decorate(cls: type[Pass]) -> type[Pass]:
        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            raise TypeError(f"@register_pass({name!r}) needs a Pass subclass, got {cls!r}")
        existing = _REGISTRY.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"pass name {name!r} is taken by {existing.__module__}.{existing.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def get_pass(name: str) -> type[Pass]:
    """The pass class registered as `name`, importing its module (entry point) on first use."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    for ep in _entry_points():
        if ep.name == name:
            cls = ep.load()
            _REGISTRY.setdefault(name, cls)
            if getattr(cls, "name", None) != name:
                cls.name = name
            break
    if name not in _REGISTRY:
        raise ConfigError(f"unknown pass {name!r}{did_you_mean(name, available_passes())}")
    return _REGISTRY[name]


def available_passes() -> list[str]:
    """Names of every pass that a config can use (built-ins, registered and installed plugins)."""
    return sorted({*_REGISTRY, *(ep.name for ep in _entry_points())})


def _entry_points():
    return metadata.entry_points(group=ENTRY_POINT_GROUP)
