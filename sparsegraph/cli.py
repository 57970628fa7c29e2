"""``sparsegraph`` command line: a thin layer over the Python API.

::

    sparsegraph inspect zoo:minilm                    # sites, parameters, cost
    sparsegraph compile zoo:minilm --config nm-2-4 --out out/   # plan.json, report.md, report.html, and
                                                                # the saved model (sparsegraph.artifact)
    sparsegraph compile zoo:minilm --plan out/plan.json --out out2/         # replay the plan
    sparsegraph compile zoo:minilm --config cfg.yaml --plan profile.json --out out3/   # reuse its profile
    sparsegraph export zoo:minilm --config nm-2-4 --out model.onnx   # checked against PyTorch in onnxruntime
    sparsegraph export out/ --out model.onnx          # a saved model: no model code, no recompile
    sparsegraph bench zoo:vit_b_16 --config vit-token-pruning   # compiled vs dense, eager and ORT, one run
    sparsegraph bench out/                            # a saved model, against its source model when it loads
    sparsegraph generate zoo:stdlib_lm --config llm-activation-sparsity --prompt "Return the"  # tokens/s
    sparsegraph profile zoo:minilm --nproc 2 --out profile.json   # calibration sharded over 2 processes
    sparsegraph report out/plan.json --out report.html   # a plan's report (HTML + markdown)
    sparsegraph passes                                # built-in and plugin passes, named pipelines
    sparsegraph demo                                  # MiniLM and digits_vit end to end

``--quiet`` silences progress bars and tables; ``--json`` prints one JSON object instead (for scripts).
Commands that write files never overwrite an existing one unless given ``--force``, and never their own
inputs (the plan, ``--plan``, ``--data``, ``--config``) even then.

A model is ``zoo:NAME``, ``torchvision:NAME``, ``timm:NAME``, ``hf:PATH``, ``diffusers:PATH``,
``diffusers:ClassName`` or ``pkg.module:factory``;
``export`` and ``bench`` also take a folder ``compile --out`` wrote (a saved model, ``sg.load``).
Errors of ours print one clear message and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from pathlib import Path

import sparsegraph as sg
from sparsegraph import artifact, distributed, models, pipelines
from sparsegraph.codegen import cpu_kernels
from sparsegraph.cost_model import site_costs, total_cost
from sparsegraph.data.calibration import calibration_for
from sparsegraph.errors import ModelSpecError, SparsegraphError, UsageError, did_you_mean
from sparsegraph.measure import compare, cosine
from sparsegraph.plan import describe_sites
from sparsegraph.report import Report, sites_table


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    warnings.filterwarnings("ignore", module="torch")
    if getattr(args, "quiet", False) or getattr(args, "json", False):
        _silence_model_loading()
    try:
        check_inputs(args)
        return args.run(args) or 0
    except SparsegraphError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


DATA_HELP = ("calibration data: a .txt file (one text per line, for models with a tokenizer), a .npy array "
             "[N, ...] of inputs, or a .npz of one array per input named as forward names them (batches of "
             "32); default: bundled stdlib sentences or the example inputs")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsegraph", description="Make PyTorch models sparse and fast.")
    parser.add_argument("--version", action="version", version=sg.__version__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars, no tables")
    common.add_argument("--json", action="store_true", help="print one JSON object (implies --quiet)")
    writes = argparse.ArgumentParser(add_help=False)
    writes.add_argument("--force", action="store_true",
                        help="overwrite existing output files (never the command's own inputs)")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="print a model's sites, parameters and cost", parents=[common])
    p.add_argument("model")
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("profile", help="run analysis passes on calibration data; save the plan",
                       parents=[common, writes])
    p.add_argument("model")
    p.add_argument("--config", help="an analysis-only pipeline (default: activation_profile, cost)")
    p.add_argument("--calibration", type=int, default=128, metavar="N",
                   help="calibration sentences (text models)")
    p.add_argument("--data", help=DATA_HELP)
    p.add_argument("--nproc", type=int, default=1,
                   help="calibration processes (torch.distributed, gloo/NCCL)")
    p.add_argument("-o", "--out", required=True, help="the plan.json to write")
    p.set_defaults(run=cmd_profile)

    p = sub.add_parser("report", help="write the report of a saved plan", parents=[common, writes])
    p.add_argument("plan")
    p.add_argument("-o", "--out", required=True, help="the HTML file to write")
    p.set_defaults(run=cmd_report)

    for name, fn, helptext in (("compile", cmd_compile, "compile a model; write plan and report"),
                               ("export", cmd_export, "compile a model and write it as ONNX"),
                               ("bench", cmd_bench, "compile a model; time it against dense (eager and ONNX "
                                                    "Runtime) on its example inputs, in one run")):
        p = sub.add_parser(name, help=helptext, parents=[common] if name == "bench" else [common, writes])
        p.add_argument("model")
        p.add_argument("--config", help=f"YAML/JSON path or pipeline name {pipelines.names()}")
        p.add_argument("--plan",
                       help="a saved plan.json: alone, replayed; with --config, its profile is reused")
        if name == "bench":
            p.add_argument("--repeats", type=int, default=7, help="timed rounds (median reported)")
            p.add_argument("--no-onnx", action="store_true", help="time PyTorch only")
        else:
            if name == "export":
                p.add_argument("--no-validate", action="store_true",
                               help="skip running the file in onnxruntime against PyTorch at the example "
                                    "inputs (tolerance 1e-4 x max(1, largest |output|))")
            p.add_argument("-o", "--out", required=True,
                           help="output directory (compile) or .onnx path (export)")
        p.add_argument("--data", help=DATA_HELP)
        p.add_argument("--calibration", type=int, default=128, metavar="N",
                       help="calibration sentences for text models with a tokenizer (stdlib docstrings); "
                            "other models calibrate on their example inputs")
        p.set_defaults(run=fn)

    p = sub.add_parser("generate", help="compile a causal LM and generate from a prompt (KV-cache decoding); "
                                        "prints the text and tokens/s", parents=[common])
    p.add_argument("model")
    p.add_argument("--config", help=f"YAML/JSON path or pipeline name {pipelines.names()}")
    p.add_argument("--plan", help="a saved plan.json: alone, replayed; with --config, its profile is reused")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt text (the model's tokenizer reads it)")
    prompt.add_argument("--prompt-ids", help="the prompt as token ids, e.g. '1 15 27' (no tokenizer needed)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate at most")
    p.add_argument("--sample", action="store_true", help="sample (with --temperature, --top-k) instead of "
                                                         "greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="seed for --sample")
    p.add_argument("--data", help=DATA_HELP)
    p.add_argument("--calibration", type=int, default=128, metavar="N",
                   help="calibration sentences for models with a tokenizer (stdlib docstrings)")
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("passes", help="list passes (built-in and plugins) and named pipelines",
                       parents=[common])
    p.set_defaults(run=cmd_passes)

    p = sub.add_parser("demo", help="MiniLM end to end: trace, inspect, compile, export, compare",
                       parents=[writes])
    p.add_argument("--out", default="sparsegraph-demo", help="where the plan, report and ONNX go")
    p.set_defaults(run=cmd_demo)
    return parser


# -- commands ---------------------------------------------------------------------------------------------


def cmd_inspect(args) -> None:
    model, example = models.resolve(args.model)
    gm = sg.trace(model, example)
    if args.json:

        costs = site_costs(gm)
        sites = [{**s, "macs": costs[s["id"]].macs if s["id"] in costs else 0} for s in describe_sites(gm)]
        _emit(args, {"sites": sites, "parameters": sum(p.numel() for p in gm.parameters()),
                     "macs": total_cost(gm).macs, "cpu_kernels": cpu_kernels.status()})
    else:
        print(sites_table(gm))


def cmd_compile(args) -> None:
    out = Path(args.out)
    written = [out / name for name in (*artifact.FILES, "report.md", "report.html")]
    check_outputs(args, written)
    cm = _compile(args)
    report = cm.report()
    written += report.image_paths(out / "report.html")
    check_outputs(args, written)  # the pictures too, now that the report names them
    with _writing(out):
        out.mkdir(parents=True, exist_ok=True)
        cm.save(out, source=args.model)
        (out / "report.md").write_text(report.to_markdown(stem="report"))
        report.to_html(out / "report.html")
    program = json.loads((out / artifact.MANIFEST).read_text())["program"]
    files = [str(p) for p in written if p.exists()]
    saved = ("" if program["file"] else f"\nno {artifact.PROGRAM}: {program['why']}; the folder cannot be "
             f"loaded or exported by itself (replay it with --plan {out / artifact.PLAN})")
    _emit(args, {"files": files, "passes": {k: v.get("stats") for k, v in cm.plan.passes.items()},
                 "macs": {"dense": cm.dense_cost.macs, "compiled": cm.cost.macs}, "program": program},
          f"{report.to_markdown()}\nwrote {', '.join(files)}{saved}")


def cmd_export(args) -> None:
    out = Path(args.out)
    if out.suffix.lower() != ".onnx":
        raise UsageError(f"--out {out}: an ONNX file's name ends in .onnx; try --out "
                         f"{out.with_suffix('.onnx')}")
    check_outputs(args, [out])
    cm = _saved(args)
    if cm is None:
        cm = _compile(args)
    with _writing(out):
        path = cm.export_onnx(out, validate=not args.no_validate)
    checked = "not validated" if args.no_validate else "validated against PyTorch in onnxruntime"
    _emit(args, {"files": [str(path)], "validated": not args.no_validate}, f"wrote {path} ({checked})")


def cmd_bench(args) -> None:
    """Dense and compiled, in PyTorch eager and (unless --no-onnx) ONNX Runtime: same example inputs and
    threads, rounds interleaved, median; the outputs' cosine to dense says what the speed costs.

    A saved model (a folder) is timed against the model it names as its source when that loads here and
    is the model it was compiled from (graph and weights); otherwise alone, and the output says why."""
    import torch

    cm, missing = _saved(args), None
    label = args.config or ("(saved)" if cm is not None else "(plan)")
    if cm is None:
        model, example = models.resolve(args.model)
        cm = _compile(args, model, example)
    else:
        model, missing = _source_of(cm)
    args_, kwargs = cm.example.args, cm.example.kwargs
    candidates = {}
    if model is not None:
        candidates["dense eager"] = lambda: model(*args_, **kwargs)
    candidates["compiled eager"] = lambda: cm(*args_, **kwargs)
    if not args.no_onnx:
        threads = torch.get_num_threads()
        if model is not None:
            dense_ort = sg.compile(model, "dense", example_inputs=args_, example_kwargs=kwargs,
                                   quiet=True).onnx_model(threads)
            candidates["dense ORT"] = lambda: dense_ort(*args_, **kwargs)
        ort = cm.onnx_model(threads)
        candidates["compiled ORT"] = lambda: ort(*args_, **kwargs)
    def fidelity_of(out, reference):  # token-level outputs of a token-pruned model are shorter: no figure
        out = torch.as_tensor(out)
        return cosine(out, reference) if reference is not None and out.shape == reference.shape else None

    with torch.inference_mode():
        reference = model(*args_, **kwargs) if model is not None else None
        fidelity = {name: fidelity_of(fn(), reference) for name, fn in candidates.items()}
    times = compare(candidates, warmup=2, repeats=args.repeats)
    rows = [{"candidate": name, "ms": round(t * 1e3, 3),
             "cosine_to_dense": None if fidelity[name] is None else round(fidelity[name], 5),
             "speedup": round(times["dense " + name.split()[-1]] / t, 3) if model is not None else None}
            for name, t in times.items()]
    lines = [f"{args.model}, config {label}, {torch.get_num_threads()} threads, median of "
             f"{args.repeats}:", "| candidate | ms | vs its dense | cosine to dense |", "|---|---|---|---|"]
    no_figure = "n/a (no dense model)" if model is None else "n/a (fewer tokens out)"
    lines += [
        f"| {r['candidate']} | {r['ms']:.2f} | "
        f"{'n/a' if r['speedup'] is None else format(r['speedup'], '.2f') + 'x'} | "
        f"{no_figure if r['cosine_to_dense'] is None else format(r['cosine_to_dense'], '.4f')}"
        " |"
        for r in rows]
    if missing is not None:
        lines.append(f"no dense baseline: {missing}; the compiled model is timed alone")
    _emit(args, {"model": args.model, "threads": torch.get_num_threads(), "results": rows,
                 "dense_missing": missing}, "\n".join(lines))


def cmd_profile(args) -> int:
    """Profile, sharded over ``--nproc`` processes (re-launched under torch.distributed.run)."""
    check_outputs(args, [Path(args.out)])
    if args.nproc > 1 and not distributed.in_worker():
        argv = ["profile", args.model, "--out", args.out, "--calibration", str(args.calibration),
                *(["--data", args.data] if args.data else []),
                *(["--config", args.config] if args.config else []), *(["--quiet"] if args.quiet else []),
                *(["--json"] if args.json else []), *(["--force"] if args.force else [])]
        return distributed.launch(args.nproc, "sparsegraph.cli", argv)
    config = sg.Config.load(args.config or {"passes": ["activation_profile", "cost"]})
    rewrites = [p.name for p in config.passes if not isinstance(p, sg.AnalysisPass)]
    if rewrites:
        raise sg.ConfigError(f"profile runs analysis passes only; {rewrites} rewrite the graph: use "
                             "`compile`")
    if distributed.in_worker():
        distributed.init()
    rank, world = distributed.rank_and_world()
    model, example = models.resolve(args.model)
    cm = sg.compile(model, config, example_inputs=example, quiet=args.quiet or args.json or rank > 0,
                    calibration=calibration_for(model, example, args.calibration, args.data))
    if rank == 0:
        with _writing(args.out):
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            cm.plan.save(args.out)
        _emit(args, {"files": [args.out], "processes": world, "passes": list(cm.plan.passes)},
              f"profiled with {world} process(es); wrote {args.out}")
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def cmd_report(args) -> None:
    out = Path(args.out)
    report = Report.of_plan(sg.load_plan(args.plan))
    written = [out, *report.image_paths(out)]
    check_outputs(args, written)
    with _writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        report.to_html(out)
    files = [str(p) for p in written]
    _emit(args, {"files": files}, f"{report.to_markdown()}\nwrote {', '.join(files)}")


def cmd_passes(args) -> None:
    _emit(args, {"passes": sg.available_passes(), "pipelines": pipelines.describe()},
          "passes: " + ", ".join(sg.available_passes()) + "\n"
          + "\n".join(f"pipeline {name}: {doc}" for name, doc in pipelines.describe().items()))


def cmd_demo(args) -> None:
    from sparsegraph.demo import run  # here, not at the top: the demo loads its models (0.8 s) and sklearn

    out = Path(args.out)
    _check_folder(out)
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise UsageError(f"--out {out} is a folder that already holds files, which the demo's plans and "
                         "reports may overwrite: pass --force to let them, or choose another --out")
    run(out)


# -- checks: before any work, so that a mistake costs no model load or compile -----------------------------

_COUNTS = {"calibration": "calibration sentences, default 128", "nproc": "calibration processes, default 1",
           "repeats": "timed rounds, default 7", "max_new_tokens": "tokens to generate, default 32"}


def check_inputs(args) -> None:
    """Counts of at least 1; the plan, --config and --data files exist (and --data holds something)."""
    for name, meaning in _COUNTS.items():
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UsageError(f"--{name} {value}: give at least 1 ({meaning})")
    plan = getattr(args, "plan", None)
    if plan is not None and not Path(plan).is_file():
        flag = "plan" if args.run is cmd_report else "--plan"
        what = "is a folder" if Path(plan).is_dir() else "no such file"
        raise UsageError(f"{flag} {plan}: {what}; give a plan.json written by `sparsegraph compile` or "
                         "`sparsegraph profile`")
    config = getattr(args, "config", None)
    if config is not None and config not in pipelines.names() and not Path(config).is_file():
        if Path(config).suffix.lower() in (".yaml", ".yml", ".json") or os.sep in config:
            raise UsageError(f"--config {config}: no such file; give a YAML/JSON config file or a pipeline "
                             "name (`sparsegraph passes` lists them)")
        raise UsageError(f"--config {config}: no such file and no pipeline of that name"
                         f"{did_you_mean(config, pipelines.names())}; "
                         "give a pipeline name or a YAML/JSON file")
    data = getattr(args, "data", None)
    if data is not None:
        _check_data(Path(data))


def _check_data(path: Path) -> None:
    """--data exists, is a .txt, .npy or .npz file, and holds at least one text or input (the .npz's arrays
    are matched to the model's inputs when the model is loaded)."""
    if not path.is_file():
        raise UsageError(f"--data {path}: no such file; give a .txt (one text per line), a .npy array of "
                         "inputs or a .npz of one array per input")
    if path.suffix not in (".txt", ".npy", ".npz"):
        raise UsageError(f"--data {path}: expected a .txt (texts), .npy (input array) or .npz (an array per "
                         "input) file")
    try:
        if path.suffix == ".txt":
            if not any(line.strip() for line in path.read_text().splitlines()):
                raise UsageError(f"--data {path} holds no text (every line is blank): give one text per line")
        elif path.suffix == ".npy":
            import numpy as np

            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
            if not shape or shape[0] == 0:
                raise UsageError(f"--data {path} holds no inputs (an array of shape {shape}): give an array "
                                 "[N, ...] of N ≥ 1 inputs")
        else:
            import numpy as np

            with np.load(path, allow_pickle=False) as f:
                if not f.files:
                    raise UsageError(f"--data {path} holds no arrays: give one array [N, ...] per input")
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not an .npy array / .npz archive
        raise UsageError(f"--data {path} cannot be read: {e}; give a UTF-8 .txt, a .npy array or a .npz of "
                         "arrays") from e


def check_outputs(args, paths: list[Path]) -> None:
    """Refuse to write any of `paths` over this command's inputs (even with --force) or over an existing file
    (without --force), or where it cannot be written."""
    inputs = {name: Path(value) for name in ("plan", "config", "data")
              if (value := getattr(args, name, None)) is not None and Path(value).is_file()}
    for path in paths:
        for name, source in inputs.items():
            if path.exists() and os.path.samefile(path, source):
                flag = "the plan" if name == "plan" and args.run is cmd_report else f"the --{name} file"
                raise UsageError(f"{path} is {flag} this command reads; it is never overwritten, even with "
                                 "--force: choose another --out")
        _check_writable(path)
    existing = [str(p) for p in paths if p.exists()]
    if existing and not args.force:
        raise UsageError(f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}: pass "
                         "--force to overwrite, or choose another --out")


