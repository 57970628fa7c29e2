"""Pass registry: name → pass class.

Built-in passes are listed by name and module in `sparsegraph.passes.BUILTIN` and imported on first use.
Third-party passes register through the entry-point group ``sparsegraph.passes``::

    [project.entry-points."sparsegraph.passes"]
    near_zero_rows = "my_package.module:NearZeroRows"

and are loaded lazily, by name, the first time a config asks for them.
"""

from __future__ import annotations

import importlib
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
    """The pass class registered as `name`, importing a built-in or plugin on first use."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    from sparsegraph.passes import BUILTIN

    if name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    else:
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
    from sparsegraph.passes import BUILTIN

    return sorted({*_REGISTRY, *BUILTIN, *(ep.name for ep in _entry_points())})


def _entry_points():
    return metadata.entry_points(group=ENTRY_POINT_GROUP)
