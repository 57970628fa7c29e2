"""The CLI: each command on a small model, and our errors as one line with exit status 2."""

import json

import pytest

from sparsegraph.cli import main


def test_inspect_prints_sites_and_cost(capsys):
    assert main(["inspect", "zoo:explicit_attention"]) == 0
    out = capsys.readouterr().out
    assert "attn:blocks.0.attn" in out and "explicit attention, 4 heads (4 kv), head_dim 32" in out
    assert "6 sites" in out and "GMACs" in out


def test_compile_writes_plan_and_reports_then_replays(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compile", "zoo:explicit_attention", "--config", "nm-2-4", "--out", str(out)]) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["passes"]["nm_weights"]["stats"]["rewritten"] == 6
    assert (out / "report.html").read_text().startswith("<!doctype html>")
    assert main(["compile", "zoo:explicit_attention", "--plan", str(out / "plan.json"), "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "plan.json").read_text())["sites"] == plan["sites"]


def test_export_writes_onnx(tmp_path):
    assert main(["export", "zoo:explicit_attention", "--config", "dense", "--out", str(tmp_path / "m.onnx")]) == 0
    assert (tmp_path / "m.onnx").stat().st_size > 1000


@pytest.mark.parametrize("argv,message", [
    (["inspect", "zoo:minilmm"], "no zoo model 'minilmm' (did you mean 'minilm'?)"),
    (["inspect", "minilm"], "is not of the form SOURCE:NAME"),
    (["compile", "zoo:explicit_attention", "--config", "nm24", "--out", "x"], "(did you mean 'nm-2-4'?)"),
])
def test_errors_are_one_clear_line_with_status_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_passes_lists_builtins_and_pipelines(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "nm_weights" in out and "pipeline analyze" in out


def test_json_output_and_report_from_plan(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compile", "zoo:explicit_attention", "--config", "nm-2-4", "--out", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["passes"]["nm_weights"]["rewritten"] == 6 and data["macs"]["compiled"] < data["macs"]["dense"]
    assert main(["report", str(out / "plan.json"), "--out", str(tmp_path / "r.html"), "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    assert "nm_weights" in (tmp_path / "r.html").read_text()
    assert main(["inspect", "zoo:explicit_attention", "--json"]) == 0
    sites = json.loads(capsys.readouterr().out)["sites"]
    assert len(sites) == 6 and all(s["macs"] > 0 for s in sites)


def test_bench_times_compiled_against_dense_in_one_run(tmp_path, capsys):
    config = tmp_path / "prune.yaml"
    config.write_text("passes:\n  - token_pruning: {layers: [1, 2], keep: 0.5}\n")
    assert main(["bench", "zoo:explicit_attention", "--config", str(config), "--repeats", "2", "--json"]) == 0
    rows = {r["candidate"]: r for r in json.loads(capsys.readouterr().out)["results"]}
    assert set(rows) == {"dense eager", "compiled eager", "dense ORT", "compiled ORT"}
    assert rows["dense eager"]["speedup"] == 1.0 and rows["dense eager"]["cosine_to_dense"] > 0.9999
    assert all(r["ms"] > 0 for r in rows.values())
    assert rows["compiled eager"]["cosine_to_dense"] is None  # 17 tokens out instead of 64: no cosine


def test_profile_and_compile_read_calibration_data(tmp_path, capsys):
    import numpy as np

    from sparsegraph.models import digits_vit

    images = tmp_path / "images.npy"
    np.save(images, digits_vit.dataset("train").images[:40].numpy())
    plan, config = tmp_path / "roi.json", tmp_path / "roi.yaml"
    config.write_text("passes: [roi]\n")
    assert main(["profile", "zoo:digits_vit", "--config", str(config), "--data", str(images),
                 "-o", str(plan), "--json"]) == 0
    assert json.loads(plan.read_text())["passes"]["roi"]["stats"]["counters"]["boxes"] == 40
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((4, 3, 8, 8), dtype=np.float32))
    assert main(["profile", "zoo:digits_vit", "--config", str(config), "--data", str(bad),
                 "-o", str(plan)]) == 2
    assert "shape (3, 8, 8)" in capsys.readouterr().err


def test_json_leaves_stderr_free_of_model_loading_bars(capfd):
    """--json (and --quiet) silence Hugging Face's weight-loading bar as well as ours."""
    assert main(["inspect", "zoo:minilm", "--json"]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out)["sites"] and "Loading" not in err and "it/s" not in err, err
