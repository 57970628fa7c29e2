"""Calibration sharded over processes gives the plan one process gives on the same data."""

import json
import subprocess
import sys

import pytest
import torch

from sparsegraph.passes.analysis.activation_profile import Stream


def test_merged_streams_equal_one_stream():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(30, 6, generator=g) for _ in range(5)]

    def stream(indices):
        s = Stream(6, reservoir=40)
        for i in indices:
            s.add(batches[i], torch.Generator().manual_seed(i))
        return s

    whole, parts = stream(range(5)), [stream([0, 2, 4]), stream([1, 3])]
    merged = Stream.merged(parts)
    assert merged.tokens == whole.tokens and torch.equal(merged.hist, whole.hist)
    torch.testing.assert_close(merged.sum, whole.sum, rtol=1e-12, atol=1e-12)
    assert torch.equal(merged.keys.sort().values, whole.keys.sort().values)
    assert merged.summary((0.5,), 0.8).thresholds == whole.summary((0.5,), 0.8).thresholds


def _profile(nproc, out):
    subprocess.run([sys.executable, "-m", "sparsegraph.cli", "profile", "zoo:minilm", "--calibration", "64",
                    "--nproc", str(nproc), "--out", str(out), "--quiet"], check=True)
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.ci
def test_two_processes_give_the_single_process_plan(tmp_path):
    one, two = _profile(1, tmp_path / "one.json"), _profile(2, tmp_path / "two.json")
    assert one["sites"] == two["sites"]  # every statistic, threshold and centre, per site
    assert one["passes"]["activation_profile"]["summary"] == two["passes"]["activation_profile"]["summary"]
