"""`compile`: trace, run the pipeline (or replay a plan), and wrap the result as a `CompiledModel`.

One compile, top to bottom::

    config  = Config.load(config)             # or the config stored in the plan
    gm      = trace(model, example_inputs)    # torch.export → GraphModule, sites annotated, shapes known
    plan    = SparsityPlan.for_graph(gm)      # or the given plan, checked against gm's fingerprint
    gm      = PassManager(config.passes).run(gm, ctx)   # analysis facts and rewrites, verified per pass
    return CompiledModel(gm, plan)

The user's model is never changed: tracing restores its ``training`` flags, and passes never write
into existing tensors (a rewrite adds new buffers to the traced graph and leaves the originals alone).
The compiled graph shares the parameters it did not rewrite with the user's model, as ``torch.compile``
does, so compiling a large model does not double its memory.
"""

from __future__ import annotations

import copy
import os
import tempfile
import threading
from pathlib import Path

import torch

from sparsegraph import artifact, graph_edit, inputs, ir
from sparsegraph.codegen import use_backend
from sparsegraph.config import Config, check_overrides
from sparsegraph.context import Batch, PassContext
from sparsegraph.cost_model import NodeCost, site_costs, total_cost
from sparsegraph.errors import CalibrationError, ConfigError, InputError
from sparsegraph.generation import Decoder
from sparsegraph.instruments import default_instruments
from sparsegraph.manager import PassManager
from sparsegraph.observe import check_calibration
from sparsegraph.onnx_export import OnnxModel, export_onnx
from sparsegraph.pass_contract import AnalysisPass
from sparsegraph.plan import SparsityPlan, as_plan
from sparsegraph.report import Report
from sparsegraph.trace import trace

# Guards the lazy ONNX session of every CompiledModel (a module-level lock, not one per model, so that a
# CompiledModel stays deep-copyable; exports are one at a time in a process anyway).
_ONNX_LOCK = threading.Lock()
_DECODER_LOCK = threading.Lock()


def compile(
    model: torch.nn.Module,
    config: Config | dict | str | os.PathLike | None = None,
    *,
    example_inputs=(),
    example_kwargs: dict | None = None,
    calibration=None,
    plan: SparsityPlan | str | os.PathLike | None = None,
    dynamic: bool = True,
    quiet: bool = False,
) -> CompiledModel:
    """Compile `model` with `config` (or replay `plan`) into a sparse `CompiledModel`.

    ``example_inputs``/``example_kwargs`` are one call's inputs (tensor or tuple, dict): they fix what is
    traced. ``calibration`` is an iterable of batches (tensor, tuple or dict each) that analysis passes
    profile; it is needed only when the pipeline has such passes and no plan supplies their facts.

    ``plan`` (a `SparsityPlan` or a path to one) must have been made for this model (its fingerprint is
    checked). Alone, it replays: the plan's own config runs and its decisions are reproduced exactly.
    With a ``config`` too, the plan supplies the facts of its calibration-driven analysis passes (a saved
    profile) and the config's rewrites decide afresh: tuning a target does not re-profile.
    """
    if plan is not None:
        plan = as_plan(plan)  # loaded and checked: a malformed plan is refused here, naming the key
    cfg = Config.load(config if config is not None or plan is None else plan.config)
    example = Batch.of(example_inputs) if not example_kwargs else Batch(Batch.of(example_inputs).args,
                                                                        dict(example_kwargs))
    gm = trace(model, example.args, example.kwargs, dynamic=dynamic)
    model_class = type(model).__name__
    replay, reuse, needing = plan is not None and config is None, frozenset(), []
    if plan is not None:
        plan.check_model(gm, model_class)
    if replay:
        plan = SparsityPlan.from_json(copy.deepcopy(plan.to_json()))
        plan.check_replay(cfg)
    else:
        if plan is not None:
            reuse = _reusable_facts(plan, cfg)
        profile, plan = plan, SparsityPlan.for_graph(gm, cfg.to_dict(), model_class)
        if reuse:
            plan.adopt_facts(profile, reuse)
        needing = [p.name for p in cfg.passes if isinstance(p, AnalysisPass) and p.needs_calibration
                   and p.name not in reuse]
        if needing and calibration is None:
            raise ConfigError(f"passes {needing} profile calibration data: pass calibration=[batch, ...] "
                              "(inputs like example_inputs), or a plan that holds their facts")
    batches, holdout, dense = _batches(calibration), [], None
    if cfg.fidelity is not None and not replay:  # the floor is checked on batches the analyses never see
        if not batches:
            raise ConfigError("the config's fidelity floor is checked on held-out calibration batches: pass "
                              "calibration=[batch, ...] (at least 2), or compile without 'fidelity'")
        batches, holdout = cfg.fidelity.split(batches)
        check_calibration(gm, holdout)
        dense = graph_edit.sharing_copy(gm)
    if needing:
        check_calibration(gm, batches)
    check_overrides(cfg, ir.sites(gm))
    dense_cost, dense_sites = total_cost(gm), site_costs(gm)
    ctx = PassContext(plan=plan, config=cfg, example=example, calibration=batches, holdout=holdout,
                      dense=dense, replay=replay, reuse=reuse, quiet=quiet,
                      instruments=default_instruments(len(cfg.passes), quiet))
    gm = PassManager(cfg.passes, ctx.instruments).run(gm, ctx)
    cm = CompiledModel(gm, plan, cfg, example, model_class, dense_cost, dense_sites, dict(ctx.timings))
    cm._source = model  # a causal LM's cache graphs are traced from it on first `generate` (same weights)
    return cm


