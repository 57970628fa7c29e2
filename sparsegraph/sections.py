"""The parts a report is made of, and what a pass contributes to one (`Pass.report_section`).

A `Section` holds tables (rows of plain values), figures (inline SVG, `sparsegraph.svg`) and images
(PNG bytes, `sparsegraph.png`, saved beside an HTML report). The report (`sparsegraph.report`) lays out
its own tables (passes, refusals, decisions, cost) and then each pass's section, in pipeline order, so
the core names no pass and a plugin's pass shows in the report as a built-in one does.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list] = field(default_factory=list)


@dataclass
class Section:
    tables: list[Table] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)  # (title, inline SVG)
    images: dict[str, bytes] = field(default_factory=dict)  # file name → PNG, saved beside the report
