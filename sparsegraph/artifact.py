"""A compiled model saved as a folder (`CompiledModel.save`), and loaded back without the model it was
compiled from and without calibration data (`CompiledModel.load`, ``sparsegraph.load``).

The folder (format version 1)::

    manifest.json        what this is; versions, fingerprints, the call signature; sha256 of every file
    plan.json            the plan (docs/plan.md): every decision, per site, with its evidence
    config.json          the config the compile ran (equal to the plan's own)
    weights.safetensors  the tensors the rewrite passes added: pruned weights (stored pruned), N:M values and
                         offsets, transposed sparse weights, thresholds, attention layouts
    example.safetensors  the example inputs' tensors (other example values are in the manifest)
    program.pt2          the compiled graph as a torch.export program with every tensor it uses; absent
                         when the graph could not be exported, and the manifest says why

``manifest.json``::

    {"format": "sparsegraph-artifact", "format_version": 1,
     "versions": {"sparsegraph": "0.1.0", "torch": "2.14.1"},
     "model": {"class": "SentenceEncoder", "fingerprint": "<the plan's>"},
     "source": "zoo:minilm" | null,            # the model's name as the CLI takes it, when known
     "program": {"file": "program.pt2", "graph_fingerprint": "…"} | {"file": null, "why": "…"},
     "inputs": [{"name": "input_ids", "dtype": "int64", "sizes": [null, null]}, …] | null,
     "example": {"args": [{"tensor": "args.0"}, {"value": 3}], "kwargs": {"mask": {"tensor": "kwargs.mask"}}},
     "costs": {"dense": {"macs": …, "bytes": …}, "dense_sites": {"<site>": {"macs": …, "bytes": …}}},
     "timings": {"<pass>": seconds},
     "files": {"plan.json": "<sha256>", …}}

Why it is made this way:

- **The program** is what lets a folder run without the model's Python class: ``torch.export.save`` of the
  compiled graph (torch ≥ 2.7 writes the graph as JSON and tensors as raw bytes). It is exported from a
  copy of the graph holding only the tensors it uses: a rewrite leaves the weights it replaced on the graph
  (shared with the user's model, free in memory), which would otherwise be saved at full size beside their
  pruned copies. Each node's site facts (`meta.NodeInfo`) travel in ``node.meta["custom"]``, which
  torch.export carries through the capture and serialises, so the loaded graph's costs and report are the
  compiled one's. Before it is written, the program runs the example inputs and must give the compiled
  graph's outputs bit for bit; if the capture fails or it does not, the folder holds no program and the
  manifest says why (the rest is still written: ``compile(model, plan=dir/plan.json)`` rebuilds it).
- **No pickles.** Our files are JSON and safetensors. torch would pickle a program's example inputs: they
  are left out of the archive (example.safetensors holds them, and load gives them back to the program,
  whose input guards are built from them). ``torch.export.load`` would unpickle any payload an archive
  marks so; save never writes one, and load refuses an archive holding one before torch reads it.
- **weights.safetensors** holds what the compile produced, readable by any safetensors tool (pruned
  weights at their pruned shapes); the program holds the same tensors, and load refuses the folder when
  the two disagree (files from two different saves).
- **Checks at load**, each refusal an `ArtifactError` naming the file, the problem and the fix: the folder
  has a manifest of this format; every file's sha256 is the manifest's; the plan passes its own checks
  (`load_plan`) and its fingerprint is the one saved with the program; the config is the plan's; the
  program has no pickled payload, loads in this torch, has the tensors and site facts saved (its graph
  fingerprint) and names only sites the plan knows. This is integrity against damage and mix-ups, not
  authenticity: whoever can write the folder can write a consistent manifest, and torch evaluates a
  program's guard expressions, so load only folders you trust (as any ``.pt2``).

A loaded model has its tensors where ``torch.export.load`` puts them (``.to(device)`` moves it), has no
source model (it cannot ``generate``: the decode graphs are traced from the model), and saves again as it
was loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from torch.utils import _pytree as pytree

from sparsegraph import inputs, ir, meta
from sparsegraph.codegen import KERNEL_BACKENDS, ops, use_backend
from sparsegraph.config import Config
from sparsegraph.context import Batch
from sparsegraph.cost_model import NodeCost
from sparsegraph.errors import ArtifactError, ConfigError, PlanError
from sparsegraph.graph_edit import ADDED, sharing_copy
from sparsegraph.onnx_export import capture
from sparsegraph.plan import SparsityPlan, fingerprint, load_plan
from sparsegraph.version import __version__

FORMAT, FORMAT_VERSION = "sparsegraph-artifact", 1
MANIFEST, PLAN, CONFIG = "manifest.json", "plan.json", "config.json"
WEIGHTS, EXAMPLE, PROGRAM = "weights.safetensors", "example.safetensors", "program.pt2"
FILES = (MANIFEST, PLAN, CONFIG, WEIGHTS, EXAMPLE, PROGRAM)
_RESAVE = "save the compiled model again (cm.save(dir), or `sparsegraph compile MODEL ... --out DIR`)"


@dataclass(frozen=True)
class Artifact:
    """What `read` gives back: the parts of a `CompiledModel`."""

    gm: torch.fx.GraphModule
    plan: SparsityPlan
    config: Config
    example: Batch
    model_class: str
    dense_cost: NodeCost
    dense_site_costs: dict[str, NodeCost]
    timings: dict[str, float]
    source: str | None


def save(cm, directory: str | os.PathLike, source: str | None = None) -> Path:
    """Write compiled model `cm` to `directory` (module docstring); return the folder. Our files in it are
    replaced; the manifest is removed first and written last, so an interrupted save leaves no artifact."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ArtifactError(f"cannot save to {directory}: it is a file; give a folder (made if missing)")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).unlink(missing_ok=True)
    graph = _program_graph(cm.graph_module)
    tensors = _tensors(graph)
    added = {name: tensors[name] for name in dict.fromkeys(cm.graph_module.meta.get(ADDED, ()))
             if name in tensors}
    example_tensors, example = _example_to_json(cm.example)
    cm.plan.save(directory / PLAN)
    _write_json(directory / CONFIG, cm.config.to_dict())
    safetensors.torch.save_file(_own_storage(added), directory / WEIGHTS)
    safetensors.torch.save_file(_own_storage(example_tensors), directory / EXAMPLE)
    program, why = _export(graph, cm)
    files = [PLAN, CONFIG, WEIGHTS, EXAMPLE]
    if program is None:
        (directory / PROGRAM).unlink(missing_ok=True)
        entry = {"file": None, "why": why}
    else:
        torch.export.save(program[0], directory / PROGRAM)
        files.append(PROGRAM)
        entry = {"file": PROGRAM, "graph_fingerprint": _graph_fingerprint(program[1])}
    specs = cm.graph_module.meta.get(inputs.KEY)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "versions": {"sparsegraph": __version__, "torch": torch.__version__.split("+")[0]},
        "model": {"class": cm.model_class, "fingerprint": cm.plan.model["fingerprint"]},
        "source": source,
        "program": entry,
        "inputs": None if specs is None else [
            {"name": s.name, "dtype": None if s.dtype is None else str(s.dtype).removeprefix("torch."),
             "sizes": list(s.sizes)} for s in specs],
        "example": example,
        "costs": {"dense": dataclasses.asdict(cm.dense_cost),
                  "dense_sites": {k: dataclasses.asdict(v) for k, v in cm.dense_site_costs.items()}},
        "timings": dict(cm.timings),
        "files": {name: _sha256(directory / name) for name in files},
    }
    _write_json(directory / MANIFEST, manifest)
    return directory


