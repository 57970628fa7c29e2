"""Report: the figures it shows come from the plan and the graphs; the HTML is self-contained."""

import re

import sparsegraph as sg
from sparsegraph import models
from sparsegraph.report import Report


def test_report_markdown_html_json_agree(tmp_path):
    model, example = models.load("explicit_attention")
    cm = sg.compile(model, {"passes": ["cost", {"nm_weights": {"n": 2, "m": 3}}]}, example_inputs=example,
                    quiet=True)
    report = cm.report()
    md = report.to_markdown()
    assert f"{cm.dense_cost.macs / 1e9:.4f}" in md
    # every refusal is shown with its reason
    assert "## Refused sites" in md and "not a multiple of m=3" in md
    html = report.to_html(tmp_path / "r.html")
    assert (tmp_path / "r.html").read_text() == html
    assert not re.search(r"<script|<link|src=['\"](?!data:)|url\(", html)  # nothing loaded from anywhere
    tables = {t["title"]: t for t in report.to_json()["tables"]}
    passes = {row[0]: row for row in tables["Passes"]["rows"]}
    stats = cm.plan.passes["nm_weights"]["stats"]
    assert passes["nm_weights"][2:5] == [stats["matched"], stats["rewritten"], len(stats["refused"])]


def test_report_draws_cost_per_site_and_activation_histograms(tmp_path):
    model, example = models.load("explicit_attention")
    cm = sg.compile(model, {"passes": ["activation_profile", {"neuron_pruning": {"fraction": 0.5}}]},
                    example_inputs=example, calibration=[example], quiet=True)
    report = cm.report()
    titles = [t for t, _ in report.figures]
    assert titles[0] == "Cost per site" and "Activation magnitudes" in titles[1]
    html = report.to_html()
    assert html.count("<svg") == 1 + 3  # one bar chart, one histogram per MLP site
    # the bar of a pruned MLP is half its dense MACs (up and down lose half their neurons)
    mlp = "mlp:blocks.0.mlp"
    assert cm.site_costs()[mlp].macs * 2 == cm.dense_site_costs[mlp].macs
    # a report from the saved plan alone has the same decisions and histograms, no cost table
    from_plan = Report.of_plan(sg.load_plan(cm.plan.save(tmp_path / "plan.json")))
    assert [t for t, _ in from_plan.figures] == titles[1:]
    assert "Cost at the example shapes" not in [t.title for t in from_plan.tables]


def test_report_draws_head_grid_token_schedule_and_rois():
    import torch

    from sparsegraph import models

    model, _ = models.load("vit_small")
    g = torch.Generator().manual_seed(0)
    calibration = [(torch.randn(2, 3, 224, 224, generator=g),)]
    config = {"passes": [{"head_patterns": {"block": 32, "recall": 0.5, "min_saving": 0.0}},
                         "token_importance", {"roi": {"layer": 3}},
                         {"token_pruning": {"layers": [4, 8], "keep": 0.5}}]}
    cm = sg.compile(model, config, example_inputs=(calibration[0][0],), calibration=calibration, quiet=True)
    report = cm.report()
    titles = [t for t, _ in report.figures]
    assert "Attention pattern per layer and head (block density in the cell)" in titles
    assert "Token keep schedule" in titles and "Token importance kept per layer" in titles
    roi = dict(report.figures)["Regions of interest on the example images (box: share of class-token "
                               "attention)"]
    assert roi.count("<svg") == 2 and 'stroke-width="2"' in roi  # two images, boxes drawn
    grid = dict(report.figures)["Attention pattern per layer and head (block density in the cell)"]
    assert grid.count("<title>") == 12 * 6  # one cell per layer and head
    _check_head_grid_png(report.images["head-grid.png"], cm.plan)
    assert "![head-grid.png](r.head-grid.png)" in report.to_markdown(stem="r")
    schedule = cm.plan.passes["token_pruning"]["stats"]["counters"]["schedule"]
    assert schedule == {"4": 99, "8": 50}  # 197 → 1 + 98 → 1 + 49


def _check_head_grid_png(data, plan):
    """Decode the PNG: 12 sites × 6 heads of 20-px cells, each in its pattern's colour up to its density."""
    from sparsegraph.passes.analysis.head_patterns import PATTERN_COLOURS
    from sparsegraph.png import hex_rgb

    width, height, pixel = _decode(data)
    cell, gap = 20, 2
    heads = [e["heads"] for e in (plan.evidence("head_patterns", s) for s in plan.sites) if e]
    assert (width, height) == (gap + 6 * (cell + gap), gap + len(heads) * (cell + gap)) and len(heads) == 12
    for r, row in enumerate(heads):
        for c, head in enumerate(row):
            bottom = (gap + c * (cell + gap) + cell // 2, gap + r * (cell + gap) + cell - 1)
            assert pixel(*bottom) == hex_rgb(PATTERN_COLOURS[head["pattern"]]) or head["density"] < 0.05


def _decode(data):
    """(width, height, pixel(x, y) → (r, g, b)) of a PNG written by `sparsegraph.png`."""
    import struct
    import zlib

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    pos, idat = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        idat += data[pos + 8:pos + 8 + length] if kind == b"IDAT" else b""
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = 1 + 3 * width

    def pixel(x, y):
        return tuple(raw[y * stride + 1 + 3 * x:y * stride + 4 + 3 * x])

    return width, height, pixel


def test_frame_strip_rows_per_clip_embedded_in_html(tmp_path):
    """`add_frames`: a row per clip, its frames side by side, pixels as scale × scale grey squares, and the
    picture in the HTML as a data URI with the row labels in its caption; mismatched frames refused."""
    import base64

    import pytest
    import torch

    dense = torch.linspace(-1, 1, 3 * 4 * 5).view(3, 4, 5)
    sparse = -dense
    report = Report("r", {}, [])
    data = report.add_frames("samples", {"dense": dense, "sparse, recall 0.9": sparse}, scale=2)
    width, height, pixel = _decode(data)
    gap, scale = 2, 2
    assert (width, height) == (gap + 3 * (5 * scale + gap), gap + 2 * (4 * scale + gap))
    for row, clip in enumerate((dense, sparse)):
        for t, y, x in ((0, 0, 0), (1, 2, 3), (2, 3, 4)):
            grey = round((float(clip[t, y, x]) + 1) * 127.5)
            px = gap + t * (5 * scale + gap) + x * scale + 1
            py = gap + row * (4 * scale + gap) + y * scale + 1
            assert pixel(px, py) == (grey, grey, grey)
    assert pixel(0, 0) == (255, 255, 255)
    html = report.to_html(tmp_path / "r.html")
    assert "data:image/png;base64," + base64.b64encode(data).decode() in html
    assert "rows, top to bottom: dense; sparse, recall 0.9" in html
    assert (tmp_path / "r.samples.png").read_bytes() == data
    with pytest.raises(ValueError, match="one frame size"):
        report.add_frames("bad", {"a": dense, "b": torch.zeros(3, 4, 6)})
