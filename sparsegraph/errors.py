"""Errors raised by sparsegraph.

Every error names the problem and the fix. The CLI turns any `SparsegraphError` into a one-line
message on stderr and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SparsegraphError(Exception):
    """Base class of every error that is the user's input, not our bug."""


class TraceError(SparsegraphError):
    """The model could not be captured into a graph."""


class ConfigError(SparsegraphError):
    """A config key or value is invalid."""


class PlanError(SparsegraphError):
    """A plan is malformed, from another schema version, or for another model."""


class CalibrationError(SparsegraphError):
    """Calibration data that cannot support the statistics asked of it (empty, all masked, non-finite,
    constant, too few tokens); the message names the batch or site and the likely mistake."""


class PassError(SparsegraphError):
    """A pass failed; the message names the pass and, where known, the site."""

    def __init__(self, pass_name: str, message: str, site: str | None = None):
        where = f" at site {site!r}" if site else ""
        super().__init__(f"pass {pass_name!r} failed{where}: {message}")
        self.pass_name = pass_name
        self.site = site


class InputError(SparsegraphError):
    """A compiled model was called with inputs its graph cannot take (arity, dtype, rank, a fixed size)."""


class PlanEntryError(PlanError):
    """A plan entry of one pass (a rewrite's decision, an analysis pass's facts) that cannot be used on this
    graph. The message names the pass, the site and the key, the problem and the fix; the PassManager
    passes it on as it is."""

    def __init__(self, pass_name: str, site: str | None, message: str):
        SparsegraphError.__init__(self, message)
        self.pass_name = pass_name
        self.site = site


class ExportError(SparsegraphError):
    """The compiled model could not be exported to ONNX, or the exported file does not compute what the
    model does (numerical validation)."""


class ArtifactError(SparsegraphError):
    """A saved compiled model (`CompiledModel.save`) cannot be written or loaded: the folder is not one, a
    file was changed after saving, or it holds no program to run."""


class UsageError(SparsegraphError):
    """A command's argument cannot be used: a count below 1, a missing or empty input file, or an output
    that would overwrite an input (always refused) or an existing file (refused without ``--force``), or
    that cannot be written."""


class ModelSpecError(SparsegraphError):
    """A model name such as `zoo:minilm` or `pkg.module:factory` could not be resolved."""


def did_you_mean(word, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the nearest choice, or a list of the valid ones when none is near (`word`
    may be anything a config held: a number, None)."""
    choices = sorted(map(str, choices))
    close = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (valid: {', '.join(map(repr, choices))})" if choices else ""
