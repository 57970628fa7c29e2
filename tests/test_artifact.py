"""A compiled model saved as a folder (`cm.save`) and loaded back (`sg.load`) without its model: the format,
bit-identical outputs in a fresh process, refusals of changed or foreign files, the CLI (compile --out,
export DIR, bench DIR), and ONNX export's numerical validation."""

import hashlib
import json
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import safetensors.torch
import torch
from onnxscript import opset18 as op

import sparsegraph as sg
from sparsegraph import artifact, codegen, models
from sparsegraph.cli import main
from sparsegraph.graph_edit import ADDED

# heavy for the default run (kept under 6 minutes on 2 cores): CI runs these after it
pytestmark = [pytest.mark.slow, pytest.mark.ci]  # heavy for the default run: CI runs it after


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """explicit_attention with half of every MLP's neurons pruned (calibrated), saved: ``(cm, folder)``."""
    model, example = models.load("explicit_attention")
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 1000, (2, 32), generator=g), torch.ones(2, 32, dtype=torch.long))
               for _ in range(2)]
    cm = sg.compile(model, "neuron-pruning", example_inputs=example, calibration=batches, quiet=True)
    folder = tmp_path_factory.mktemp("pruned") / "saved"
    cm.save(folder, source="zoo:explicit_attention")
    return cm, folder


@pytest.fixture(scope="module")
def cli_saved(tmp_path_factory):
    """The folder ``sparsegraph compile zoo:explicit_attention --config nm-2-4 --out DIR`` writes."""
    out = tmp_path_factory.mktemp("cli") / "out"
    assert main(["compile", "zoo:explicit_attention", "--config", "nm-2-4", "--out", str(out),
                 "--quiet"]) == 0
    return out


def _copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "copy")


def _rehash(folder, name):
    """Record `name`'s new sha256 in the manifest, as someone covering their tracks would."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_the_folder_holds_plan_config_pruned_weights_example_and_program(pruned):
    cm, folder = pruned
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(p.name for p in folder.iterdir()) == sorted(artifact.FILES)
    assert manifest["format"] == "sparsegraph-artifact" and manifest["format_version"] == 1
    assert manifest["versions"] == {"sparsegraph": sg.__version__, "torch": torch.__version__.split("+")[0]}
    assert manifest["model"] == {"class": "ExplicitTransformer", "fingerprint": cm.plan.model["fingerprint"]}
    assert manifest["source"] == "zoo:explicit_attention" and manifest["program"]["file"] == "program.pt2"
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
    assert sg.load_plan(folder / "plan.json").to_json() == cm.plan.to_json()
    assert json.loads((folder / "config.json").read_text()) == cm.config.to_dict()
    weights = safetensors.torch.load_file(folder / "weights.safetensors")
    assert set(weights) == set(cm.graph_module.meta[ADDED])
    hidden = cm.graph_module.get_buffer("sg_blocks_0_mlp_0_weight").shape[0]
    assert weights["sg_blocks_0_mlp_0_weight"].shape == (hidden, 128) and hidden == 256  # stored pruned
    assert torch.equal(weights["sg_blocks_0_mlp_2_weight"],
                       cm.graph_module.get_buffer("sg_blocks_0_mlp_2_weight"))
    example = safetensors.torch.load_file(folder / "example.safetensors")
    assert all(torch.equal(example[f"args.{i}"], x) for i, x in enumerate(cm.example.args))
    artifact._refuse_pickles(folder / "program.pt2")  # torch pickles nothing of ours in the archive
    with zipfile.ZipFile(folder / "program.pt2") as archive:  # the replaced dense weights are not saved
        config = json.loads(next(archive.read(n) for n in archive.namelist() if "weights_config" in n))
    assert "blocks.0.mlp.0.weight" not in config["config"] and "sg_blocks_0_mlp_0_weight" in config["config"]


def test_loaded_in_a_fresh_process_its_outputs_are_bit_identical(pruned, cli_saved, tmp_path):
    """The pruned model (pruned weights, aten ops) and the N:M one (sparsegraph::nm_linear calls)."""
    cm, folder = pruned
    other = models.load("explicit_attention", seq_len=24, batch=3)[1]  # another batch and length
    safetensors.torch.save_file({"ids": other[0], "mask": other[1]}, tmp_path / "other.safetensors")
    script = f"""
import sys, safetensors.torch, sparsegraph as sg