def read(directory: str | os.PathLike) -> Artifact:
    """The compiled model saved in `directory`, every check of the module docstring passed."""
    directory = Path(directory)
    manifest = _read_manifest(directory)
    files = _checked_files(directory, manifest)
    try:
        plan = load_plan(files[PLAN])
    except PlanError as e:
        raise ArtifactError(f"{files[PLAN]}: {e}") from e
    try:
        config = Config.from_dict(_read_json(files[CONFIG]))
    except ConfigError as e:
        raise ArtifactError(f"{files[CONFIG]}: {e}") from e
    if config.to_dict() != Config.from_dict(plan.config).to_dict():
        raise ArtifactError(f"{files[CONFIG]} is not the config of {files[PLAN]}; the two come from "
                            f"different saves: {_RESAVE}")
    if plan.model["fingerprint"] != manifest["model"]["fingerprint"]:
        raise ArtifactError(
            f"{files[PLAN]} was made for another model (fingerprint {plan.model['fingerprint'][:12]}) than "
            f"the program saved beside it ({str(manifest['model']['fingerprint'])[:12]}): {_RESAVE}, or "
            "recompile the model with its own plan")
    program = manifest["program"]
    if program.get("file") != PROGRAM:
        raise ArtifactError(
            f"{directory} holds no program to run: {program.get('why', 'none was saved')}. Compile again "
            f"from the model with this plan: sparsegraph.compile(model, plan='{files[PLAN]}', "
            f"example_inputs=...) or `sparsegraph compile MODEL --plan {files[PLAN]} --out DIR`")
    example = _example_from_json(manifest["example"], safetensors.torch.load_file(files[EXAMPLE]),
                                 files[EXAMPLE])
    gm = _load_program(files[PROGRAM], example, manifest)
    weights = safetensors.torch.load_file(files[WEIGHTS])
    _check_weights(gm, weights, files)
    gm.meta[ADDED] = list(weights)
    if manifest["inputs"] is not None:
        gm.meta[inputs.KEY] = _input_specs(manifest["inputs"], directory / MANIFEST)
    ir.propagate_shapes(gm, example.args, example.kwargs)
    if _graph_fingerprint(gm) != program.get("graph_fingerprint"):
        raise ArtifactError(f"{files[PROGRAM]} does not hold the tensors and site facts saved with it (graph "
                            f"fingerprint differs from the manifest's): {_RESAVE}")
    unknown = sorted({info.site for n in gm.graph.nodes if (info := meta.get(n)) is not None}
                     - {s["id"] for s in plan.model["sites"]})
    if unknown:
        raise ArtifactError(f"{files[PROGRAM]} has sites {unknown[:3]} that {files[PLAN]} does not know: the "
                            f"two come from different models: {_RESAVE}")
    try:
        costs = manifest["costs"]
        dense_cost = NodeCost(**costs["dense"])
        dense_sites = {site: NodeCost(**c) for site, c in costs["dense_sites"].items()}
    except (KeyError, TypeError, AttributeError) as e:
        raise ArtifactError(f"{directory / MANIFEST}: 'costs' is malformed ({e}): {_RESAVE}") from e
    return Artifact(gm, plan, config, example, manifest["model"]["class"], dense_cost,
                    dense_sites, dict(manifest["timings"]), manifest["source"])


