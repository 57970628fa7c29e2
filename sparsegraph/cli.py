"""``sparsegraph`` command line: a thin layer over the Python API.

::

    sparsegraph inspect zoo:minilm                    # sites, parameters, cost
    sparsegraph compile zoo:minilm --config nm-2-4 --out out/   # plan.json, report.md, report.html
    sparsegraph compile zoo:minilm --plan out/plan.json --out out2/
    sparsegraph export zoo:minilm --config nm-2-4 --out model.onnx
    sparsegraph passes                                # built-in and plugin passes, named pipelines
    sparsegraph demo                                  # MiniLM end to end

A model is ``zoo:NAME``, ``torchvision:NAME``, ``timm:NAME``, ``hf:PATH`` or ``pkg.module:factory``.
Errors of ours print one clear message and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import sparsegraph as sg
from sparsegraph import ir, models, pipelines
from sparsegraph.errors import SparsegraphError


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    warnings.filterwarnings("ignore", module="torch")
    try:
        return args.run(args) or 0
    except SparsegraphError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsegraph", description="Make PyTorch models sparse and fast.")
    parser.add_argument("--version", action="version", version=sg.__version__)
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="print a model's sites, parameters and cost")
    p.add_argument("model")
    p.set_defaults(run=cmd_inspect)

    for name, fn, helptext in (("compile", cmd_compile, "compile a model; write plan and report"),
                               ("export", cmd_export, "compile a model and write it as ONNX")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("model")
        src = p.add_mutually_exclusive_group()
        src.add_argument("--config", help=f"YAML/JSON path or pipeline name {pipelines.names()}")
        src.add_argument("--plan", help="a saved plan.json to replay")
        p.add_argument("--out", required=True, help="output directory (compile) or .onnx path (export)")
        p.add_argument("--calibration", type=int, default=128, metavar="N",
                       help="calibration sentences for text models with a tokenizer (stdlib docstrings); "
                            "other models calibrate on their example inputs")
        p.set_defaults(run=fn)

    p = sub.add_parser("passes", help="list passes (built-in and plugins) and named pipelines")
    p.set_defaults(run=cmd_passes)

    p = sub.add_parser("demo", help="MiniLM end to end: trace, inspect, compile, export, compare")
    p.add_argument("--out", default="sparsegraph-demo", help="where the plan, report and ONNX go")
    p.set_defaults(run=cmd_demo)
    return parser


# -- commands ---------------------------------------------------------------------------------------------


def cmd_inspect(args) -> None:
    model, example = models.resolve(args.model)
    print(inspect_table(sg.trace(model, example)))


def cmd_compile(args) -> None:
    cm = _compile(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cm.plan.save(out / "plan.json")
    report = cm.report()
    (out / "report.md").write_text(report.to_markdown())
    report.to_html(out / "report.html")
    print(report.to_markdown())
    print(f"wrote {out / 'plan.json'}, {out / 'report.md'}, {out / 'report.html'}")


def cmd_export(args) -> None:
    path = _compile(args).export_onnx(args.out)
    print(f"wrote {path}")


def cmd_passes(args) -> None:
    print("passes:", ", ".join(sg.available_passes()))
    for name, doc in pipelines.describe().items():
        print(f"pipeline {name}: {doc}")


def cmd_demo(args) -> None:
    from sparsegraph.demo import run

    run(Path(args.out))


# -- helpers ----------------------------------------------------------------------------------------------


def _compile(args) -> sg.CompiledModel:
    model, example = models.resolve(args.model)
    if args.plan:
        return sg.compile(model, plan=args.plan, example_inputs=example)
    config = sg.Config.load(args.config or pipelines.DEFAULT)
    needs = any(getattr(p, "needs_calibration", False) for p in config.passes)
    return sg.compile(model, config, example_inputs=example,
                      calibration=calibration_for(model, example, args.calibration) if needs else None)


def calibration_for(model, example, n: int) -> list:
    """`n` held-in stdlib sentences in batches of 32 for models with a tokenizer, else the example inputs."""
    if hasattr(model, "tokenize"):
        from sparsegraph.data.stdlib_text import sentences

        texts = sentences("calibration", limit=n)
        return [model.tokenize(texts[i:i + 32]) for i in range(0, len(texts), 32)]
    print("note: calibrating on the example inputs only (no tokenizer to read real text with)", file=sys.stderr)
    return [example]


def inspect_table(gm) -> str:
    """Sites with their shape facts and cost, then parameter count and totals, as aligned text."""
    from sparsegraph.passes.analysis.cost import site_costs, total_cost

    costs = site_costs(gm)
    rows = [("site", "layer", "facts", "GMACs")]
    for s in ir.sites(gm):
        if isinstance(s, ir.AttentionSite):
            facts = (f"{s.form} attention, {s.heads} heads ({s.kv_heads} kv), head_dim {s.head_dim}"
                     f"{', causal' if s.causal else ''}")
        else:
            facts = f"{'gated ' if s.gated else ''}MLP {s.hidden}→{s.intermediate}, {s.activation}"
        macs = costs[s.id].macs if s.id in costs else 0
        rows.append((s.id, str(s.layer), facts, f"{macs / 1e9:.4f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    total = total_cost(gm)
    params = sum(p.numel() for p in gm.parameters())
    lines.append(f"\n{len(rows) - 1} sites; {params / 1e6:.2f} M parameters; "
                 f"{total.macs / 1e9:.4f} GMACs, {total.bytes / 1e6:.1f} MB moved at the example shapes")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
