"""Generation through the static-cache graphs (`sparsegraph.generation`): token identity with Hugging
Face ``generate`` for every architecture, the plan replayed on the prefill and decode-step graphs (same
site ids and fingerprint), sparse decode steps against the reference op, and the errors a caller gets
for a request the cache cannot hold.

Small random-init configs (2 layers, hidden 64, from test_causal_lms): structure and exactness."""

from __future__ import annotations

import collections

import pytest
import torch
from test_causal_lms import _lm

import sparsegraph as sg
from sparsegraph import ir
from sparsegraph.codegen import use_backend
from sparsegraph.errors import InputError, PlanError
from sparsegraph.generation import Decoder

# heavy for the default run (kept under 6 minutes on 2 cores): CI runs these after it
pytestmark = [pytest.mark.slow, pytest.mark.ci]

# Llama in CI (its compile is shared with the other tests); every architecture with -m slow (extended).
ARCHS = [a if a == "llama" else pytest.param(a, marks=[pytest.mark.slow, pytest.mark.extended])
         for a in ("llama", "qwen2", "mistral", "phi3", "gemma", "gemma2", "gpt2", "opt")]
NEW = 10


def _prompt(batch=2, length=8, pad=3, seed=3):
    ids = torch.randint(1, 256, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, :pad] = 0  # the last row left-padded
    return ids, mask


def _compile(arch, config="dense", **kwargs):
    model = _lm(arch)
    ids, _ = _prompt()
    return model, sg.compile(model, config, example_inputs=(ids,), quiet=True, **kwargs)


@pytest.fixture(scope="module")
def llama():
    """The dense llama compile, shared (its decoder graphs are built once)."""
    return _compile("llama")


@pytest.fixture(scope="module")
def teal_llama():
    return _compile("llama", TEAL, calibration=_calibration())


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_are_identical_to_hugging_face_generate(arch, request):
    model, cm = request.getfixturevalue("llama") if arch == "llama" else _compile(arch)
    ids, mask = _prompt()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    got = cm.generate(ids, mask, max_new_tokens=NEW, pad_token_id=0)
    assert torch.equal(got, expected)
    # batch 1 and another prompt length run on the same two graphs (dynamic batch, prompt and cache)
    one = ids[:1, 2:]
    expected = model.generate(one, max_new_tokens=NEW + 3, do_sample=False, pad_token_id=0)
    assert torch.equal(cm.generate(one, max_new_tokens=NEW + 3), expected)
    assert model.config.use_cache is True


def test_teacher_forcing_through_the_cache_graphs_gives_the_models_logits(llama):
    model, cm = llama
    ids, _ = _prompt(length=12, pad=0)
    with torch.no_grad():
        expected = model(ids).logits
    got = cm.decoder().teacher_forced(ids, prompt=4)  # 4 prefilled, 8 decode steps
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError, match="prompt must be in 1 … 12"):
        cm.decoder().teacher_forced(ids, prompt=13)


def test_the_cache_graphs_keep_no_identity_calls(llama):
    """torch.export's dtype assertions, whole-axis slices, same-dtype `to` and ×1 are gone from the decode
    graphs (each one a Python-level call per token); the token identity above shows nothing changed."""
    _, cm = llama
    for graph in (cm.decoder().prefill, cm.decoder().step):
        targets = [n.target for n in graph.graph.nodes if n.op == "call_function"]
        assert torch.ops.aten._assert_tensor_metadata.default not in targets
        for n in graph.graph.nodes:
            if n.target is torch.ops.aten.slice.Tensor:
                assert n.args[2:4] != (0, 9223372036854775807)
            if n.target is torch.ops.aten.to.dtype:
                assert ir.val(n).dtype != ir.val(n.args[0]).dtype
            if n.target is torch.ops.aten.mul.Tensor:
                assert n.args[1] != 1


