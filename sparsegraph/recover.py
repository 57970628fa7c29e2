"""`recover`: short distillation of a compiled model toward the dense model it was compiled from.

One-shot rewrites lose accuracy: static neuron removal at 50% keeps a mean cosine of about 0.77 on unseen
MiniLM sentences, and N:M magnitude pruning hurts pretrained weights. A few hundred steps of training the
weights the rewrites kept, with what they decided held fixed, wins most of it back (the reason behind
Progressive Gradient Flow, Wanda + fine-tuning, and sparse fine-tuning in general).

What trains: only the tensors the rewrites added (``gm.meta[graph_edit.ADDED]``) that a node reads as a weight
or a bias (`TRAINABLE`): a pruned linear's sliced weight and bias, an N:M layer's kept values, a sparse
linear's input-major weight and folded bias, a sparse 1x1 conv's kept values (block-CSR) and bias, with the
batch norm the rewrite folded into them (what runs is what trains). A sparse 1x1 conv also holds its pruned
weight dense (the reference, the dense form and ONNX read it): a mirror of the values, given its own copy and
rewritten from them (``unpack``) after every step, so the forward of every backend, the ONNX export and a
saved model agree after recovery. Decisions stay as they were: kept neurons, N:M positions (offsets), kept
conv blocks, thresholds and centres, attention layouts. The user's parameters, which the compiled graph shares
where no rewrite replaced them, are never written (gradients are taken with ``torch.autograd.grad`` for the
trained tensors alone, so not even a ``.grad`` lands on them), and the input compiled model is left alone too:
training runs on `graph_edit.sharing_copy` of its graph with the trained tensors cloned, returned as a new
`CompiledModel`.

The loss, per calibration batch, over the floating-point outputs ``y_i`` of the compiled graph and
``t_i`` of the dense model (run under ``no_grad``, in eval mode, flags restored)::

    L = 1/n Σ_i mean((y_i − t_i)²) / var(t_i)

the output MSE normalised by the dense output's variance: 0 is exact, 1 is as far as predicting the
mean, and its value means the same across models and output scales. With ``layers = λ > 0`` a layer-wise
term is added, the same normalised MSE of every site's output to the dense model's at that site, averaged
over the sites both graphs have at the same shape, times λ::

    L = L_out + λ · 1/|S| Σ_s mean((h_s − ĥ_s)²) / var(ĥ_s)

The sites: every MLP (its node of role ``mlp.down``) and every 1x1 convolution (role ``conv.1x1``). A
``sparse_conv1x1`` that folded its batch norm and clamp (``fuse``) outputs what the dense graph's clamp
does, so the dense side is tapped there (`ir.ConvSite.out`); an unfused one, and a conv no rewrite
touched, at the conv itself. Why: a sentence embedding is a few hundred numbers per input and an
image's logits a thousand, a thin signal for millions of weights; the site outputs of every token, pixel
and layer are many more, and each site is told where its own error is (hidden-state distillation, as in
TinyBERT). The dense model's site outputs come from tracing it
(`sparsegraph.trace`, its weights shared, not copied), both graphs run through an fx interpreter that keeps
those nodes' values. Adam with a cosine-decayed learning
rate, one calibration batch per step in a seeded order (each epoch a new permutation), the backward
through the ops' autograd formulas (`sparsegraph.codegen.op`).

Progressive N:M (`nm_weights` with ``schedule: progressive``): such a layer trains its dense weight W (a
copy of the model's, found by the layer's module path) instead of its kept values, in a copy of the graph
where the ``nm_linear`` is ``linear(x, W ⊙ M, b)``; before the steps the schedule names, M tightens
(`nm_linear.stages`, `nm_linear.tighten`: 3:4 from the first step, then 2:4, nested, by magnitude). After
the last step the layer's values and offsets are W at the final mask (`nm_linear.pack_mask`), the returned
graph is the ``nm_linear`` one as compiled, and the plan's ``positions_sha256`` for the layer is the final
mask's. The losses before and after are those of the returned graph (one-shot before, the packed layers
after).

The plan of the returned model records the run under ``passes["recover"]`` (kind ``"recovery"``): the
options, the loss on all batches before and after, the per-step loss curve (at most `CURVE_POINTS` points,
averaged over equal spans), the names of the tensors trained, and per progressive layer its schedule
(``[first step, kept per group]`` per level). The trained weights are not in the plan:
`SparsityPlan.check_replay` refuses to replay such a plan (it would rebuild the one-shot model and claim
the recovered one); they travel with the saved model (``cm.save(dir)``, ``sparsegraph.load(dir)``). The
report draws the curve (`report_section`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import itertools
import math
import re
import time
from collections.abc import Iterator

import torch
from torch.utils import _pytree as pytree

from sparsegraph import graph_edit, ir, meta, svg
from sparsegraph.codegen import KERNEL_BACKENDS, nm_linear, use_backend
from sparsegraph.codegen.nm_linear import OP as NM_LINEAR
from sparsegraph.codegen.sparse_conv1x1 import OP as SPARSE_CONV1X1
from sparsegraph.codegen.sparse_conv1x1 import unpack
from sparsegraph.codegen.sparse_linear import OP as SPARSE_LINEAR
from sparsegraph.context import Batch
from sparsegraph.errors import CalibrationError, ConfigError, InputError
from sparsegraph.observe import check_calibration
from sparsegraph.plan import RECOVERY, SparsityPlan
from sparsegraph.sections import Section, Table
from sparsegraph.trace import trace

NAME = "recover"  # its entry in the plan's passes
TAPS = ("mlp.down", "conv.1x1")  # the roles whose node is a site's output in the layer-wise loss
CURVE_POINTS = 200
LOSS = ("output mse / var(dense output) + layers · mean over MLP and 1x1 conv sites of mse / var(dense site "
        "output)")
# op → positions of the arguments that are weights or biases (what training may change)
TRAINABLE = {torch.ops.aten.linear.default: (1, 2), SPARSE_LINEAR.overload: (1, 2),
             NM_LINEAR.overload: (1, 3), SPARSE_CONV1X1.overload: (2, 3)}


def recover(cm, data, *, steps: int = 200, lr: float = 1e-4, seed: int = 0, layers: float = 0.0,
            quiet: bool = True):
    """A new `CompiledModel`: `cm` with the weights its rewrites kept trained for `steps` Adam steps (peak
    learning rate `lr`, cosine decay) toward the outputs of the model `cm` was compiled from, on `data`
    (calibration batches as `sparsegraph.compile` takes them); `layers` weighs the layer-wise term (MLP and
    1x1 conv site outputs; 0: final outputs only). Module docstring: what trains, the loss, what the plan
    records. `cm` and the user's model are left as they were."""
    if not (isinstance(steps, int) and steps >= 1):
        raise ConfigError(f"recover: steps={steps!r} must be an integer ≥ 1")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"recover: lr={lr!r} must be a finite number > 0 (try 1e-4)")
    if not (isinstance(layers, (int, float)) and math.isfinite(layers) and layers >= 0):
        raise ConfigError(f"recover: layers={layers!r} must be a finite number ≥ 0 (0: final outputs only)")
    source = getattr(cm, "_source", None)
    if source is None:
        raise InputError("recover distils toward the model cm was compiled from, and this one has none (a "
                         "model loaded with sparsegraph.load): compile it again from the model "
                         "(sparsegraph.compile) and recover that")
    batches = _batches(data)
    check_calibration(cm.graph_module, batches)
    start = time.perf_counter()
    gm = graph_edit.sharing_copy(cm.graph_module)
    gm.meta[graph_edit.ADDED] = list(cm.graph_module.meta.get(graph_edit.ADDED, ()))
    names = trainable(gm)
    if not names:
        raise ConfigError("recover found no weights to train: the compile rewrote no linear layer or 1x1 "
                          "convolution (neuron pruning, N:M weights, activation sparsity or conv sparsity "
                          "add them); compile with one of those")
    progressive = _progressive(gm, cm.plan, source)
    names = [name for name in names if name not in {layer.values for layer in progressive}]
    params = [_own_copy(gm, name) for name in names]
    sync = _mirrors(gm, set(names))
    targets = _targets(source, batches, cm.example if layers else None, _fused_convs(cm.plan))
    loss = functools.partial(_loss, gm, layers=layers)
    backend = cm.config.backend if cm.config.backend in KERNEL_BACKENDS else "auto"
    with use_backend(backend):
        before = _mean_loss(loss, batches, targets)
        train_gm, tighten = _progressive_graph(gm, progressive, steps)
        curve = _train(functools.partial(_loss, train_gm, layers=layers),
                       params + [layer.weight for layer in progressive], batches, targets, steps, lr, seed,
                       quiet, sync, tighten)
        _pack_progressive(gm, progressive)
        after = _mean_loss(loss, batches, targets)
    for p in params:
        p.requires_grad_(False)
    run = {"options": {"steps": steps, "lr": lr, "seed": seed, "layers": layers, "batches": len(batches),
                       "loss": LOSS},
           "loss_before": before, "loss_after": after, "curve": _thin(curve), "trained": names,
           "parameters": sum(p.numel() for p in params) + sum(int(layer.mask.sum()) for layer in progressive)}
    if progressive:
        run["progressive"] = {layer.path: [list(stage) for stage in layer.stages] for layer in progressive}
    plan = _recorded(cm.plan, run, progressive)
    timings = {**cm.timings, NAME: cm.timings.get(NAME, 0.0) + time.perf_counter() - start}
    out = type(cm)(gm, plan, cm.config, cm.example, cm.model_class, cm.dense_cost, cm.dense_site_costs,
                   timings)
    out._source = source
    out.source_name = cm.source_name
    return out