def _batches(calibration) -> list[Batch]:
    if calibration is None:
        return []
    if isinstance(calibration, (torch.Tensor, dict)):
        raise CalibrationError("calibration is a list of batches, got one tensor or dict: wrap it, "
                               "calibration=[batch]")
    out = []
    for index, item in enumerate(calibration):
        try:
            out.append(Batch.of(item))
        except TypeError as e:
            raise CalibrationError(f"calibration batch {index}: {e}") from e
    return out


def _reusable_facts(plan: SparsityPlan, cfg: Config) -> frozenset[str]:
    """Calibration-driven analysis passes of `cfg` whose facts `plan` holds, made with the same options."""
    reuse = set()
    for p in cfg.passes:
        if not (isinstance(p, AnalysisPass) and p.needs_calibration) or p.name not in plan.passes:
            continue
        theirs = plan.passes[p.name].get("options")
        if theirs != p.options():
            raise ConfigError(f"the plan's {p.name!r} ran with options {theirs}, the config asks for "
                              f"{p.options()}: use the plan's options, or profile again with "
                              "calibration data")
        reuse.add(p.name)
    return frozenset(reuse)


class CompiledModel(torch.nn.Module):
    """The compiled model: call it like the original. Holds the plan, the graph, and what it cost.

    ``backend`` (from the config) picks how sparse ops run: ``auto`` (Triton on CUDA, CPU kernels
    otherwise), ``eager`` (CPU kernels), ``triton``, or ``onnx`` (the whole model exported once to a
    temporary file and run in onnxruntime).
    """

    def __init__(self, gm: torch.fx.GraphModule, plan: SparsityPlan, config: Config, example: Batch,
                 model_class: str, dense_cost: NodeCost, dense_site_costs: dict[str, NodeCost],
                 timings: dict[str, float]):
        super().__init__()
        self.graph_module = gm
        self.plan = plan
        self.config = config
        self.example = example
        self.model_class = model_class
        self.dense_cost = dense_cost
        self.dense_site_costs = dense_site_costs
        self.timings = timings
        self._onnx: OnnxModel | None = None
        self._onnx_dir: tempfile.TemporaryDirectory | None = None
        self._decoder: Decoder | None = None
        self.source_name: str | None = None  # the model's name as the CLI takes it (zoo:minilm), when known

    def __setattr__(self, name, value):
        if name == "_source":  # the compiled model, held but not a submodule: its weights are the graph's
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, *args, **kwargs):
        inputs.check(self.graph_module, args, kwargs)  # a wrong call is an InputError naming the input
        try:
            if self.config.backend == "onnx":
                return self.onnx_model()(*args, **kwargs)
            # auto, eager, triton: the kernel backends of the same names
            with use_backend(self.config.backend):
                return self.graph_module(*args, **kwargs)
        except Exception as e:
            if inputs.empty(args, kwargs):
                raise InputError("the graph cannot run on an empty input (a dimension of size 0): "
                                 f"{type(e).__name__}: {str(e)[:200]}. Skip the call for an empty "
                                 "batch") from e
            raise

    @property
    def cost(self) -> NodeCost:
        """MACs and bytes of the compiled graph at the example shapes."""
        return total_cost(self.graph_module)

    def site_costs(self) -> dict[str, NodeCost]:
        """MACs and bytes per site of the compiled graph at the example shapes."""
        return site_costs(self.graph_module)

    def report(self):
        """A `Report` of this compile: passes, counts, refusals, per-site decisions, cost before/after."""
        return Report.of(self)

    def export_onnx(self, path: str | os.PathLike, *, dynamic: bool = True, opset: int = 18,
                    validate: bool = True) -> Path:
        """Write the compiled model as ONNX (dynamic batch and sequence axes); checked with onnx.checker and,
        with `validate`, against this model in onnxruntime at the example inputs (`ExportError` naming the
        output that differs; tolerance in `sparsegraph.onnx_export`)."""
        return export_onnx(self.graph_module, path, self.example.args, self.example.kwargs,
                           dynamic=dynamic, opset=opset, validate=validate)

    def save(self, directory: str | os.PathLike, *, source: str | None = None) -> Path:
        """Write this model to the folder `directory` (made if missing; our files in it are replaced) so that
        `load` runs it without the model it was compiled from: plan, config, the tensors the rewrites added
        (safetensors), the example inputs and the compiled graph as a torch.export program (format and
        checks: `sparsegraph.artifact`, docs/plan.md). `source` names the model as the CLI takes it
        (``zoo:minilm``), so that ``sparsegraph bench DIR`` can time the dense model beside it; a loaded
        model keeps the name it was saved with."""
        return artifact.save(self, directory, source if source is not None else self.source_name)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> CompiledModel:
        """The model `save` wrote to `directory`, without the original model and without calibration: its
        outputs are the saved model's bit for bit. A folder that is not a saved model, or whose files changed
        after saving, is an `ArtifactError` naming the file, the problem and the fix."""
        a = artifact.read(directory)
        cm = cls(a.gm, a.plan, a.config, a.example, a.model_class, a.dense_cost, a.dense_site_costs,
                 a.timings)
        cm.source_name = a.source
        return cm

    def decoder(self) -> Decoder:
        """The prefill and decode-step graphs over a static KV cache (`sparsegraph.generation`), traced
        from the compiled causal LM and rewritten by replaying this plan, on the first call (cached; safe
        to call from many threads)."""
        found = self._decoder
        if found is None:
            with _DECODER_LOCK:
                found = self._decoder
                if found is None:
                    source = getattr(self, "_source", None)
                    if self.plan.recovered():  # the cache graphs replay the plan: it has no trained weights
                        raise InputError("generate replays the plan on cache graphs traced from the model, "
                                         "without the weights sparsegraph.recover trained: generate with the "
                                         "model before recovery")
                    if source is None:
                        raise InputError("generate needs the model this was compiled from: compile it with "
                                         "sparsegraph.compile")
                    found = self._decoder = Decoder(source, self.config, self.plan, self.model_class)
        return found

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **options):
        """Generate tokens after `input_ids` (a causal LM only): ``[batch, prompt + new]`` ids, greedy by
        default. Options as `Decoder.generate` takes them (``max_new_tokens``, ``do_sample``,
        ``temperature``, ``top_k``, ``eos_token_id``, ``pad_token_id``, ``max_len``, ``generator``);
        ``decoder().last`` holds the call's timings."""
        return self.decoder().generate(input_ids, attention_mask, **options)

    def onnx_model(self, threads: int | None = None) -> OnnxModel:
        """This model exported to a temporary ONNX file (validated as `export_onnx` validates) and loaded in
        onnxruntime (cached; `threads` counts on the first call only). Safe to call from many threads at
        once: one of them exports, the others wait for its session (onnxruntime's ``run`` is thread-safe)."""
        session = self._onnx
        if session is None:
            with _ONNX_LOCK:
                session = self._onnx
                if session is None:
                    directory = tempfile.TemporaryDirectory(prefix="sparsegraph-")
                    try:
                        path = self.export_onnx(Path(directory.name) / "model.onnx")
                        session = OnnxModel(path, self.graph_module, threads=threads)
                    except BaseException:
                        directory.cleanup()
                        raise
                    self._onnx_dir, self._onnx = directory, session  # published whole, the session last
        return session
