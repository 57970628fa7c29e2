"""Capture (`sparsegraph.trace`): traced == eager on every zoo model, dynamic batch and sequence, the
user's model left as it came, and clear `TraceError`s for what cannot be captured."""

import warnings

import pytest
import torch
from torch.utils import _pytree as pytree

import sparsegraph as sg
from sparsegraph import ir
from sparsegraph.models.minilm import EXAMPLE_SENTENCES

# The traced graph runs the same ATen ops as eager; only reassociation noise is tolerated.
TOL = {"rtol": 1e-6, "atol": 1e-6}

HEAVY_CI = [pytest.mark.slow, pytest.mark.ci]


def assert_same_outputs(got, want):
    got_leaves, want_leaves = pytree.tree_leaves(got), pytree.tree_leaves(want)
    assert len(got_leaves) == len(want_leaves) > 0
    for g, w in zip(got_leaves, want_leaves):
        torch.testing.assert_close(g, w, **TOL)


@pytest.mark.parametrize("name", [
    "explicit_attention",
    "minilm",
    pytest.param("vit_b_16", marks=HEAVY_CI),
    pytest.param("llama_tiny", marks=HEAVY_CI),
    pytest.param("vit_small", marks=pytest.mark.slow),
    pytest.param("resnet50", marks=pytest.mark.slow),
])
def test_traced_graph_matches_eager(zoo, name):
    model, example, gm = zoo(name)
    assert isinstance(gm, torch.fx.GraphModule)
    with torch.no_grad():
        assert_same_outputs(gm(*example), model(*example))


def test_traced_graph_records_example_shapes(explicit):
    model, example, gm = explicit
    output = next(n for n in gm.graph.nodes if n.op == "output")
    (result,) = pytree.tree_leaves(output.args[0])
    with torch.no_grad():
        assert ir.shape(result) == tuple(model(*example).shape)
    computing = [n for n in gm.graph.nodes
                 if ir.kind(n) in ("linear", "matmul", "softmax", "gelu", "layer_norm")]
    # per block: 6 linears, 2 matmuls, softmax, gelu, 2 norms
    assert len(computing) == 3 * (6 + 2 + 1 + 1 + 2) + 1
    assert all(isinstance(ir.val(n), torch.Tensor) for n in computing)


def _explicit_inputs(batch: int, seq: int, pad_from: int | None = None):
    ids = torch.randint(0, 1000, (batch, seq), generator=torch.Generator().manual_seed(batch * 1000 + seq))
    mask = torch.ones_like(ids)
    if pad_from is not None:
        mask[-1, pad_from:] = 0
    return ids, mask


@pytest.mark.parametrize("batch,seq,pad_from", [(1, 9, None), (3, 100, 70)])
def test_explicit_attention_runs_at_other_batch_and_sequence(explicit, batch, seq, pad_from):
    model, example, gm = explicit
    inputs = _explicit_inputs(batch, seq, pad_from)
    assert inputs[0].shape != example[0].shape  # the traced example is (2, 64)
    with torch.no_grad():
        assert_same_outputs(gm(*inputs), model(*inputs))


@pytest.mark.parametrize("batch,pad_to", [(1, None), (3, 40)])
def test_minilm_runs_at_other_batch_and_sequence(minilm, batch, pad_to):
    model, example, gm = minilm
    sentences = [*EXAMPLE_SENTENCES, "Short one."][:batch] if batch > 1 else ["A single short sentence."]
    inputs = model.tokenize(sentences, pad_to=pad_to)
    assert inputs[0].shape != example[0].shape
    if pad_to is not None:
        assert not inputs[1].all()  # padded positions are masked out, so the mask path is exercised
    with torch.no_grad():
        assert_same_outputs(gm(*inputs), model(*inputs))