def trainable(gm: torch.fx.GraphModule) -> list[str]:
    """Names of the tensors a rewrite added that a node reads as a weight or a bias (`TRAINABLE`), floating
    point, in the order they were added."""
    added = set(gm.meta.get(graph_edit.ADDED, ()))
    read = set()
    for node in gm.graph.nodes:
        for i in TRAINABLE.get(node.target, ()):
            arg = node.args[i] if i < len(node.args) else None
            if isinstance(arg, torch.fx.Node) and arg.op == "get_attr" and arg.target in added:
                read.add(arg.target)
    return [name for name in dict.fromkeys(gm.meta.get(graph_edit.ADDED, ()))
            if name in read and _attr(gm, name).is_floating_point()]


def report_section(entry: dict) -> Section:
    """The report's view of a ``recover`` plan entry: a table per run and the loss curves."""
    runs = entry["summary"]["runs"]
    table = Table("Recovery (distillation toward the dense model)",
                  ["run", "batches", "steps", "lr", "seed", "layer weight", "loss before", "loss after",
                   "tensors trained", "parameters"])
    series = {}
    for i, run in enumerate(runs, 1):
        o = run["options"]
        table.rows.append([i, o["batches"], o["steps"], f"{o['lr']:g}", o["seed"], f"{o['layers']:g}",
                           f"{run['loss_before']:.4g}", f"{run['loss_after']:.4g}", len(run["trained"]),
                           run["parameters"]])
        series[f"run {i}"] = run["curve"]
    figure = svg.line("Distillation loss (output mse / var) per step", series, x_label="step",
                      y_label="loss")
    return Section(tables=[table], figures=[("Recovery loss", figure)])


