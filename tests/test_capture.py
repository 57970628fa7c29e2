"""Capture and site queries: exact site counts on every zoo model, traced == eager, clear failures."""

import pytest
import torch

import sparsegraph as sg
from sparsegraph import ir, models

# name: (attention sites, MLP sites, heads, kv_heads, head_dim, gated, causal, form)
EXPECTED = {
    "minilm": (6, 6, 12, 12, 32, False, False, "sdpa"),
    "explicit_attention": (3, 3, 4, 4, 32, False, False, "explicit"),
    "vit_b_16": (12, 12, 12, 12, 64, False, False, "sdpa"),
    "vit_small": (12, 12, 6, 6, 64, False, False, "sdpa"),
    "llama_tiny": (4, 4, 8, 2, 32, True, True, "sdpa"),
    "resnet50": (0, 0, None, None, None, None, None, None),
}
HIDDEN = {"minilm": (384, 1536), "explicit_attention": (128, 512), "vit_b_16": (768, 3072),
          "vit_small": (384, 1536), "llama_tiny": (256, None)}


def _check_sites(name):
    model, example = models.load(name)
    gm = sg.trace(model, example)
    n_attn, n_mlp, heads, kv, head_dim, gated, causal, form = EXPECTED[name]
    attn, mlp = ir.attention_sites(gm), ir.mlp_sites(gm)
    assert (len(attn), len(mlp)) == (n_attn, n_mlp)
    assert [s.layer for s in attn] == list(range(n_attn)) and [s.layer for s in mlp] == list(range(n_mlp))
    for s in attn:
        assert (s.heads, s.kv_heads, s.head_dim, s.causal, s.form) == (heads, kv, head_dim, causal, form)
        assert s.q is not None and s.k is not None and s.v is not None and s.out is not None and s.module_path
    for s in mlp:
        assert s.gated == gated and s.module_path and s.down is not None
        hidden, inter = HIDDEN[name]
        assert s.hidden == hidden and (inter is None or s.intermediate == inter)
    with torch.no_grad():
        for got, want in zip(*(torch.utils._pytree.tree_leaves(t) for t in (gm(*example), model(*example)))):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    return gm


@pytest.mark.parametrize("name", ["minilm", "explicit_attention"])
def test_site_counts(name):
    _check_sites(name)


@pytest.mark.slow
@pytest.mark.ci
@pytest.mark.parametrize("name", ["vit_b_16", "llama_tiny"])
def test_site_counts_heavy_ci(name):
    gm = _check_sites(name)
    if name == "llama_tiny":
        assert all(s.gqa for s in ir.attention_sites(gm))
        assert all(s.activation == "silu" for s in ir.mlp_sites(gm))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_small", "resnet50"])
def test_site_counts_heavy(name):
    _check_sites(name)


def test_meta_marks_every_site_node_and_networkx_view():
    model, example = models.load("explicit_attention")
    gm = sg.trace(model, example)
    roles = {sg.meta.get(n).role for n in gm.graph.nodes if sg.meta.get(n) is not None}
    assert {"attn.q", "attn.k", "attn.v", "attn.out", "mlp.up", "mlp.act", "mlp.down"} <= roles
    g = ir.to_networkx(gm)
    assert g.number_of_nodes() == len(gm.graph.nodes)
    assert g.number_of_edges() == sum(len(n.users) for n in gm.graph.nodes)


def test_dynamic_batch_and_sequence():
    model, example = models.load("minilm")
    gm = sg.trace(model, example)
    for batch, seq in ((1, 7), (3, 40)):
        _, other = models.load("minilm", seq_len=seq, batch=batch)
        with torch.no_grad():
            torch.testing.assert_close(gm(*other), model(*other), rtol=0, atol=1e-6)


def test_model_left_as_it_came():
    model, example = models.load("explicit_attention")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sg.trace(model, example)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_untraceable_model_gets_a_clear_error():
    class Untraceable(torch.nn.Module):
        def forward(self, x):
            steps = int(x.sum().item() * 1000) % 5  # a Python int from data: no graph can hold it
            for _ in range(steps):
                x = x * 2
            return torch.tensor([float(v) for v in x.flatten().tolist()])

    with pytest.raises(sg.TraceError) as err:
        sg.trace(Untraceable(), (torch.randn(2, 3),))
    message = str(err.value)
    assert "torch.export" in message and "symbolic_trace" in message
    assert "try" in message.lower()


def test_non_module_is_refused():
    with pytest.raises(sg.TraceError, match=r"expected a torch\.nn\.Module"):
        sg.trace(lambda x: x, (torch.randn(2),))