other = safetensors.torch.load_file({str(tmp_path / 'other.safetensors')!r})
for name, folder in (("pruned", {str(folder)!r}), ("nm", {str(cli_saved)!r})):
    cm = sg.load(folder)
    safetensors.torch.save_file({{"example": cm(*cm.example.args), "other": cm(other["ids"], other["mask"])}},
                                {str(tmp_path)!r} + f"/{{name}}.safetensors")
assert not any(m.startswith("sparsegraph.models") for m in sys.modules), "the model's code was imported"
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    model, example = models.load("explicit_attention")
    nm = sg.compile(model, "nm-2-4", example_inputs=example, quiet=True)  # as `compile --out` made it
    with torch.no_grad():
        for name, compiled in (("pruned", cm), ("nm", nm)):
            out = safetensors.torch.load_file(tmp_path / f"{name}.safetensors")
            assert torch.equal(out["example"], compiled(*compiled.example.args))
            assert torch.equal(out["other"], compiled(*other))


def test_a_loaded_model_reports_costs_and_saves_again(pruned, tmp_path):
    cm, folder = pruned
    loaded = sg.load(folder)
    assert loaded.cost == cm.cost and loaded.site_costs() == cm.site_costs()
    assert loaded.report().to_markdown() == cm.report().to_markdown()
    with pytest.raises(sg.InputError, match="input_ids"):
        loaded(torch.zeros(2, 8), torch.ones(2, 8, dtype=torch.long))  # the call signature came back too
    again = sg.load(loaded.save(tmp_path / "again"))
    assert again.source_name == "zoo:explicit_attention"
    with torch.no_grad():
        assert torch.equal(again(*cm.example.args), cm(*cm.example.args))


@pytest.mark.parametrize("name", ["weights.safetensors", "program.pt2", "plan.json", "config.json",
                                  "example.safetensors"])
