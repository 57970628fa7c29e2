"""sparse_attention: structure, numerics (CPU vs reference op), counts and refusals, plan replay, ORT
parity."""

import pytest
import torch

import sparsegraph as sg
from sparsegraph import attention_layouts, ir, models
from sparsegraph.codegen import use_backend
from sparsegraph.codegen.block_sparse_attention import OP
from sparsegraph.onnx_export import OnnxModel

# random-init models attend diffusely: a low recall and no minimum saving make their heads sparse
SPARSE = {"passes": [{"head_patterns": {"block": 16, "recall": 0.5, "min_saving": 0.0}},
                     {"sparse_attention": {"max_density": 1.0}}]}


def _ops(cm):
    return [n for n in cm.graph_module.graph.nodes if n.target is OP.overload]


def _run(cm, backend, *args):
    with torch.no_grad(), use_backend(backend):
        return cm.graph_module(*args)


@pytest.fixture(scope="module")
def explicit_sparse():
    model, example = models.load("explicit_attention")
    g = torch.Generator().manual_seed(1)
    batches = []
    for i in range(3):
        ids = torch.randint(0, 1000, (2, 64), generator=g)
        mask = torch.ones_like(ids)
        if i == 2:
            mask[1, 40:] = 0
        batches.append((ids, mask))
    return model, example, batches, sg.compile(model, SPARSE, example_inputs=example, calibration=batches,
                                               quiet=True)


def test_explicit_sites_become_the_op(explicit_sparse):
    _model, _example, _, cm = explicit_sparse
    ops = _ops(cm)
    assert len(ops) == 3
    assert not any(ir.kind(n) == "softmax" for n in cm.graph_module.graph.nodes)
    for node in ops:
        q, k, _v, layout, mask, block, causal, scale = node.args
        assert block == 16 and causal is False and scale == pytest.approx(32 ** -0.5)
        assert mask is not None and ir.shape(k) == ir.shape(q)  # kᵀ transposed back; padding mask kept
        assert ir.shape(layout)[0] == 4  # a layout table per head, laid out at each call's length
        table = ir.get_attr(cm.graph_module, layout.target)
        assert attention_layouts.layout(table, 4, 4, False).shape[:2] == (4, 4)
    stats = cm.plan.passes["sparse_attention"]["stats"]
    assert (stats["matched"], stats["rewritten"], stats["refused"]) == (3, 3, [])
    assert stats["counters"]["sparse_heads"] == 12


def test_explicit_cpu_kernel_matches_reference_and_sparsity_changes_output(explicit_sparse):
    model, example, _, cm = explicit_sparse
    ids, mask = example
    mask = mask.clone()
    mask[0, 50:] = 0  # a padded row at run time
    eager, reference = _run(cm, "eager", ids, mask), _run(cm, "reference", ids, mask)
    torch.testing.assert_close(eager, reference, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        dense = model(ids, mask)
    assert (eager - dense).abs().max() > 1e-3  # blocks were really dropped (recall 0.5)


def test_dense_heads_are_refused_with_a_reason_and_the_model_is_unchanged(explicit_calibrated):
    model, example, batches = explicit_calibrated
    batches = [b for b in batches if b[0].shape[1] == example[0].shape[1]] or batches
    config = {"passes": [{"head_patterns": {"block": 16, "recall": 1.0}}, {"sparse_attention": {}}]}
    cm = sg.compile(model, config, example_inputs=example, calibration=batches, quiet=True)
    stats = cm.plan.passes["sparse_attention"]["stats"]
    assert stats["rewritten"] == 0 and len(stats["refused"]) == 3
    assert all("dense" in r["reason"] for r in stats["refused"])
    with torch.no_grad():
        torch.testing.assert_close(cm(*example), model(*example), rtol=0, atol=0)


def test_plan_replays_without_calibration(explicit_sparse, tmp_path):
    model, example, _, cm = explicit_sparse
    cm.plan.save(tmp_path / "plan.json")
    again = sg.compile(model, plan=tmp_path / "plan.json", example_inputs=example, quiet=True)
    assert len(_ops(again)) == 3
    torch.testing.assert_close(_run(again, "eager", *example), _run(cm, "eager", *example), rtol=0, atol=0)


LENGTHS = (16, 40, 64, 100, 129)  # below, at (64), above, and not multiples of the block (16)


@pytest.fixture(scope="module")
def explicit_onnx(explicit_sparse, tmp_path_factory):
    """The sparse explicit-attention model exported once, in onnxruntime."""
    cm = explicit_sparse[3]
    return OnnxModel(cm.export_onnx(tmp_path_factory.mktemp("onnx") / "explicit.onnx"), cm.graph_module)


def test_one_compiled_model_runs_at_every_length_in_pytorch_and_onnx(explicit_sparse, explicit_onnx):
    """Calibrated and traced at 64 tokens; at every length eager matches the reference op and ORT, and
    the heads stay sparse (the output is not the dense one) wherever there is more than one block."""
    model, _, _, cm = explicit_sparse
    onnx_model = explicit_onnx
    g = torch.Generator().manual_seed(7)
    for L in LENGTHS:
        ids = torch.randint(0, 1000, (2, L), generator=g)
        mask = torch.ones_like(ids)
        mask[1, L // 2:] = 0
        eager = _run(cm, "eager", ids, mask)
        torch.testing.assert_close(eager, _run(cm, "reference", ids, mask), rtol=1e-5, atol=1e-5,
                                   msg=f"L={L}")
        torch.testing.assert_close(onnx_model(ids, mask), eager, rtol=1e-4, atol=1e-4, msg=f"L={L}")
        with torch.no_grad():
            dense = model(ids, mask)
        if L > 16:
            assert (eager - dense).abs().max() > 1e-3, f"L={L}: no block was dropped"
        else:  # one block: every pattern lists it
            torch.testing.assert_close(eager, dense, rtol=1e-5, atol=1e-5)


def test_a_plan_replays_at_another_traced_length(explicit_sparse, tmp_path):
    """A plan made at 64 tokens, replayed with a 40-token example: compiles and runs on its own example."""
    model, _, _, cm = explicit_sparse
    cm.plan.save(tmp_path / "plan.json")
    ids = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(3))
    again = sg.compile(model, plan=tmp_path / "plan.json", example_inputs=(ids, torch.ones_like(ids)),
                       quiet=True)
    assert len(_ops(again)) == 3
    torch.testing.assert_close(_run(again, "eager", ids, torch.ones_like(ids)),
                               _run(cm, "eager", ids, torch.ones_like(ids)), rtol=0, atol=0)


def test_block_topk_heads_are_length_bound_and_run_dense_elsewhere_with_a_warning(explicit_calibrated):
    from sparsegraph.attention_layouts import LayoutWarning

    model, example, batches = explicit_calibrated
    config = {"passes": [{"head_patterns": {"block": 16, "recall": 0.5, "min_saving": 0.0,
                                            "patterns": ["dense", "block_topk"]}},
                         {"sparse_attention": {"max_density": 1.0}}]}
    cm = sg.compile(model, config, example_inputs=example, calibration=batches, quiet=True)
    stats = cm.plan.passes["sparse_attention"]["stats"]
    assert stats["counters"]["length_bound_heads"] == stats["counters"]["sparse_heads"] == 12
    site = next(s for s in cm.plan.sites if "sparse_attention" in cm.plan.sites[s])
    assert cm.plan.sites[site]["sparse_attention"]["evidence"]["length_bound"] == [0, 1, 2, 3]
    ids = torch.randint(0, 1000, (2, 80), generator=torch.Generator().manual_seed(4))  # 5 blocks, fitted at 3
    with pytest.warns(LayoutWarning, match="run dense"):
        out = _run(cm, "eager", ids, torch.ones_like(ids))
    with torch.no_grad():
        torch.testing.assert_close(out, model(ids, torch.ones_like(ids)), rtol=1e-5, atol=1e-5)


def test_explicit_onnx_matches_in_onnxruntime(explicit_sparse, explicit_onnx):
    _, example, _, cm = explicit_sparse
    ids, mask = example
    mask = mask.clone()
    mask[1, 48:] = 0
    got = explicit_onnx(ids, mask)
    torch.testing.assert_close(got, _run(cm, "reference", ids, mask), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def llama_sparse():
    model, example = models.load("llama_tiny")
    L = example[0].shape[1]
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randint(0, 1000, (2, L), generator=g),) for _ in range(3)]
    return model, example, sg.compile(model, SPARSE, example_inputs=example, calibration=batches, quiet=True)


