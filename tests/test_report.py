"""Report: the figures it shows come from the plan and the graphs."""

import sparsegraph as sg
from sparsegraph import models


def test_report_markdown_html_json_agree(tmp_path):
    model, example = models.load("explicit_attention")
    cm = sg.compile(model, {"passes": ["cost", {"nm_weights": {"n": 2, "m": 3}}]}, example_inputs=example,
                    quiet=True)
    report = cm.report()
    md = report.to_markdown()
    assert f"{cm.dense_cost.macs / 1e9:.4f}" in md
    assert "## Refused sites" in md and "not a multiple of m=3" in md  # every refusal is shown with its reason
    html = report.to_html(tmp_path / "r.html")
    assert (tmp_path / "r.html").read_text() == html and "<script" not in html and "http" not in html
    tables = {t["title"]: t for t in report.to_json()["tables"]}
    passes = {row[0]: row for row in tables["Passes"]["rows"]}
    stats = cm.plan.passes["nm_weights"]["stats"]
    assert passes["nm_weights"][2:5] == [stats["matched"], stats["rewritten"], len(stats["refused"])]