def made_from(dense: torch.fx.GraphModule, gm: torch.fx.GraphModule, plan: SparsityPlan) -> bool:
    """Whether `dense` (a model as traced) is the model compiled into `gm` with `plan`: the plan's
    fingerprint, and every tensor of `gm` that no rewrite added equal to `dense`'s of the same name."""
    if fingerprint(dense) != plan.model["fingerprint"]:
        return False
    theirs, added = _tensors(dense), set(gm.meta.get(ADDED, ()))
    return all(name in theirs and _identical(theirs[name].detach(), t.detach())
               for name, t in _tensors(gm).items() if name not in added)


# -- saving ------------------------------------------------------------------------------------------------


def _program_graph(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of `gm` holding only the tensors its graph uses, each node's site facts also under
    ``meta["custom"]``, which torch.export carries and serialises."""
    graph = sharing_copy(gm)
    for node in graph.graph.nodes:
        info = meta.get(node)
        if info is not None:  # the copy's meta dicts are its own: the compiled graph is left alone
            node.meta["custom"] = {**node.meta.get("custom", {}), meta.KEY: dataclasses.asdict(info)}
    return graph


def _export(graph: torch.fx.GraphModule, cm) -> tuple[tuple | None, str | None]:
    """``((program, its module), None)``, or ``(None, why)`` when the graph cannot be saved as a program
    that reproduces it."""
    try:
        program = capture(graph, cm.example.args, cm.example.kwargs)
    except Exception as e:  # any capture failure: the reason goes into the manifest, the rest is saved
        return None, f"torch.export cannot capture the compiled graph: {type(e).__name__}: {_first_line(e)}"
    module = _unlift(program, cm.example)
    backend = cm.config.backend if cm.config.backend in KERNEL_BACKENDS else "auto"
    with torch.no_grad(), use_backend(backend):
        ours, theirs = (pytree.tree_leaves(m(*_clone(cm.example.args), **_clone(cm.example.kwargs)))
                        for m in (cm.graph_module, module))
    if len(ours) != len(theirs) or not all(_identical(a, b) for a, b in zip(ours, theirs)):
        return None, ("the exported program's outputs at the example inputs are not the compiled graph's "
                      "bit for bit")
    return (program, module), None


def _example_to_json(example: Batch) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}

    def entry(key: str, value) -> dict:
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach()
            return {"tensor": key}
        if value is None or isinstance(value, (bool, int, float, str)):
            return {"value": value}
        raise ArtifactError(f"cannot save example input {key} ({type(value).__name__}): a saved model keeps "
                            "tensors and JSON values (None, bool, int, float, str). Compile with example "
                            "inputs of those kinds")

    return tensors, {"args": [entry(f"args.{i}", v) for i, v in enumerate(example.args)],
                     "kwargs": {k: entry(f"kwargs.{k}", v) for k, v in example.kwargs.items()}}


def _own_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` on the CPU, contiguous, none sharing memory with another (safetensors refuses both)."""
    out, seen = {}, set()
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- loading -----------------------------------------------------------------------------------------------


def _read_manifest(directory: Path) -> dict:
    if not directory.is_dir():
        raise ArtifactError(f"{directory} is not a folder: give the folder a compiled model was saved to")
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} is not a saved sparsegraph model: it has no {MANIFEST}. Save one "
                            "with cm.save(dir) or `sparsegraph compile MODEL --config ... --out DIR`")
    manifest = _read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a sparsegraph manifest (its 'format' is not {FORMAT!r}): give "
                            "the folder a compiled model was saved to")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path} has format version {manifest.get('format_version')!r}; this sparsegraph "
                            f"reads version {FORMAT_VERSION}: {_RESAVE} with this version")
    layout = {"versions": dict, "model": dict, "source": (str, type(None)), "program": dict,
              "inputs": (list, type(None)), "example": dict, "costs": dict, "timings": dict, "files": dict}
    for key, kind in layout.items():
        if not isinstance(manifest.get(key), kind):
            raise ArtifactError(f"{path}: key {key!r} is missing or of the wrong type: {_RESAVE}")
    if not all(isinstance(manifest["model"].get(k), str) for k in ("class", "fingerprint")):
        raise ArtifactError(f"{path}: 'model' needs 'class' and 'fingerprint' strings: {_RESAVE}")
    return manifest


