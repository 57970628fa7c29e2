"""`Report`: what one compile did, as markdown, self-contained HTML or JSON.

Built from a plan (`Report.of_plan`, what ``sparsegraph report plan.json`` shows) or from a
`CompiledModel` (``cm.report()``, which adds what only the compiled graphs know): the model and its
sites, each pass with its counts (matched, rewritten, refused with the reasons) and time, the per-site
decisions, the cost of the graph before and after per site (MACs at the example shapes), and then what
each pass has to show of its own (`Pass.report_section`, found by the pass's name in the registry: the
activation histograms, the head-pattern grid, the token schedule, RoIs on the example images, a
plugin's table). Everything shown comes from the plan and the two graphs; nothing is estimated here.
Figures are inline SVG (`sparsegraph.svg`) and pictures are PNG (`sparsegraph.png`), embedded in the
HTML as data URIs (so the HTML file is self-contained) and also saved beside it for the markdown.
A caller with samples of its own (a video DiT's clips sampled dense and sparse from the same noise)
adds them as a frame strip with `Report.add_frames`.
"""

from __future__ import annotations

import base64
import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from sparsegraph import ir, png, recover, svg
from sparsegraph.codegen import cpu_kernels
from sparsegraph.cost_model import site_costs, total_cost
from sparsegraph.errors import ConfigError
from sparsegraph.registry import get_pass
from sparsegraph.sections import Table


