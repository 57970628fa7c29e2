"""The CLI: each command on a small model, and our errors as one line with exit status 2."""

import json
import os

import pytest
import torch

from sparsegraph.cli import main
from sparsegraph.codegen import cpu_kernels


def test_inspect_prints_sites_and_cost(capsys):
    assert main(["inspect", "zoo:explicit_attention"]) == 0
    out = capsys.readouterr().out
    assert "attn:blocks.0.attn" in out and "explicit attention, 4 heads (4 kv), head_dim 32" in out
    assert "6 sites" in out and "GMACs" in out
    assert f"compiled CPU kernels: {cpu_kernels.status()}" in out


def test_compile_writes_plan_and_reports_then_replays(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compile", "zoo:explicit_attention", "--config", "nm-2-4", "--out", str(out)]) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["passes"]["nm_weights"]["stats"]["rewritten"] == 6
    assert (out / "report.html").read_text().startswith("<!doctype html>")
    assert "**CPU kernels**" in (out / "report.md").read_text()
    assert main(["compile", "zoo:explicit_attention", "--plan", str(out / "plan.json"), "--out",
                 str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "plan.json").read_text())["sites"] == plan["sites"]


def test_export_writes_onnx(tmp_path):
    assert main(["export", "zoo:explicit_attention", "--config", "dense", "--out",
                 str(tmp_path / "m.onnx")]) == 0
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


@pytest.mark.slow
@pytest.mark.ci  # ~20 s: times dense and compiled, eager and ORT
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
                 "-o", str(tmp_path / "bad.json")]) == 2
    assert "shape (3, 8, 8)" in capsys.readouterr().err and not (tmp_path / "bad.json").exists()


@pytest.mark.slow
@pytest.mark.ci
def test_npz_data_fills_every_input_by_name(tmp_path, capsys):
    """A model of several inputs (the video DiT: noisy clip x, timestep t, label) calibrates from a .npz of
    one array per input, named as its forward names them; a missing or unknown name is refused naming the
    inputs, and so is a mismatched count."""
    import numpy as np

    from sparsegraph.models import moving_digits_dit as mdd

    x, t, label = (torch.cat(parts) for parts in zip(*mdd.calibration(n=1, timesteps=(0.3, 0.7), batch=3)))
    data = tmp_path / "clips.npz"
    np.savez(data, x=x.numpy(), t=t.numpy(), label=label.numpy())
    config = tmp_path / "hp.yaml"
    config.write_text("passes: [{head_patterns: {block: 16, recall: 0.9}}]\n")
    plan = tmp_path / "plan.json"
    assert main(["profile", "zoo:moving_digits_dit", "--config", str(config), "--data", str(data),
                 "-o", str(plan)]) == 0
    evidence = json.loads(plan.read_text())["sites"]["attn:blocks.0.attn"]["head_patterns"]["evidence"]
    assert evidence["seq_len"] == 256 and len(evidence["heads"]) == mdd.HEADS
    np.savez(tmp_path / "named.npz", x=x.numpy(), time=t.numpy(), label=label.numpy())
    assert main(["profile", "zoo:moving_digits_dit", "--config", str(config), "--data",
                 str(tmp_path / "named.npz"), "-o", str(tmp_path / "p2.json")]) == 2
    err = capsys.readouterr().err
    assert "the model's inputs are x, t, label" in err and "missing: t" in err and "not an input: time" in err
    np.savez(tmp_path / "short.npz", x=x.numpy(), t=t.numpy()[:2], label=label.numpy())
    assert main(["profile", "zoo:moving_digits_dit", "--config", str(config), "--data",
                 str(tmp_path / "short.npz"), "-o", str(tmp_path / "p3.json")]) == 2
    assert "the same number N" in capsys.readouterr().err


def test_json_leaves_stderr_free_of_model_loading_bars(capfd):
    """--json (and --quiet) silence Hugging Face's weight-loading bar as well as ours."""
    assert main(["inspect", "zoo:minilm", "--json"]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out)["sites"] and "Loading" not in err and "it/s" not in err, err


# -- refusals: nothing the user had is overwritten, and bad arguments are one line with status 2 -------------

PRECIOUS = b"precious: not to be lost\n"


@pytest.fixture(scope="module")
def saved_plan(tmp_path_factory):
    """A plan of zoo:explicit_attention (the cheap 'analyze' pipeline), saved once for the module."""
    import sparsegraph as sg
    from sparsegraph import models

    model, example = models.load("explicit_attention")
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    sg.compile(model, "analyze", example_inputs=example, quiet=True).plan.save(path)
    return path.read_bytes()


@pytest.fixture
def workdir(tmp_path, saved_plan):
    """tmp_path holding files the user cares about: precious.{txt,json,html,onnx}, a compile output folder
    o2/ (plan.json, report.md, report.html), a config, calibration tokens, and empty data files."""
    import numpy as np

    for name in ("precious.txt", "precious.json", "precious.html", "precious.onnx"):
        (tmp_path / name).write_bytes(PRECIOUS)
    (tmp_path / "o2").mkdir()
    (tmp_path / "o2" / "plan.json").write_bytes(saved_plan)
    (tmp_path / "o2" / "report.md").write_bytes(PRECIOUS)
    (tmp_path / "o2" / "report.html").write_bytes(PRECIOUS)
    (tmp_path / "profile.json").write_text('{"passes": ["activation_profile", "cost"]}\n')
    np.save(tmp_path / "tokens.npy", np.arange(4 * 64).reshape(4, 64) % 1000)
    np.save(tmp_path / "empty.npy", np.zeros((0, 64), dtype=np.int64))
    (tmp_path / "blank.txt").write_text("\n   \n\t\n")
    return tmp_path


