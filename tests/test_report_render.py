"""The HTML report renders in a real browser: headless Chromium, screenshot not blank, no console errors."""

import shutil
import subprocess

import pytest
import torch

import sparsegraph as sg
from sparsegraph import models

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(html_path, png_path, width=1200, height=1600) -> str:
    """Render `html_path` headless into `png_path`; return the browser's stderr (console messages)."""
    result = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                             "--enable-logging=stderr", "--v=0", f"--window-size={width},{height}",
                             f"--screenshot={png_path}", f"file://{html_path}"],
                            capture_output=True, text=True, timeout=120, check=True)
    return result.stderr


@pytest.mark.skipif(CHROMIUM is None,
                    reason="needs Debian chromium (`apt-get install chromium`; .ci/run installs it)")
def test_report_renders_in_chromium(tmp_path):
    from PIL import Image

    model, example = models.load("explicit_attention")
    cm = sg.compile(model, {"passes": ["activation_profile", "cost", {"neuron_pruning": {"fraction": 0.5}}]},
                    example_inputs=example, calibration=[example], quiet=True)
    html = tmp_path / "report.html"
    cm.report().to_html(html)
    log = screenshot(html, tmp_path / "report.png")
    assert "CONSOLE" not in log and "Uncaught" not in log, log
    pixels = torch.tensor(list(Image.open(tmp_path / "report.png").convert("L").getdata()),
                          dtype=torch.float32)
    assert pixels.numel() > 0
    dark = (pixels < 128).float().mean().item()
    assert 0.005 < dark < 0.5, dark  # text and bars drawn on a white page: neither blank nor black
    assert len(pixels.unique()) > 20  # anti-aliased text and coloured bars, not a flat image
