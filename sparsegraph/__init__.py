"""sparsegraph: trace a PyTorch model into a graph, make it sparse with passes, run it and export it.

::

    import sparsegraph as sg
    cm = sg.compile(model, "analyze", example_inputs=(x,))
    cm(x); cm.plan.save("plan.json"); cm.report().to_markdown(); cm.export_onnx("model.onnx")
    cm.save("out/"); sg.load("out/")(x)     # a folder that runs without the model it was compiled from
"""

from sparsegraph.compile import CompiledModel, compile
from sparsegraph.config import Config
from sparsegraph.errors import (
    ArtifactError,
    CalibrationError,
    ConfigError,
    ExportError,
    InputError,
    ModelSpecError,
    PassError,
    PlanError,
    SparsegraphError,
    TraceError,
)
from sparsegraph.pass_contract import (
    AnalysisPass,
    PassResult,
    PassStats,
    Refused,
    RewritePass,
    SiteDecision,
    option,
    refusals,
)
from sparsegraph.plan import SparsityPlan, load_plan
from sparsegraph.recover import recover
from sparsegraph.registry import available_passes, register_pass
from sparsegraph.trace import trace
from sparsegraph.version import __version__

load = CompiledModel.load  # sg.load(dir): a model saved with cm.save(dir)

__all__ = ["AnalysisPass", "ArtifactError", "CalibrationError", "CompiledModel", "Config", "ConfigError",
           "ExportError", "InputError", "ModelSpecError", "PassError", "PassResult", "PassStats",
           "PlanError", "Refused", "RewritePass", "SiteDecision", "SparsegraphError", "SparsityPlan",
           "TraceError", "__version__", "available_passes", "compile", "load", "load_plan", "option",
           "recover", "refusals", "register_pass", "trace"]