class DropoutNormNet(torch.nn.Module):
    """Behaves differently in train and eval mode (dropout, batch-norm statistics)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 8)
        self.norm = torch.nn.BatchNorm1d(8)
        self.drop = torch.nn.Dropout(0.5)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.drop(torch.relu(self.norm(self.lin(x)))))


def test_trace_leaves_the_model_as_it_came():
    torch.manual_seed(0)
    model = DropoutNormNet().train()
    model.head.eval()  # a mixed state must come back as it was, module by module
    flags = {name: m.training for name, m in model.named_modules()}
    params = dict(model.named_parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 6)

    gm = sg.trace(model, (x,))

    assert {name: m.training for name, m in model.named_modules()} == flags
    assert all(p is params[name] and p.requires_grad for name, p in model.named_parameters())
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():  # batch-norm running stats included
        assert torch.equal(after[key], value), key
    # the capture was made in eval mode: no dropout, running statistics
    with torch.no_grad():
        want = model.eval()(x)
    model.train()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), want, **TOL)


def test_model_that_refuses_export_falls_back_to_symbolic_trace():
    class NoExport(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.act, self.down = torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)

        def forward(self, x):
            if torch.compiler.is_exporting():
                raise RuntimeError("this model refuses torch.export")
            return self.down(self.act(self.up(x)))

    torch.manual_seed(0)
    model = NoExport().eval()
    gm = sg.trace(model, (torch.randn(3, 8),))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["up", "act", "down"]  # fx dialect
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), **TOL)


class Branchy(torch.nn.Module):
    """Branches on a tensor's value and pulls a Python number out of it: no graph can hold this."""

    def forward(self, x):
        if x.sum() > 0:
            print("positive:", x)
            return x * float(x.max().item())
        return -x


def test_untraceable_model_lists_each_attempt_and_what_to_try():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(sg.TraceError) as err:
            sg.trace(Branchy(), (torch.randn(2, 3),))
    message = str(err.value)
    assert message.startswith("could not capture Branchy into a graph.")
    for attempt in ("torch.export (dynamic batch/sequence): ", "torch.export (static shapes): ",
                    "torch.fx.symbolic_trace: "):
        assert f"  - {attempt}" in message
    assert "cannot be used as inputs to control flow" in message  # fx's own reason is kept
    assert "What to try:" in message
    assert "the model branches on tensor values" in message


def test_untraceable_output_type_gets_the_wrap_hint():
    class ReturnsAType(torch.nn.Module):
        def forward(self, x):
            return x * 2, object

    with pytest.raises(sg.TraceError) as err:
        sg.trace(ReturnsAType(), (torch.randn(2, 3),))
    message = str(err.value)
    assert message.count("  - torch.") == 3 and "symbolic_trace" in message
    assert "returns tensors only" in message


@pytest.mark.parametrize("not_a_module", [lambda x: x * 2, torch.relu, "model"],
                         ids=["lambda", "builtin", "string"])
def test_non_module_is_refused(not_a_module):
    with pytest.raises(sg.TraceError, match=r"^expected a torch\.nn\.Module, got \w+; wrap callables"):
        sg.trace(not_a_module, (torch.randn(2),))


def test_inputs_that_do_not_fit_forward_are_refused():
    with pytest.raises(sg.TraceError, match="the example inputs do not match the signature of forward"):
        sg.trace(DropoutNormNet(), (torch.randn(5, 6), torch.randn(5, 6)))


class PerSample(torch.nn.Module):
    """Mochi's attention in miniature: a loop over the batch, each sample keeping its unmasked tokens with
    ``nonzero`` (an output shape that depends on the data)."""

    def forward(self, x, mask):
        rows = [x[i][mask[i].nonzero().flatten()].sum(0) for i in range(x.shape[0])]
        return torch.stack(rows)


def test_a_loop_over_the_batch_is_traced_at_the_examples_batch():
    x, mask = torch.randn(1, 6, 4), torch.tensor([[1, 1, 0, 1, 0, 1]])
    with pytest.warns(UserWarning, match="fixes dimension 0 of input 'x' .*the example has 1"):
        gm = sg.trace(PerSample(), (x, mask))  # widened to batch 2, export fixed it there: traced at 1
    nonzero = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.nonzero.default)
    assert ir.shape(nonzero) == (4, 1)  # recorded from a real run: fake tensors cannot size it
    with torch.no_grad():
        assert_same_outputs(gm(x, mask), PerSample()(x, mask))