@pytest.mark.slow
@pytest.mark.ci
def test_llama_gqa_causal_sites_become_the_op(llama_sparse):
    model, example, cm = llama_sparse
    ops = _ops(cm)
    stats = cm.plan.passes["sparse_attention"]["stats"]
    assert (len(ops) == stats["rewritten"] == stats["matched"]
            == len(ir.attention_sites(sg.trace(model, example))))
    assert all(n.args[6] is True for n in ops)  # causal
    site = next(iter(s for s in cm.plan.sites if cm.plan.evidence("head_patterns", s)))
    assert cm.plan.evidence("head_patterns", site)["causal"] is True
    torch.testing.assert_close(_run(cm, "eager", *example), _run(cm, "reference", *example), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.slow
@pytest.mark.ci
def test_llama_onnx_matches_in_onnxruntime(llama_sparse, tmp_path):
    _, example, cm = llama_sparse
    path = cm.export_onnx(tmp_path / "llama.onnx")
    got = OnnxModel(path, cm.graph_module)(*example)
    want = _run(cm, "reference", *example)
    got, want = (x if isinstance(x, torch.Tensor) else x[0] for x in (got, want))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


class _SDPA(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("form", ["sdpa", "explicit"])
def test_dynamic_heads_become_the_dynamic_op_and_follow_each_input(moving_heads, explicit_chain, form,
                                                                   tmp_path):
    from sparsegraph.codegen import dynamic_block_sparse_attention as dyn

    batches = [moving_heads(2, seed) for seed in range(4)]
    model = _SDPA() if form == "sdpa" else explicit_chain(padded=4)
    config = {"passes": [{"head_patterns": {"block": 16}}, {"sparse_attention": {}}]}
    cm = sg.compile(model, config, example_inputs=batches[0], calibration=batches, quiet=True)
    nodes = [n for n in cm.graph_module.graph.nodes if n.target is dyn.OP.overload]
    assert len(nodes) == 1 and not _ops(cm)
    assert cm.plan.passes["sparse_attention"]["stats"]["rewritten"] == 1
    topk = ir.get_attr(cm.graph_module, nodes[0].args[4].target)
    assert topk.tolist() == [2]
    held_out = moving_heads(3, seed=9)  # permutations it never saw
    dense = model(*held_out)
    out = _run(cm, "eager", *held_out)
    torch.testing.assert_close(out, _run(cm, "reference", *held_out), rtol=1e-5, atol=1e-5)
    assert torch.nn.functional.cosine_similarity(out.flatten(), dense.flatten(), dim=0) > 0.99
    path = cm.export_onnx(tmp_path / "dyn.onnx")
    torch.testing.assert_close(OnnxModel(path, cm.graph_module)(*held_out), out, rtol=1e-4, atol=1e-4)