def _checked_files(directory: Path, manifest: dict) -> dict[str, Path]:
    """The folder's files by name, each present and with the sha256 the manifest recorded."""
    listed = manifest["files"]
    needed = [PLAN, CONFIG, WEIGHTS, EXAMPLE] + ([PROGRAM] if manifest["program"].get("file") else [])
    for name in needed:
        if name not in listed:
            raise ArtifactError(f"{directory / MANIFEST} lists no {name}: {_RESAVE}")
    files = {}
    for name in needed:
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"{path} is missing (the manifest lists it): copy the whole folder, or "
                                f"{_RESAVE}")
        if _sha256(path) != listed[name]:
            raise ArtifactError(f"{path} was changed after saving (its sha256 is not the one in "
                                f"{MANIFEST}): restore the file as it was saved, or {_RESAVE}")
        files[name] = path
    return files


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}): {_RESAVE}") from e


def _example_from_json(example: dict, tensors: dict[str, torch.Tensor], path: Path) -> Batch:
    def value(entry):
        if isinstance(entry, dict) and entry.keys() == {"tensor"} and entry["tensor"] in tensors:
            return tensors[entry["tensor"]]
        if isinstance(entry, dict) and entry.keys() == {"value"}:
            return entry["value"]
        raise ArtifactError(f"the manifest's example entry {entry!r} names no tensor of {path} and no "
                            f"value: {_RESAVE}")

    if not (isinstance(example.get("args"), list) and isinstance(example.get("kwargs"), dict)):
        raise ArtifactError(f"the manifest's 'example' needs 'args' (a list) and 'kwargs' (a mapping): "
                            f"{_RESAVE}")
    return Batch(tuple(map(value, example["args"])), {k: value(e) for k, e in example["kwargs"].items()})


def _load_program(path: Path, example: Batch, manifest: dict) -> torch.fx.GraphModule:
    _refuse_pickles(path)
    ops()  # every sparsegraph:: op registered, so that torch can read the program's calls of them
    saved_with = manifest["versions"].get("torch")
    try:
        program = torch.export.load(path)
        return _unlift(program, example)
    except ArtifactError:
        raise
    except Exception as e:  # a format torch no longer reads, an op this sparsegraph lacks
        raise ArtifactError(
            f"{path} could not be loaded by torch {torch.__version__.split('+')[0]} (saved with torch "
            f"{saved_with}, sparsegraph {manifest['versions'].get('sparsegraph')}): {type(e).__name__}: "
            f"{_first_line(e)}. Load it with the versions that saved it, or compile again from the model "
            f"with plan='{path.parent / PLAN}'") from e


