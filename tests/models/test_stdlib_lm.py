"""The ``stdlib_lm`` fixture: shipped weights and tokenizer load offline, the model is trained (its held-out
perplexity is far below a random-init model's of the same shape), greedy generation gives text, the
split is by module, and loading leaves the caller's random state alone."""

from __future__ import annotations

import string

import pytest
import torch

from sparsegraph import models
from sparsegraph.models import stdlib_lm as lm

# Perplexity on the first 8 held-out windows of 128 tokens: the shipped model measures 191.7 there, a
# random-init model of the same shape 4572 (the vocabulary is 4096), the unigram baseline 975.
SLICE = dict(length=128, count=8)
BOUND = 300.0


@pytest.fixture(scope="module")
def shipped():
    return lm.load()


def test_load_returns_the_hf_lm_in_eval_fp32_with_heldout_example(shipped):
    from transformers import LlamaForCausalLM

    model, (ids,) = shipped
    assert type(model) is LlamaForCausalLM and not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config.use_cache is True
    assert model.config.bos_token_id == model.config.eos_token_id == 0
    assert ids.shape == (1, 64) and ids.dtype == torch.int64
    assert torch.equal(ids, lm.heldout_ids(64, 1))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as trained


def test_parameter_count(shipped):
    model, _ = shipped
    assert 10e6 <= sum(p.numel() for p in model.parameters()) <= 30e6


def test_zoo_registers_stdlib_lm():
    model, (ids,) = models.load("stdlib_lm", seq_len=32, batch=2)
    assert ids.shape == (2, 32)
    assert model.config.model_type == "llama"


def test_trained_perplexity_is_far_below_a_random_init_model(shipped):
    from transformers import LlamaConfig, LlamaForCausalLM

    model, _ = shipped
    trained = lm.perplexity(model, **SLICE)
    random_init = lm.perplexity(models.seeded(lambda: LlamaForCausalLM(LlamaConfig(**lm.CONFIG))), **SLICE)
    assert trained < BOUND < random_init / 10, (trained, random_init)


def test_perplexity_takes_a_callable_returning_logits(shipped):
    model, _ = shipped
    small = dict(length=32, count=4)
    direct = lm.perplexity(model, **small)
    assert lm.perplexity(lambda ids: model(ids, use_cache=False).logits, **small) == pytest.approx(direct)
    assert lm.perplexity(lambda ids: (model(ids).logits,), **small) == pytest.approx(direct)


def test_a_dense_compiled_model_scores_the_same(shipped):
    import sparsegraph as sg

    model, example = shipped
    compiled = sg.compile(model, "dense", example_inputs=example, quiet=True)
    small = dict(length=64, count=4)
    assert lm.perplexity(compiled, **small) == pytest.approx(lm.perplexity(model, **small), rel=1e-4)


@pytest.mark.slow  # generates 6 s of tokens
@pytest.mark.ci
def test_greedy_generation_gives_printable_text(shipped):
    model, _ = shipped
    text = lm.complete(model, "Return the number of", new_tokens=12)
    assert text.strip() and all(c in string.printable for c in text), repr(text)
    again = lm.complete(model, "Return the number of", new_tokens=12)
    assert text == again


def test_tokenizer_round_trips_and_prepends_endoftext(shipped):
    model, _ = shipped
    tok = model.tokenizer
    text = "Return a new sorted list from the items in iterable.\n  Ünïcode too: λ → ∞"
    ids = tok(text)["input_ids"]
    assert ids[0] == 0 and 0 not in ids[1:]
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok) == lm.VOCAB


def test_load_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    lm.load(seq_len=16)
    assert torch.equal(torch.get_rng_state(), state)


def test_heldout_windows_are_fixed_and_come_from_heldout_modules():
    a, b = lm.heldout_ids(32, 5), lm.heldout_ids(32, 5)
    assert torch.equal(a, b) and a.shape == (5, 32)
    a.zero_()  # callers get copies
    assert lm.heldout_ids(32, 5).sum() > 0
    assert "typing" in lm.heldout_modules() and "email" not in lm.heldout_modules()
    with pytest.raises(ValueError, match="windows"):
        lm.heldout_ids(128, 10**6)


def test_missing_weights_error_says_how_to_rebuild(monkeypatch, tmp_path):
    monkeypatch.setattr(lm, "WEIGHTS", tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match=r"python -m sparsegraph\.models\.stdlib_lm"):
        lm.load()


@pytest.mark.slow
def test_train_and_heldout_documents_are_disjoint_by_module():
    train, heldout = lm.documents("train"), lm.documents("heldout")
    assert not set(train) & set(heldout)
    assert 0.05 < sum(map(len, heldout)) / sum(map(len, train + heldout)) < 0.15


@pytest.mark.slow
def test_retraining_reproduces_the_shipped_perplexity(shipped):
    # the whole recipe: about a quarter of an hour on 2 cores (see the module docstring)
    model, _ = shipped
    threads = torch.get_num_threads()
    retrained = lm.train()
    assert torch.get_num_threads() == threads
    assert lm.perplexity(retrained) == pytest.approx(lm.perplexity(model), rel=0.02)