@dataclass
class Report:
    title: str
    facts: dict[str, str]
    tables: list[Table]
    figures: list[tuple[str, str]] = field(default_factory=list)  # (title, inline SVG)
    images: dict[str, bytes] = field(default_factory=dict)  # file name → PNG, saved beside the report
    captions: dict[str, str] = field(default_factory=dict)  # file name → what its rows or cells show

    @classmethod
    def of(cls, cm) -> Report:
        """The plan's report plus cost before/after (totals and per site) and pass timings."""
        report = cls.of_plan(cm.plan, cm.timings, model=cm)
        report.facts["backend"] = cm.config.backend
        report.facts["CPU kernels"] = cpu_kernels.status()
        dense, ours = cm.dense_cost, cm.cost
        report.tables.insert(0, Table("Cost at the example shapes",
                                      ["", "dense", "compiled", "compiled / dense"], [
            ["GMACs", f"{dense.macs / 1e9:.4f}", f"{ours.macs / 1e9:.4f}", _ratio(ours.macs, dense.macs)],
            ["MB moved", f"{dense.bytes / 1e6:.1f}", f"{ours.bytes / 1e6:.1f}",
             _ratio(ours.bytes, dense.bytes)],
        ]))
        after = cm.site_costs()
        labels = list(cm.dense_site_costs)
        if labels:
            report.figures.insert(0, ("Cost per site", svg.bars(
                "MACs per site (millions) at the example shapes", labels,
                {"dense": [cm.dense_site_costs[s].macs / 1e6 for s in labels],
                 "compiled": [after[s].macs / 1e6 if s in after else 0.0 for s in labels]})))
        return report

    @classmethod
    def of_plan(cls, plan, timings: dict[str, float] | None = None, model=None) -> Report:
        """What the plan alone says: model, passes and counts, refusals, decisions, then each pass's own
        section (`Pass.report_section`; `model` is the compiled model when there is one)."""
        timings = timings or {}
        sites = plan.model["sites"]
        facts = {
            "model": plan.model["class"],
            "fingerprint": plan.model["fingerprint"][:16],
            "sites": f"{sum(s['kind'] == 'attention' for s in sites)} attention, "
                     f"{sum(s['kind'] == 'mlp' for s in sites)} MLP",
            "versions": ", ".join(f"{k} {v}" for k, v in plan.versions.items()),
        }
        passes = Table("Passes", ["pass", "kind", "matched", "rewritten", "refused", "seconds", "counters"])
        refusals = Table("Refused sites", ["pass", "site", "reason"])
        for name, entry in plan.passes.items():
            stats = entry.get("stats", {})
            passes.rows.append([name, entry.get("kind", ""), stats.get("matched", 0),
                                stats.get("rewritten", 0), len(stats.get("refused", [])),
                                f"{timings.get(name, 0.0):.2f}",
                                json.dumps(stats.get("counters", {}), sort_keys=True)])
            refusals.rows += [[name, r["site"], r["reason"]] for r in stats.get("refused", [])]
        decisions = Table("Decisions per site", ["site", "pass", "decision"])
        for site, per_pass in plan.sites.items():
            for name, entry in per_pass.items():
                if "decision" in entry:
                    decisions.rows.append([site, name, _short(entry["decision"])])
        report = cls(f"sparsegraph report: {plan.model['class']}", facts,
                     [passes] + [t for t in (refusals, decisions) if t.rows])
        missing = []
        for name in plan.passes:
            try:
                section = (recover.report_section(plan.passes[name]) if name in plan.recovered()
                           else get_pass(name).report_section(plan, model))
            except ConfigError:  # a plugin pass not installed here: its section cannot be drawn
                missing.append(name)
                continue
            if section is not None:
                report.tables += section.tables
                report.figures += section.figures
                report.images.update(section.images)
        if missing:
            report.facts["sections not drawn"] = f"passes {missing} are not installed here"
        return report

    def add_frames(self, name: str, clips: dict[str, object], scale: int = 3) -> bytes:
        """Add a strip of frames as the picture ``<name>.png``: one row per entry of `clips` (label →
        frames [T, H, W], values in [−1, 1], e.g. ``{"dense": clip, "sparse, recall 0.9": clip}``, the
        same seed), the T frames side by side, each pixel drawn as a `scale` × `scale` grey square.
        Rows must have one frame size; their labels are listed in the picture's caption, top to bottom.
        Returns the PNG bytes."""
        import torch

        frames = [torch.as_tensor(v, dtype=torch.float32) for v in clips.values()]
        if not frames or any(f.dim() != 3 or f.shape[1:] != frames[0].shape[1:] for f in frames):
            raise ValueError("add_frames wants a non-empty dict of [T, H, W] tensors of one frame size, got "
                             f"shapes {[tuple(f.shape) for f in frames]}")
        self.images[f"{name}.png"] = png.frames([((f + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)
                                                 .tolist() for f in frames], scale=scale)
        self.captions[f"{name}.png"] = "rows, top to bottom: " + "; ".join(clips)
        return self.images[f"{name}.png"]

    def to_json(self) -> dict:
        return {"title": self.title, "facts": self.facts,
                "tables": [{"title": t.title, "header": t.header, "rows": t.rows} for t in self.tables],
                "figures": [title for title, _ in self.figures]}

    def to_markdown(self, stem: str | None = None) -> str:
        """Markdown of the facts and tables; with `stem` (the HTML report's file stem, beside which
        `to_html` saves the pictures as ``<stem>.<name>``) the pictures are linked inline."""
        lines = [f"# {self.title}", ""]
        lines += [f"- **{k}**: {v}" for k, v in self.facts.items()]
        for t in self.tables:
            lines += ["", f"## {t.title}", "", "| " + " | ".join(t.header) + " |",
                      "|" + "---|" * len(t.header)]
            lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in t.rows]
        if self.figures:
            lines += ["", f"Figures in the HTML report: {', '.join(title for title, _ in self.figures)}."]
        if stem is not None:
            lines += [line for name in self.images
                      for line in ("", f"![{name}]({stem}.{name})", *([self.captions[name]]
                                                                      if name in self.captions else []))]
        return "\n".join(lines) + "\n"

    def to_html(self, path: str | os.PathLike | None = None) -> str:
        """One self-contained HTML page (no external assets); written to `path` when given."""
        e = html.escape
        parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(self.title)}</title>",
                 "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
                 "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}th{background:#eee}"
                 ".figures svg{margin:.4em}</style>",
                 f"</head><body><h1>{e(self.title)}</h1><ul>"]
        parts += [f"<li><b>{e(k)}</b>: {e(str(v))}</li>" for k, v in self.facts.items()]
        parts.append("</ul>")
        for t in self.tables:
            parts.append(f"<h2>{e(t.title)}</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in t.header)
                         + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in t.rows]
            parts.append("</table>")
        for title, figure in self.figures:
            parts.append(f"<h2>{e(title)}</h2><div class='figures'>{figure}</div>")
        for name, data in self.images.items():
            uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
            parts.append(f"<h2>{e(name)}</h2><figure><img src='{uri}' alt='{e(name)}' "
                         f"style='image-rendering:pixelated'><figcaption>{e(self.captions.get(name, ''))}"
                         "</figcaption></figure>")
        text = "".join(parts) + "</body></html>\n"
        if path is not None:
            Path(path).write_text(text)
            self.save_images(Path(path))
        return text

    def image_paths(self, beside: str | os.PathLike) -> list[Path]:
        """Where `save_images` puts the pictures: beside the file `beside`, as ``<its stem>.<name>``."""
        beside = Path(beside)
        return [beside.with_name(f"{beside.stem}.{name}") for name in self.images]

    def save_images(self, beside: str | os.PathLike) -> list[Path]:
        """Write the PNG pictures (the per-layer × per-head pattern grid) beside the file `beside`."""
        written = self.image_paths(beside)
        for target, data in zip(written, self.images.values(), strict=True):
            target.write_bytes(data)
        return written


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "n/a"


def _short(value, limit: int = 160) -> str:
    """Compact JSON: long lists (per-neuron centres, kept indices) are shown as their length."""
    def compact(v):
        if isinstance(v, dict):
            return {k: compact(x) for k, x in v.items()}
        if isinstance(v, list) and len(v) > 8:
            return f"[{len(v)} values]"
        return v

    text = json.dumps(compact(value), sort_keys=True)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def sites_table(gm) -> str:
    """What `sparsegraph inspect` prints: the sites with their shape facts and cost, then the parameter
    count and totals, and which CPU kernels run, as aligned text."""
    costs = site_costs(gm)
    rows = [("site", "layer", "facts", "GMACs")]
    for s in ir.sites(gm):
        if isinstance(s, ir.AttentionSite):
            what = "cross-attention" if s.cross else "attention"
            facts = (f"{s.form} {what}, {s.heads} heads ({s.kv_heads} kv), head_dim {s.head_dim}"
                     f"{', causal' if s.causal else ''}")
        elif isinstance(s, ir.ConvSite):
            facts = f"1x1 conv {s.in_channels}→{s.out_channels} at {s.height}×{s.width}"
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
    lines.append(f"compiled CPU kernels: {cpu_kernels.status()}")
    return "\n".join(lines)