def _snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(argv: list[str], capsys, *fragments: str) -> str:
    """`main(argv)` exits 2 with one line on stderr, ``error: ...``, holding each of `fragments`."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, err
    return err


M = "zoo:explicit_attention"


REFUSALS = [
    # onto the command's own input: refused, even with --force
    (["report", "o2/plan.json", "--out", "o2/plan.json"], ["o2/plan.json is the plan this command reads"]),
    (["report", "o2/plan.json", "--out", "o2/plan.json", "--force"],
     ["never overwritten, even with --force"]),
    (["compile", M, "--plan", "o2/plan.json", "--out", "o2", "--force"],
     ["is the --plan file this command reads"]),
    (["profile", M, "--config", "profile.json", "-o", "profile.json", "--force"], ["the --config file"]),
    (["profile", M, "--data", "tokens.npy", "-o", "tokens.npy", "--force"], ["the --data file"]),
    # onto anything else the user had: refused without --force
    (["report", "o2/plan.json", "--out", "precious.html"], ["precious.html already exists: pass --force"]),
    (["export", M, "--config", "dense", "--out", "precious.onnx"],
     ["precious.onnx already exists: pass --force"]),
    (["compile", M, "--config", "analyze", "--out", "o2"],
     ["o2/plan.json, o2/report.md, o2/report.html already exist: pass --force"]),
    (["profile", M, "-o", "precious.json"], ["precious.json already exists: pass --force"]),
    (["demo", "--out", "o2"], ["--out o2 is a folder that already holds files", "--force"]),
    # an ONNX file ends in .onnx
    (["export", M, "--config", "dense", "--out", "precious.txt"], ["ends in .onnx; try --out precious.onnx"]),
    (["export", M, "--config", "dense", "--out", "precious.txt", "--force"], ["ends in .onnx"]),
    # where nothing can be written
    (["report", "o2/plan.json", "--out", "precious.txt/r.html"],
     ["cannot write in precious.txt", "is a file"]),
    (["export", M, "--config", "dense", "--out", "precious.txt/m.onnx"], ["cannot write in precious.txt"]),
    (["compile", M, "--config", "analyze", "--out", "precious.txt/out"],
     ["cannot write in precious.txt/out"]),
    (["profile", M, "-o", "precious.txt/p.json"], ["cannot write in precious.txt"]),
    (["report", "o2/plan.json", "--out", "o2"], ["cannot write o2: it is a folder"]),
    # read-only for root too
    (["report", "o2/plan.json", "--out", "/proc/sparsegraph-report.html"], ["/proc"]),
    # counts and data
    (["profile", M, "-o", "p.json", "--calibration", "0"], ["--calibration 0: give at least 1"]),
    (["compile", M, "--config", "activation-sparsity", "--out", "c", "--calibration", "-3"],
     ["--calibration -3: give at least 1"]),
    (["bench", M, "--repeats", "0"], ["--repeats 0: give at least 1"]),
    (["profile", M, "-o", "p.json", "--data", "blank.txt"], ["--data blank.txt holds no text"]),
    (["profile", M, "-o", "p.json", "--data", "empty.npy"], ["--data empty.npy holds no inputs", "(0, 64)"]),
    (["export", M, "--config", "activation-sparsity", "--out", "m.onnx", "--data", "nope.npy"],
     ["--data nope.npy: no such file"]),
    # model names, plans and configs that are not there
    (["compile", "zoo:nope", "--out", "c"], ["no zoo model 'nope'"]),
    (["export", "nocolon", "--out", "m.onnx"],
     ["model 'nocolon' is not of the form SOURCE:NAME; try zoo:minilm"]),
    (["inspect", "torchvision:nope"], ["torchvision has no model 'nope'"]),
    (["compile", M, "--plan", "nope.json", "--out", "c"],
     ["--plan nope.json: no such file; give a plan.json"]),
    (["report", "nope.json", "--out", "r.html"], ["plan nope.json: no such file"]),
    (["export", M, "--config", "nope.yaml", "--out", "m.onnx"],
     ["--config nope.yaml: no such file; give a YAML"]),
]


@pytest.mark.parametrize("argv,fragments", [pytest.param(a, f, id=" ".join(a)) for a, f in REFUSALS])
def test_refused_commands_change_nothing(argv, fragments, workdir, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    before = _snapshot(workdir)
    _refused(argv, capsys, *fragments)
    assert _snapshot(workdir) == before  # nothing overwritten, nothing created


def test_force_overwrites_outputs_but_not_inputs(workdir, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    assert main(["report", "o2/plan.json", "--out", "precious.html", "--force", "--quiet"]) == 0
    assert (workdir / "precious.html").read_text().startswith("<!doctype html>")
    assert main(["compile", M, "--config", "analyze", "--out", "o2", "--force", "--quiet"]) == 0
    assert (workdir / "o2" / "report.md").read_bytes() != PRECIOUS
    plan = (workdir / "o2" / "plan.json").read_bytes()
    _refused(["compile", M, "--plan", "o2/plan.json", "--out", "o2", "--force"], capsys, "--plan")
    assert (workdir / "o2" / "plan.json").read_bytes() == plan


def test_new_output_folders_are_made(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    assert main(["report", "o2/plan.json", "--out", "new/deeper/r.html", "--quiet"]) == 0
    assert (workdir / "new" / "deeper" / "r.html").read_text().startswith("<!doctype html>")


def test_read_only_folder_is_one_line(workdir, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    locked = workdir / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this process writes into read-only folders (root with CAP_DAC_OVERRIDE)")
        _refused(["report", "o2/plan.json", "--out", "locked/r.html"], capsys, "cannot write in locked",
                 "permission denied")
        _refused(["compile", M, "--config", "analyze", "--out", "locked/out"], capsys, "permission denied")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)