def _check_writable(path: Path) -> None:
    if path.is_dir():
        raise UsageError(f"cannot write {path}: it is a folder; give --out a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"cannot write {path}: permission denied; choose another --out")
    _check_folder(path.parent)


def _check_folder(folder: Path) -> None:
    """`folder` is, or can be made as, a folder we may write in."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"cannot write in {folder}: {existing} is a file, not a folder; choose another "
                         "--out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write in {folder}: {existing} is not writable (permission denied); "
                         "choose another --out")


@contextlib.contextmanager
def _writing(target):
    """Turn a failed write (a full disk, a read-only file system) into one line naming the file."""
    try:
        yield
    except OSError as e:
        raise UsageError(f"cannot write {e.filename or target}: {e.strerror or e}; choose another "
                         "--out") from e


# -- helpers ----------------------------------------------------------------------------------------------


def cmd_generate(args) -> None:
    """Compile, then generate from one prompt; the timing line separates the prompt (prefill) from the
    decode steps, whose rate is the tokens/s figure."""
    import torch

    model, example = models.resolve(args.model)
    tokenizer = getattr(model, "tokenizer", None)
    if args.prompt_ids is not None:
        try:
            ids = [int(t) for t in args.prompt_ids.replace(",", " ").split()]
        except ValueError as e:
            raise UsageError(f"--prompt-ids {args.prompt_ids!r}: give integers separated by spaces") from e
    elif tokenizer is None:
        raise UsageError(f"{args.model} comes without a tokenizer, so --prompt cannot be read: give "
                         "--prompt-ids '1 15 27'")
    else:
        encoded = tokenizer.encode(args.prompt)
        ids = list(getattr(encoded, "ids", encoded))
    if len(ids) < 2:
        raise UsageError("the prompt must hold at least 2 tokens; give a longer prompt")
    cm = _compile(args, model, example)
    generator = torch.Generator().manual_seed(args.seed)
    out = cm.generate(torch.tensor([ids]), max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                      temperature=args.temperature, top_k=args.top_k, generator=generator)
    new = out[0, len(ids):].tolist()
    stats = cm.decoder().last
    text = tokenizer.decode(new) if tokenizer is not None else " ".join(map(str, new))
    timing = (f"{stats.new_tokens} tokens; prompt {stats.prompt_tokens} tokens in "
              f"{stats.prefill_s * 1e3:.0f} ms; decode {stats.tokens_per_s:.2f} tokens/s "
              f"({stats.ms_per_token:.1f} ms/token), {torch.get_num_threads()} threads")
    _emit(args, {"model": args.model, "prompt_ids": ids, "new_ids": new, "text": text,
                 "prompt_tokens": stats.prompt_tokens, "new_tokens": stats.new_tokens,
                 "prefill_s": stats.prefill_s, "decode_s": stats.decode_s,
                 "tokens_per_s": stats.tokens_per_s}, f"{text}\n{timing}")


def _silence_model_loading() -> None:
    """--quiet / --json: Hugging Face's own weight-loading bars and notices too (they write to stderr)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # no transformers: nothing of theirs to silence
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _emit(args, data: dict, text: str = "") -> None:
    """Print `data` as JSON with --json, else `text` unless --quiet."""
    if args.json:
        print(json.dumps(data, indent=1))
    elif not args.quiet and text:
        print(text)


def _saved(args) -> sg.CompiledModel | None:
    """The compiled model saved in the folder `args.model` names (``compile --out``, ``cm.save``), or None
    when it names a model to load and compile."""
    folder = Path(args.model)
    if not folder.is_dir():
        return None
    if not (folder / artifact.MANIFEST).is_file():
        raise ModelSpecError(f"{folder} is a folder without {artifact.MANIFEST}, so not a saved compiled "
                             "model (`sparsegraph compile MODEL --out DIR` writes one); a Hugging Face model "
                             f"folder is named hf:{folder}")
    given = [f"--{name}" for name in ("config", "plan", "data") if getattr(args, name, None)]
    if given:
        raise UsageError(f"{folder} is a saved compiled model; {', '.join(given)} apply when compiling a "
                         f"model by name: drop them, or compile the model again with --plan "
                         f"{folder / artifact.PLAN}")
    return sg.load(folder)


def _source_of(cm: sg.CompiledModel):
    """``(model, None)``: the dense model a loaded compiled model names as its source, when it loads here and
    is the model `cm` was compiled from; else ``(None, why)``."""
    if cm.source_name is None:
        return None, "the saved model names no source model (cm.save(dir, source='zoo:NAME') records one)"
    try:
        model, _ = models.resolve(cm.source_name)
        dense = sg.trace(model, cm.example.args, cm.example.kwargs)
    except (SparsegraphError, ImportError) as e:  # ImportError: a source whose package is not installed
        return None, f"its source {cm.source_name} does not load here ({e})"
    if not artifact.made_from(dense, cm.graph_module, cm.plan):
        return None, f"{cm.source_name} is not the model this was compiled from (its graph or weights differ)"
    return model, None


def _compile(args, model=None, example=None) -> sg.CompiledModel:
    if model is None:
        model, example = models.resolve(args.model)
    quiet = args.quiet or args.json
    if args.plan and not args.config:
        return sg.compile(model, plan=args.plan, example_inputs=example, quiet=quiet)
    config = sg.Config.load(args.config or pipelines.DEFAULT)
    needs = any(getattr(p, "needs_calibration", False) for p in config.passes)
    return sg.compile(model, config, example_inputs=example, quiet=quiet, plan=args.plan,
                      calibration=(calibration_for(model, example, args.calibration, args.data)
                                   if needs else None))


if __name__ == "__main__":
    sys.exit(main())
