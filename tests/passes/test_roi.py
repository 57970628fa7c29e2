"""roi: boxes from planted maps (connected components, thresholds, pixel coordinates), refusals, and
cm.roi on a compiled vision transformer."""

import pytest
import torch

import sparsegraph as sg
from sparsegraph import models
from sparsegraph.boxes import Box, boxes_from_map
from sparsegraph.passes.analysis.roi import rois


def test_boxes_of_planted_blobs():
    m = torch.zeros(8, 8)
    m[1:3, 1:4] = 1.0     # blob A: rows 1-2, cols 1-3 (6 cells)
    m[5:8, 6] = 0.8       # blob B: rows 5-7, col 6 (3 cells)
    m[0, 7] = 0.1         # below threshold
    boxes = boxes_from_map(m, threshold=0.5, patch=4, max_boxes=3)
    assert [(b.x0, b.y0, b.x1, b.y1) for b in boxes] == [(4, 4, 16, 12), (24, 20, 28, 32)]
    assert boxes[0].score == pytest.approx(6 / (6 + 2.4 + 0.1))
    assert boxes_from_map(m, 0.5, 4, 1) == boxes[:1]


def test_diagonal_cells_are_one_component():
    m = torch.zeros(4, 4)
    m[0, 0] = m[1, 1] = m[2, 2] = 1.0
    (box,) = boxes_from_map(m, 0.5, 2, 5)
    assert (box.x0, box.y0, box.x1, box.y1) == (0, 0, 6, 6)


def test_iou():
    assert Box(0, 0, 10, 10, 1.0).iou((0, 0, 10, 10)) == 1.0
    assert Box(0, 0, 10, 10, 1.0).iou((5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert Box(0, 0, 10, 10, 1.0).iou((20, 20, 30, 30)) == 0.0


def test_text_models_are_refused_with_the_reason(explicit_calibrated):
    model, example, batches = explicit_calibrated
    cm = sg.compile(model, {"passes": ["roi"]}, example_inputs=example, calibration=batches, quiet=True)
    (refusal,) = cm.plan.passes["roi"]["stats"]["refused"]
    assert "image input" in refusal["reason"]
    with pytest.raises(ValueError, match="without the 'roi' pass"):
        rois(cm, *example)


def test_vit_boxes_at_run_time():
    model, example = models.load("vit_small")
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(2, 3, 224, 224, generator=g),)]
    cm = sg.compile(model, {"passes": [{"roi": {"max_boxes": 2}}]}, example_inputs=example,
                    calibration=batches, quiet=True)
    settings = cm.plan.evidence("roi", cm.plan.summary("roi")["site"])
    assert settings["grid"] == 14 and settings["patch"] == 16 and settings["layer"] == 6
    assert len(settings["samples"]) == 2
    boxes = rois(cm, *batches[0])
    assert len(boxes) == 2 and all(1 <= len(b) <= 2 for b in boxes)
    for b in boxes[0]:
        assert 0 <= b.x0 < b.x1 <= 224 and 0 <= b.y0 < b.y1 <= 224 and b.x0 % 16 == 0 and 0 < b.score <= 1
