"""ONNX export: the file passes onnx.checker and matches PyTorch in onnxruntime within 1e-4,
at the example shapes and at other batch sizes and sequence lengths (dynamic axes)."""

import pytest
import torch

import sparsegraph as sg
from sparsegraph import models
from sparsegraph.onnx_export import OnnxModel

ATOL = 1e-4


def _other_shape(name, example):
    """Inputs with another batch size (and sequence length for text models)."""
    if name in ("vit_b_16", "resnet50"):
        return (torch.randn(3, *example[0].shape[1:], generator=torch.Generator().manual_seed(1)),)
    if name == "minilm":
        return models.load("minilm", seq_len=40, batch=3)[1]
    return models.load(name, seq_len=24, batch=3)[1]


def _check(name, tmp_path, pipeline="dense"):
    model, example = models.load(name)
    cm = sg.compile(model, pipeline, example_inputs=example, quiet=True)
    path = cm.export_onnx(tmp_path / f"{name}.onnx")
    ort = OnnxModel(path, cm.graph_module)
    for inputs in (example, _other_shape(name, example)):
        with torch.no_grad():
            expected = cm(*inputs)
        got = ort(*inputs)
        for g, e in zip(*(torch.utils._pytree.tree_leaves(t) for t in (got, expected))):
            assert g.shape == e.shape
            torch.testing.assert_close(g, e, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", [pytest.param("minilm", marks=[pytest.mark.slow, pytest.mark.ci]),  # ~11 s
                                  "explicit_attention"])
def test_onnx_matches_pytorch(name, tmp_path):
    _check(name, tmp_path)


def test_sparse_graph_exports_with_our_translation(tmp_path):
    _check("explicit_attention", tmp_path, pipeline="nm-2-4")


@pytest.mark.slow
@pytest.mark.ci
@pytest.mark.parametrize("name", ["vit_b_16", "llama_tiny"])
def test_onnx_matches_pytorch_heavy_ci(name, tmp_path):
    _check(name, tmp_path)


@pytest.mark.slow
def test_onnx_matches_pytorch_resnet50(tmp_path):
    _check("resnet50", tmp_path)


def test_unexportable_graph_gets_a_clear_error(tmp_path):
    @torch.library.custom_op("sgtest::no_onnx", mutates_args=())
    def no_onnx(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    no_onnx.register_fake(lambda x: torch.empty_like(x))

    class Unexportable(torch.nn.Module):
        def forward(self, x):
            return no_onnx(x)  # a custom op with no ONNX translation

    cm = sg.compile(Unexportable(), "dense", example_inputs=(torch.randn(2, 8),), quiet=True)
    with pytest.raises(sg.ExportError, match=r"ONNX export failed.*add one to its codegen module"):
        cm.export_onnx(tmp_path / "x.onnx")