# -- training ------------------------------------------------------------------------------------------------


def _train(loss_of, params, batches, targets, steps, lr, seed, quiet, sync, before_step) -> list[float]:
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    order = _order(len(batches), steps, seed)
    curve = []
    for step, index in enumerate(order):
        before_step(step)
        loss = loss_of(batches[index], targets[index])
        if not math.isfinite(loss.item()):
            raise CalibrationError(f"recover: the loss is {loss.item()} at step {step} (batch {index}): "
                                   f"lower lr (now {lr:g}), or check the batch for non-finite values")
        grads = torch.autograd.grad(loss, params)  # only ours: no .grad lands on the user's parameters
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
        sync()
        schedule.step()
        curve.append(loss.item())
        if not quiet and (step % max(1, steps // 10) == 0 or step == steps - 1):
            print(f"recover: step {step + 1}/{steps} loss {loss.item():.5f}")
    return curve


def _order(n: int, steps: int, seed: int) -> list[int]:
    """Batch indices for `steps` steps: a new seeded permutation of the `n` batches every epoch."""
    generator = torch.Generator().manual_seed(seed)
    out: list[int] = []
    while len(out) < steps:
        out += torch.randperm(n, generator=generator).tolist()
    return out[:steps]


def _loss(gm, batch: Batch, target: tuple[list[torch.Tensor], dict[str, torch.Tensor]], *,
          layers: float) -> torch.Tensor:
    """The loss of the module docstring on one batch; `target` is the dense model's outputs and site
    outputs (the latter only with `layers`)."""
    outputs, sites = target
    ours, taps = _run(gm, batch, taps=bool(layers))
    if len(ours) != len(outputs):
        raise InputError(f"recover: the compiled graph gives {len(ours)} floating-point outputs, the dense "
                         f"model {len(outputs)}: they cannot be compared; recover a model whose compiled "
                         "graph returns what the model returns")
    loss = torch.stack([_normalised_mse(y, t) for y, t in zip(ours, outputs)]).mean()
    shared = [(taps[s], t) for s, t in sites.items() if s in taps and taps[s].shape == t.shape]
    if shared:
        loss = loss + layers * torch.stack([_normalised_mse(h, t) for h, t in shared]).mean()
    return loss


def _normalised_mse(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (y.float() - t.float()).square().mean() / t.float().var(unbiased=False).clamp_min(1e-12)


def _mean_loss(loss_of, batches, targets) -> float:
    with torch.no_grad():
        return sum(loss_of(b, t).item() for b, t in zip(batches, targets)) / len(batches)


def _targets(source: torch.nn.Module, batches: list[Batch], example: Batch | None, fused: set[str]):
    """Per batch, the dense model's floating-point outputs and (with an `example` to trace it at) its
    sites' outputs by site, each 1x1 conv site in `fused` tapped after its norm and clamp."""
    with torch.no_grad(), _eval(source):
        outputs = [_floats(source(*b.args, **b.kwargs)) for b in batches]
    if example is None:
        return [(o, {}) for o in outputs]
    dense = trace(source, example.args, example.kwargs)
    ends = {site.out: site.id for site in ir.conv_sites(dense) if site.id in fused}
    with torch.no_grad():
        sites = [_run(dense, b, taps=True, ends=ends)[1] for b in batches]
    if not sites[0]:
        raise ConfigError("recover: layers > 0 distils site outputs, and the model has no MLP or 1x1 conv "
                          "site: recover with layers=0")
    return list(zip(outputs, sites))


def _fused_convs(plan: SparsityPlan) -> set[str]:
    """The 1x1 conv sites whose ``sparse_conv1x1`` folded the norm and clamp that follow (``fuse``)."""
    if "decided" not in plan.passes.get("conv_sparsity", {}):
        return set()
    decisions, _ = plan.decisions("conv_sparsity")
    return {site for site, d in decisions.items() if d.decision.get("fuse")}


class _Tapped(torch.fx.Interpreter):
    """Runs a graph and keeps, per site, the value of its last node of a role in `TAPS` (the site's output,
    whatever op a rewrite put there), or of the node `ends` names for it instead (a fused conv's clamp)."""

    def __init__(self, gm: torch.fx.GraphModule, ends: dict[torch.fx.Node, str]):
        super().__init__(gm)
        self.ends, self.moved = ends, set(ends.values())
        self.taps: dict[str, torch.Tensor] = {}

    def run_node(self, n):
        value = super().run_node(n)
        info = meta.get(n)
        site = self.ends.get(n)
        if site is None and info is not None and info.role in TAPS and info.site not in self.moved:
            site = info.site
        if site is not None and isinstance(value, torch.Tensor):
            self.taps[site] = value
        return value


def _run(gm, batch: Batch, *, taps: bool,
         ends: dict | None = None) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """`gm`'s floating-point outputs on `batch`, and with `taps` its sites' outputs (`_Tapped`)."""
    if not taps:
        return _floats(gm(*batch.args, **batch.kwargs)), {}
    interpreter = _Tapped(gm, ends or {})
    out = interpreter.run(*ir.flatten_inputs(gm, batch.args, batch.kwargs))
    return _floats(out), interpreter.taps


@contextlib.contextmanager
def _eval(model: torch.nn.Module) -> Iterator[None]:
    """`model` in eval mode inside the block, every module's flag restored after (as tracing does)."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def _floats(out) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _batches(data) -> list[Batch]:
    if data is None or isinstance(data, (torch.Tensor, dict)):
        raise CalibrationError("recover trains on a list of batches (as sparsegraph.compile's calibration): "
                               "pass data=[batch, ...]")
    batches = [Batch.of(item) for item in data]
    if not batches:
        raise CalibrationError("recover got no batches: pass data=[batch, ...] (the calibration batches)")
    return batches


# -- the graph's tensors -------------------------------------------------------------------------------------


def _attr(gm: torch.nn.Module, name: str) -> torch.Tensor:
    owner, _, leaf = name.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, leaf)


def _own_copy(gm: torch.fx.GraphModule, name: str, train: bool = True) -> torch.Tensor:
    """Give `gm` its own copy of tensor `name` (the input model keeps the original), ready to train (with
    `train`) or to be written."""
    owner, _, leaf = name.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    old = getattr(module, leaf)
    new = old.detach().clone()
    if isinstance(old, torch.nn.Parameter):
        setattr(module, leaf, torch.nn.Parameter(new))
    else:
        module.register_buffer(leaf, new)
    return getattr(module, leaf).requires_grad_(train)


def _mirrors(gm: torch.fx.GraphModule, trained: set[str]):
    """A function that rewrites every dense mirror of trained packed weights from them: the pruned weight
    [O, C, 1, 1] of each ``sparse_conv1x1`` whose values train, given its own copy here (the input model
    keeps its tensor)."""
    pairs = []
    for node in gm.graph.nodes:
        if node.target is not SPARSE_CONV1X1.overload:
            continue
        weight, _, values, indices, indptr = node.args[1:6]
        if values.target not in trained:
            continue
        mirror = _own_copy(gm, weight.target, train=False)
        pairs.append((mirror, _attr(gm, values.target), _attr(gm, indices.target), _attr(gm, indptr.target)))

    @torch.no_grad()
    def sync():
        for mirror, values, indices, indptr in pairs:
            mirror.copy_(unpack(values, indices, indptr, mirror.shape[0], mirror.shape[1])[:, :, None, None])

    return sync


@dataclasses.dataclass
class _Progressive:
    """An ``nm_linear`` whose plan decision is ``schedule: progressive`` (`nm_weights`), while it trains: its
    dense weight (a copy of the model's), its current mask and schedule, the graph attributes of its packed
    values and offsets."""

    node: str
    site: str
    path: str
    n: int
    m: int
    ramp: float
    values: str
    offsets_name: str
    weight: torch.Tensor
    mask: torch.Tensor
    stages: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    offsets: torch.Tensor | None = None
    scale: list[float] | None = None  # rms per input feature (activation-aware score), or None: magnitude


def _progressive(gm: torch.fx.GraphModule, plan: SparsityPlan, source: torch.nn.Module) -> list[_Progressive]:
    """The ``nm_linear`` layers whose ``nm_weights`` decision is progressive, each with a trainable copy of
    its dense weight from `source` (the model, found by the layer's module path) under a dense mask."""
    out = []
    for node in gm.graph.nodes:
        info = meta.get(node)
        if node.target is not NM_LINEAR.overload or info is None:
            continue
        decided = plan.sites.get(info.site, {}).get("nm_weights", {}).get("decision", {})
        path = ir.module_path(node)  # the linear's (its provenance); else from the name nm_weights gave
        if path not in decided:  # its values (graph_edit.add_tensor: "sg_" + path with "_" for "." …)
            path = next((p for p in decided if node.args[1].target.startswith(
                "sg_" + re.sub(r"\W", "_", p) + "_nm_values")), path)
        d = decided.get(path, {})
        if d.get("schedule") != "progressive":
            continue
        try:
            dense = source.get_submodule(path).weight
        except AttributeError as e:
            raise InputError(f"recover: the progressive N:M layer {path!r} has no weight at that path in "
                             "the model it was compiled from; compile it with schedule: one-shot") from e
        weight = dense.detach().float().clone().requires_grad_(True)
        out.append(_Progressive(node.name, info.site, path, d["n"], d["m"], d["ramp"], node.args[1].target,
                                node.args[2].target, weight, torch.ones_like(weight, dtype=torch.bool),
                                scale=d.get("input_rms")))
    return out


def _progressive_graph(gm: torch.fx.GraphModule, layers: list[_Progressive], steps: int):
    """``(graph to train, hook run before each step)``: with no progressive layer, `gm` itself and a hook
    that does nothing; else a copy of `gm` sharing its tensors in which each such ``nm_linear`` is
    ``linear(x, W ⊙ M, b)``, and a hook that tightens M at the schedule's steps (`nm_linear.stages`,
    `nm_linear.tighten`)."""
    if not layers:
        return gm, lambda step: None
    train = graph_edit.sharing_copy(gm)
    nodes = {node.name: node for node in train.graph.nodes}
    for i, layer in enumerate(layers):
        node = nodes[layer.node]
        layer.stages = nm_linear.stages(layer.n, layer.m, layer.ramp, steps)
        train.register_parameter(f"_progressive_{i}_weight", torch.nn.Parameter(layer.weight))
        layer.weight = train.get_parameter(f"_progressive_{i}_weight")
        train.register_buffer(f"_progressive_{i}_mask", layer.mask)
        graph = train.graph
        with graph.inserting_before(node):
            w = graph.get_attr(f"_progressive_{i}_weight")
            mask = graph.get_attr(f"_progressive_{i}_mask")
            masked = graph.call_function(torch.ops.aten.mul.Tensor, (w, mask))
            new = graph.call_function(torch.ops.aten.linear.default, (node.args[0], masked, node.args[3]))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    train.recompile()

    @torch.no_grad()
    def hook(step: int) -> None:
        for layer in layers:
            for start, kept in layer.stages:
                if start == step and kept < layer.m:
                    layer.mask.copy_(nm_linear.tighten(layer.weight, layer.mask, kept, layer.m, layer.scale))

    return train, hook


def _pack_progressive(gm: torch.fx.GraphModule, layers: list[_Progressive]) -> None:
    """Write each progressive layer's trained weight at its final mask into its own copies of the values
    and offsets of `gm`'s ``nm_linear``."""
    for layer in layers:
        values, offsets = nm_linear.pack_mask(layer.weight, layer.mask, layer.n, layer.m)
        for name, tensor in ((layer.values, values), (layer.offsets_name, offsets)):
            _own_copy(gm, name, train=False).copy_(tensor)
        layer.offsets = offsets
        layer.weight.requires_grad_(False)


def _thin(curve: list[float]) -> list[float]:
    """At most `CURVE_POINTS` points: the means of equal spans of steps."""
    if len(curve) <= CURVE_POINTS:
        return list(curve)
    edges = [round(i * len(curve) / CURVE_POINTS) for i in range(CURVE_POINTS + 1)]
    return [sum(curve[a:b]) / (b - a) for a, b in itertools.pairwise(edges)]


def _recorded(plan: SparsityPlan, run: dict, progressive: list[_Progressive]) -> SparsityPlan:
    """A copy of `plan` with `run` appended to its ``recover`` entry (made if missing), and the kept
    positions of `progressive` layers (their final masks) as their ``nm_weights`` evidence."""
    out = SparsityPlan.from_json(copy.deepcopy(plan.to_json()))
    for layer in progressive:
        evidence = out.sites[layer.site]["nm_weights"]["evidence"][layer.path]
        evidence["positions_sha256"] = nm_linear.positions_digest(layer.offsets)
        evidence["kept_magnitude"] = float((layer.weight * layer.mask).abs().sum()
                                           / layer.weight.abs().sum().clamp(min=1e-30))
    runs = out.passes.get(NAME, {}).get("summary", {}).get("runs", [])
    out.passes[NAME] = {"kind": RECOVERY, "options": run["options"]}
    out.set_summary(NAME, {"runs": [*runs, run]})
    out.check()
    return out