def _refuse_pickles(path: Path) -> None:
    """Refuse an archive that marks a payload as pickled, which ``torch.export.load`` would unpickle: a
    tensor subclass or script object (weights, constants), the example inputs, a legacy weights file."""
    pickled = []
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                name = info.filename
                payloads = "/data/weights/" in name or "/data/constants/" in name
                if (("/data/sample_inputs/" in name and info.file_size)
                        or ("/data/weights/" in name and name.endswith(".pt"))):
                    pickled.append(name)
                elif payloads and name.endswith("_config.json"):
                    config = json.loads(archive.read(name))["config"]
                    pickled += [f"{name}:{key}" for key, entry in config.items() if entry.get("use_pickle")]
    except (zipfile.BadZipFile, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ArtifactError(f"{path} is not a torch.export archive ({type(e).__name__}: {e}): "
                            f"{_RESAVE}") from e
    if pickled:
        raise ArtifactError(f"{path} holds pickled payloads ({', '.join(pickled[:3])}), which loading would "
                            "run as code; sparsegraph never writes them, so the file is not as it was saved: "
                            f"{_RESAVE}")


def _unlift(program: torch.export.ExportedProgram, example: Batch) -> torch.fx.GraphModule:
    """`program` as a GraphModule with its input guards and our site facts. The guards are built from the
    program's example inputs, which are set for the call only (torch would pickle them on save)."""
    program.example_inputs = (tuple(example.args), dict(example.kwargs))
    try:
        gm = program.module()
    finally:
        program.example_inputs = None
    for node in gm.graph.nodes:
        custom = node.meta.get("custom")
        if not isinstance(custom, dict) or meta.KEY not in custom:
            continue
        try:
            meta.set_info(node, meta.NodeInfo(**custom[meta.KEY]))
        except (TypeError, ValueError) as e:
            raise ArtifactError(f"the program's node {node.name} holds malformed site facts ({e}): "
                                f"{_RESAVE}") from e
        rest = {k: v for k, v in custom.items() if k != meta.KEY}
        if rest:
            node.meta["custom"] = rest
        else:
            del node.meta["custom"]
    return gm


def _check_weights(gm: torch.fx.GraphModule, weights: dict[str, torch.Tensor],
                   files: dict[str, Path]) -> None:
    """The program holds the tensors of weights.safetensors, equal."""
    held = _tensors(gm)
    for name, tensor in weights.items():
        theirs = held.get(name)
        if theirs is None or not _identical(theirs.detach(), tensor):
            what = "has no tensor of that name" if theirs is None else "holds other values or shape"
            raise ArtifactError(f"{files[WEIGHTS]} and {files[PROGRAM]} disagree on tensor {name!r} (the "
                                f"program {what}): the two files come from different saves: {_RESAVE}")


def _input_specs(specs: list, path: Path) -> tuple[inputs.InputSpec, ...]:
    out = []
    for s in specs:
        try:
            dtype = None if s["dtype"] is None else getattr(torch, s["dtype"])
            if dtype is not None and not isinstance(dtype, torch.dtype):
                raise TypeError(f"{s['dtype']!r} is not a dtype")
            out.append(inputs.InputSpec(str(s["name"]), dtype, tuple(s["sizes"])))
        except (KeyError, TypeError, AttributeError) as e:
            raise ArtifactError(f"{path}: input entry {s!r} is malformed ({e}): {_RESAVE}") from e
    return tuple(out)


# -- shared ------------------------------------------------------------------------------------------------


def _tensors(gm: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(gm.named_parameters(remove_duplicate=False)),
            **dict(gm.named_buffers(remove_duplicate=False))}


def _graph_fingerprint(gm: torch.fx.GraphModule) -> str:
    """sha256 of the graph's tensors (name, shape, dtype) and of its nodes' site facts."""
    tensors = sorted((name, list(t.shape), str(t.dtype)) for name, t in _tensors(gm).items())
    facts = sorted({(i.site, i.role, i.layer) for n in gm.graph.nodes if (i := meta.get(n)) is not None})
    return hashlib.sha256(json.dumps({"tensors": tensors, "facts": facts}).encode()).hexdigest()


def _identical(a, b) -> bool:
    """Bit-identical outputs (NaN where the other has NaN counts as equal)."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return a == b
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return bool(torch.isclose(a, b, rtol=0.0, atol=0.0, equal_nan=True).all())
    return torch.equal(a, b)


def _clone(tree):
    return pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or repr(err)
    return text.splitlines()[0][:300]