def test_a_changed_file_is_refused_naming_it(pruned, tmp_path, name):
    folder = _copy(pruned[1], tmp_path)
    data = bytearray((folder / name).read_bytes())
    data[len(data) // 2] ^= 1
    (folder / name).write_bytes(bytes(data))
    with pytest.raises(sg.ArtifactError, match=rf"{name} was changed after saving .*save the compiled model "
                                               r"again"):
        sg.load(folder)


def test_a_plan_for_another_model_is_refused_even_with_a_consistent_manifest(pruned, tmp_path):
    folder = _copy(pruned[1], tmp_path)
    plan = json.loads((folder / "plan.json").read_text())
    plan["model"]["fingerprint"] = "0" * 64
    (folder / "plan.json").write_text(json.dumps(plan))
    _rehash(folder, "plan.json")
    with pytest.raises(sg.ArtifactError, match=r"plan\.json was made for another model"):
        sg.load(folder)


def test_weights_from_another_save_are_refused(pruned, tmp_path):
    folder = _copy(pruned[1], tmp_path)
    weights = safetensors.torch.load_file(folder / "weights.safetensors")
    weights["sg_blocks_1_mlp_2_bias"] = weights["sg_blocks_1_mlp_2_bias"] + 1
    safetensors.torch.save_file(weights, folder / "weights.safetensors")
    _rehash(folder, "weights.safetensors")
    with pytest.raises(sg.ArtifactError, match="disagree on tensor 'sg_blocks_1_mlp_2_bias'"):
        sg.load(folder)


def test_a_program_with_a_pickled_payload_is_refused_before_torch_reads_it(pruned, tmp_path):
    folder = _copy(pruned[1], tmp_path)
    path = folder / "program.pt2"
    with zipfile.ZipFile(path) as archive:
        entries = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in entries:
            archive.writestr(info, b"a pickle" if "sample_inputs" in info.filename else data)
    _rehash(folder, "program.pt2")
    with pytest.raises(sg.ArtifactError, match=r"holds pickled payloads .*sample_inputs"):
        sg.load(folder)


def test_what_is_not_a_saved_model_is_refused(tmp_path):
    with pytest.raises(sg.ArtifactError, match=r"is not a saved sparsegraph model: it has no manifest\.json"):
        sg.load(tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(sg.ArtifactError, match="is not a folder"):
        sg.load(tmp_path / "f")
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(sg.ArtifactError, match="is not a sparsegraph manifest"):
        sg.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": artifact.FORMAT, "format_version": 9}))
    with pytest.raises(sg.ArtifactError, match="format version 9; this sparsegraph reads version 1"):
        sg.load(tmp_path)


def test_a_graph_torch_export_cannot_capture_is_saved_without_a_program(tmp_path, monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    cm = sg.compile(model, "dense", example_inputs=(torch.randn(2, 8),), quiet=True)

    def refuse(*args, **kwargs):
        raise RuntimeError("data-dependent shape\nmore")

    monkeypatch.setattr(artifact, "capture", refuse)
    cm.save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["program"] == {"file": None, "why": "torch.export cannot capture the compiled graph: "
                                                        "RuntimeError: data-dependent shape"}
    assert not (tmp_path / "program.pt2").exists() and "program.pt2" not in manifest["files"]
    with pytest.raises(sg.ArtifactError, match=r"holds no program to run: torch.export cannot capture .* "
                                               r"Compile again from the model with this plan: .*plan="):
        sg.load(tmp_path)


def test_cli_compile_out_then_export_and_bench_the_folder(cli_saved, tmp_path, capsys):
    assert {p.name for p in cli_saved.iterdir()} >= {*artifact.FILES, "report.md", "report.html"}
    capsys.readouterr()
    assert main(["export", str(cli_saved), "--out", str(tmp_path / "m.onnx")]) == 0
    assert "validated against PyTorch in onnxruntime" in capsys.readouterr().out
    assert (tmp_path / "m.onnx").stat().st_size > 1000
    assert main(["bench", str(cli_saved), "--repeats", "1", "--no-onnx", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["dense_missing"] is None  # its source, zoo:explicit_attention, is the dense baseline
    assert [r["candidate"] for r in data["results"]] == ["dense eager", "compiled eager"]
    assert data["results"][1]["speedup"] > 0 and 0.9 < data["results"][1]["cosine_to_dense"] <= 1.0


def test_cli_bench_of_a_folder_without_a_source_times_the_compiled_model_alone(cli_saved, tmp_path, capsys):
    folder = _copy(cli_saved, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["source"] = None
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert main(["bench", str(folder), "--repeats", "1", "--no-onnx"]) == 0
    out = capsys.readouterr().out
    assert "| compiled eager |" in out and "dense eager" not in out and "n/a (no dense model)" in out
    assert "no dense baseline: the saved model names no source model" in out


def test_cli_refuses_compile_options_with_a_folder_and_a_folder_not_saved(cli_saved, tmp_path, capsys):
    assert main(["export", str(cli_saved), "--config", "nm-2-4", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "is a saved compiled model; --config apply when compiling" in capsys.readouterr().err
    assert main(["bench", str(tmp_path)]) == 2
    assert "without manifest.json, so not a saved compiled model" in capsys.readouterr().err


def test_onnx_validation_catches_a_wrong_translation_and_no_validate_skips_it(cli_saved, tmp_path,
                                                                            monkeypatch, capsys):
    nm_linear = codegen.ops()["nm_linear"]

    def off_by_one_percent(x, values, offsets, bias, n: int, m: int):
        return op.Mul(nm_linear.onnx(x, values, offsets, bias, n, m), op.Constant(value_float=1.01))

    translations = {**codegen.onnx_translations(), nm_linear.overload: off_by_one_percent}
    monkeypatch.setattr(codegen, "onnx_translations", lambda: translations)
    assert main(["export", str(cli_saved), "--out", str(tmp_path / "bad.onnx")]) == 2  # validated by default
    assert re.search(r"error: ONNX validation failed .* output '\w+' differs from PyTorch by [\d.e-]+ at "
                     r"most .*tolerance .* validate=False \(CLI --no-validate\)", capsys.readouterr().err)
    assert main(["export", str(cli_saved), "--out", str(tmp_path / "unchecked.onnx"), "--no-validate"]) == 0
    assert "not validated" in capsys.readouterr().out and (tmp_path / "unchecked.onnx").exists()


def test_cli_compile_of_a_saved_folder_or_a_hf_folder_says_what_to_do(cli_saved, tmp_path, capsys):
    """A folder given as the model: a saved compiled model names its source and the commands that take
    the folder; a folder with a config.json is pointed to hf:PATH."""
    out = str(tmp_path / "o")
    assert main(["compile", str(cli_saved), "--config", "nm-2-4", "--out", out, "--quiet"]) != 0
    err = capsys.readouterr().err
    assert "compiled model saved by sparsegraph" in err
    assert "sparsegraph compile zoo:explicit_attention" in err
    assert f"sparsegraph bench {cli_saved}" in err
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert main(["compile", str(tmp_path / "hf"), "--out", out, "--quiet"]) != 0
    assert f"name it hf:{tmp_path / 'hf'}" in capsys.readouterr().err
