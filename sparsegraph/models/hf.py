"""Local Hugging Face model directories as model sources: ``hf:PATH``. Nothing downloads (every load is
``local_files_only``).

The directory's ``config.json`` says what the model is. Its ``architectures`` entry is looked up in
transformers' auto mappings, in this order: causal LM, image classification, masked LM, sequence
classification, token classification; the matching Auto class loads it. A config that names no
architecture, or a base model (``BertModel``), loads with ``AutoModel``. What comes back:

- a task model (causal LM, classifier, masked LM): the model itself, so that what is compiled is what
  the user has; for a causal LM that is what `sparsegraph.compile` makes ``generate`` for;
- a sentence-transformers directory (``modules.json`` with a mean ``Pooling``): the
  `sparsegraph.models.minilm.SentenceEncoder` around the encoder (mean pooling, L2-normalised when the
  modules list ``Normalize``), the model zoo's MiniLM pipeline;
- any other base model: `HFEncoder`, called with ``(input_ids, attention_mask)``, returning the first
  output (the token states).

Text models (the config has a ``vocab_size``) take ``(input_ids, attention_mask)``: two English
sentences through the directory's tokenizer, or random ids (two rows of 16) when it has none. With a
tokenizer the model carries it as ``model.tokenizer`` and ``model.tokenize(texts, max_length, pad_to)``
(what the CLI's ``--data texts.txt`` and calibration read); a tokenizer without a padding token pads
with its end-of-text token, as causal-LM recipes do (one that cannot pad counts as none). Image models
(image classifiers, or configs with ``num_channels`` and no vocabulary) take one random image of the
config's ``image_size``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from sparsegraph.errors import ModelSpecError
from sparsegraph.models.minilm import EXAMPLE_SENTENCES, SentenceEncoder, tokenize

# transformers' auto mapping of each task, and the Auto class that loads it, in the order tried
_TASKS = (
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
    ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForImageClassification"),
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "AutoModelForMaskedLM"),
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForSequenceClassification"),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "AutoModelForTokenClassification"),
)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                    "spiece.model")


class HFEncoder(torch.nn.Module):
    """A Hugging Face base model called with ``(input_ids, attention_mask)``, returning its first output."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        kwargs = {"use_cache": False} if getattr(self.model.config, "use_cache", False) else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)[0]


def load(path: str) -> tuple[torch.nn.Module, tuple]:
    """``(model, example_inputs)`` for the model directory `path` (see the module docstring)."""
    try:
        import transformers
    except ImportError as e:
        raise ModelSpecError("hf: models need the transformers package: pip install transformers (or "
                             "sparsegraph[models])") from e
    directory = Path(path)
    if not (directory / "config.json").is_file():
        what = "has no config.json" if directory.is_dir() else "is not a directory"
        raise ModelSpecError(f"hf:{path} {what}; give a Hugging Face model directory (save_pretrained "
                             "writes config.json beside the weights)")
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        auto = _auto_class(config)
        model = getattr(transformers, auto).from_pretrained(path, local_files_only=True).eval()
    except (OSError, ValueError, KeyError) as e:
        raise ModelSpecError(f"hf:{path} cannot be loaded as a local Hugging Face model: {e}") from e
    text = hasattr(config, "vocab_size") and auto != "AutoModelForImageClassification"
    if not text:
        if not hasattr(config, "num_channels"):
            raise ModelSpecError(f"hf:{path}: sparsegraph makes example inputs for text models (a vocab_size "
                                 f"in config.json) and image models (num_channels), not for a "
                                 f"{config.model_type!r} model; load it in a pkg.module:factory returning "
                                 "(model, example_inputs)")
        return model, (_image(config),)
    tokenizer = _tokenizer(transformers, path)
    example = _text(tokenizer, config.vocab_size)
    if auto == "AutoModel":
        pooling = _sentence_pooling(directory)
        if pooling is not None and tokenizer is not None:
            return SentenceEncoder(model, tokenizer, normalize=pooling).eval(), example
        model = HFEncoder(model).eval()
    if tokenizer is not None:
        model.tokenizer = tokenizer
        model.tokenize = functools.partial(tokenize, tokenizer)
    return model, example


def _auto_class(config) -> str:
    """The Auto class whose task mapping lists the config's first architecture, else ``AutoModel``."""
    from transformers.models.auto import modeling_auto

    architecture = (getattr(config, "architectures", None) or [None])[0]
    for mapping, auto in _TASKS:
        names = getattr(modeling_auto, mapping, {}).values()
        if any(architecture == n or (isinstance(n, tuple) and architecture in n) for n in names):
            return auto
    return "AutoModel"


def _tokenizer(transformers, path: str):
    """The directory's tokenizer, padding with its end-of-text token when it has no padding token; None
    when the directory holds no tokenizer file (transformers would build an empty one from the config's
    model type) or one that cannot pad."""
    if not any((Path(path) / name).is_file() for name in _TOKENIZER_FILES):
        return None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError):
        return None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer if tokenizer.pad_token is not None else None


def _text(tokenizer, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    if tokenizer is not None:
        return tokenize(tokenizer, EXAMPLE_SENTENCES)
    ids = torch.randint(0, vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    return ids, torch.ones_like(ids)


def _image(config) -> torch.Tensor:
    size = getattr(config, "image_size", 224)
    height, width = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    channels = getattr(config, "num_channels", 3)
    return torch.randn(1, channels, height, width, generator=torch.Generator().manual_seed(0))


def _sentence_pooling(directory: Path) -> bool | None:
    """For a sentence-transformers directory whose Pooling module takes the mean of the tokens: whether
    its modules normalise the embedding. None for any other directory (or pooling)."""
    modules_file = directory / "modules.json"
    if not modules_file.is_file():
        return None
    modules = json.loads(modules_file.read_text())
    pooling = next((m for m in modules if m.get("type", "").endswith("models.Pooling")), None)
    if pooling is None or not (directory / pooling.get("path", "") / "config.json").is_file():
        return None
    settings = json.loads((directory / pooling["path"] / "config.json").read_text())
    modes = {k for k, v in settings.items() if k.startswith("pooling_mode") and v is True}
    if modes != {"pooling_mode_mean_tokens"}:
        return None
    return any(m.get("type", "").endswith("models.Normalize") for m in modules)