def test_eos_ends_rows_with_padding_as_hugging_face_does(llama):
    model, cm = llama
    ids, mask = _prompt()
    free = cm.generate(ids, mask, max_new_tokens=NEW)
    eos = int(free[0, ids.shape[1] + 2])  # a token row 0 emits third
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=eos,
                              pad_token_id=255)
    got = cm.generate(ids, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=255)
    assert torch.equal(got, expected)
    assert (got[0, ids.shape[1] + 3:] == 255).all()


def test_sampling_is_seeded_and_top_k_1_is_greedy(llama):
    _, cm = llama
    ids, mask = _prompt()
    draw = [cm.generate(ids, mask, max_new_tokens=NEW, do_sample=True, temperature=0.8, top_k=5,
                        generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(*draw)
    greedy = cm.generate(ids, mask, max_new_tokens=NEW)
    top1 = cm.generate(ids, mask, max_new_tokens=NEW, do_sample=True, top_k=1,
                       generator=torch.Generator().manual_seed(7))
    assert torch.equal(top1, greedy)
    stats = cm.decoder().last
    assert (stats.batch, stats.prompt_tokens, stats.new_tokens) == (2, 8, NEW) and stats.tokens_per_s > 0


def test_a_request_the_cache_cannot_hold_is_refused_before_anything_runs(llama):
    _, cm = llama
    ids, mask = _prompt()
    with pytest.raises(InputError, match=r"holds 12 tokens but the prompt \(8\) plus max_new_tokens \(10\) "
                                         r"need 18: raise max_len"):
        cm.generate(ids, mask, max_new_tokens=10, max_len=12)
    with pytest.raises(InputError, match="the model has positions for 128"):
        cm.generate(ids, mask, max_new_tokens=200)
    right = mask.flip(-1)
    with pytest.raises(InputError, match="padded on the left"):
        cm.generate(ids, right, max_new_tokens=2)
    with pytest.raises(InputError, match="max_new_tokens must be at least 1"):
        cm.generate(ids, mask, max_new_tokens=0)


def test_generate_needs_a_causal_lm():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    cm = sg.compile(model, "dense", example_inputs=(torch.randn(2, 4),), quiet=True)
    with pytest.raises(InputError, match="generate needs a Hugging Face causal LM"):
        cm.generate(torch.zeros(1, 4, dtype=torch.long))


TEAL = {"passes": [{"activation_profile": {"inputs": True, "attention": True}},
                   {"neuron_sparsity": {"target": 0.5, "method": "magnitude", "inputs": True,
                                        "attention": True}}]}


def _calibration(batches=3):
    g = torch.Generator().manual_seed(11)
    return [torch.randint(1, 256, (2, 16), generator=g) for _ in range(batches)]


def _ops(gm):
    return collections.Counter(str(n.target) for n in gm.graph.nodes if "sparsegraph" in str(n.target))


def test_the_plan_replays_on_both_cache_graphs_with_the_same_sites(teal_llama):
    _, cm = teal_llama
    decoder = cm.decoder()
    ids = [s.id for s in ir.sites(cm.graph_module)]
    for graph in (decoder.prefill, decoder.step):
        assert [s.id for s in ir.sites(graph)] == ids  # not prefixed by the wrapper
        # q/k/v as one op, o, gate/up as one op, down: 4 per layer, as in the full-sequence graph
        assert _ops(graph) == _ops(cm.graph_module) == {"sparsegraph.sparse_linear.default": 8}
    # the step graph reads the full graph's thresholds and its added weights are the prefill graph's
    shared = dict(decoder.prefill.named_buffers())
    assert all(t is shared[n] for n, t in decoder.step.named_buffers() if n.startswith("sg_"))


def test_a_plan_for_another_model_is_refused_by_the_cache_graphs(teal_llama):
    _, cm = teal_llama
    other = _lm("qwen2")  # same sizes, other parameter names (q/k/v biases)
    with pytest.raises(PlanError, match="this plan was made for a different model"):
        Decoder(other, cm.config, cm.plan, "Qwen2ForCausalLM")


def test_sparse_decode_steps_match_the_reference_op_and_target_0_is_dense(teal_llama):
    model, cm = teal_llama
    ids, mask = _prompt()
    eager = cm.generate(ids, mask, max_new_tokens=NEW)
    with use_backend("reference"):
        reference = cm.decoder().generate(ids, mask, max_new_tokens=NEW)
    assert torch.equal(eager, reference)
    step_logits = _step_logits(cm, ids, mask)
    with use_backend("reference"):
        torch.testing.assert_close(_step_logits(cm, ids, mask), step_logits, rtol=1e-5, atol=1e-5)

    zero = {"passes": [TEAL["passes"][0], {"neuron_sparsity": {**TEAL["passes"][1]["neuron_sparsity"],
                                                                "target": 0.0}}]}
    _, dense = _compile("llama", zero, calibration=_calibration())
    assert not _ops(dense.decoder().step)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    assert torch.equal(dense.generate(ids, mask, max_new_tokens=NEW, pad_token_id=0), expected)


@pytest.mark.slow
@pytest.mark.ci
def test_onnx_decoding_matches_pytorch(teal_llama, tmp_path):
    """The prefill and step files (cache in, cache out) run in onnxruntime within 1e-4 of PyTorch and a
    Python loop over them gives the same greedy tokens."""
    model, cm = teal_llama
    ids, mask = _prompt()
    paths = cm.decoder().export_onnx(tmp_path)
    assert sorted(p.name for p in paths.values()) == ["prefill.onnx", "step.onnx"]
    onnx_cm = sg.compile(model, {**TEAL, "backend": "onnx"}, plan=cm.plan, example_inputs=(ids,), quiet=True)
    torch.testing.assert_close(_step_logits(onnx_cm, ids, mask), _step_logits(cm, ids, mask), rtol=0,
                               atol=1e-4)
    expected = cm.generate(ids, mask, max_new_tokens=NEW)
    assert torch.equal(onnx_cm.generate(ids, mask, max_new_tokens=NEW), expected)


def _step_logits(cm, ids, mask):
    """The logits of one decode step after the prompt, through the compiled graphs."""
    d = cm.decoder()
    cache = d.shape.allocate(ids.shape[0], ids.shape[1] + 1)
    slots = torch.zeros(ids.shape[0], ids.shape[1] + 1, dtype=torch.long)
    slots[:, :-1] = mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        _, cache = d.run("prefill", ids, positions, slots, 0, cache)
        slots[:, -1] = 1
        return d.run("step", ids[:, -1:], positions[:, -1:] + 1, slots, ids.shape[1], cache)[0]


def test_sequence_level_rewrites_run_dense_in_generation_with_a_warning():
    config = {"passes": [{"head_patterns": {"recall": 0.9, "block": 4}}, "sparse_attention"]}
    model, cm = _compile("llama", config, calibration=_calibration())
    ids, mask = _prompt()
    with pytest.warns(UserWarning, match=r"passes \['sparse_attention'\] rewrite whole sequences"):
        got = cm.generate(ids, mask, max_new_tokens=NEW, pad_token_id=0)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    assert torch.equal(got, expected)


def tiny_llama():
    """A CLI model factory (``test_generation:tiny_llama``): the small Llama without a tokenizer."""
    return _lm("llama"), (_prompt()[0][:1],)


def test_cli_generate_prints_the_tokens_and_the_rate(capsys):
    from sparsegraph import cli

    model, _ = tiny_llama()
    prompt = [5, 6, 7, 8]
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert cli.main(["generate", "test_generation:tiny_llama", "--config", "dense", "--prompt-ids", "5 6 7 8",
                     "--max-new-tokens", "6"]) == 0
    text, timing = capsys.readouterr().out.strip().splitlines()
    assert text.split() == [str(t) for t in expected[0, 4:].tolist()]
    assert "6 tokens; prompt 4 tokens in" in timing and "tokens/s" in timing and "ms/token" in timing

    assert cli.main(["generate", "test_generation:tiny_llama", "--prompt", "hello"]) == 2
    err = capsys.readouterr().err
    assert "comes without a tokenizer, so --prompt cannot be read: give --prompt-ids" in err
