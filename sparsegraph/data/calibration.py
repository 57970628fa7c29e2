"""Calibration batches for a model, as the CLI and the demo make them.

From a file (`--data`: a ``.txt`` of texts, one per line, for models with a tokenizer, or a ``.npy``
array of inputs [N, ...]), or by default from real text: held-in standard-library sentences for models
with a tokenizer, else the example inputs. Batches hold 32 inputs.

Text is packed to the length the graph is traced at: consecutive sentences are joined until they fill
it, so that every position of the traced length is seen by the statistics bound to it (attention
layouts are fitted per query block; short sentences padded to a long example leave the far blocks with
nothing observed, which `head_patterns` refuses). Padding is left out of every statistic.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sparsegraph.data.stdlib_text import pack, sentences
from sparsegraph.errors import UsageError

BATCH = 32


def calibration_for(model, example, n: int, data: str | None = None) -> list:
    """Calibration batches for `model` traced with `example`: from `data` when given, else `n` stdlib
    sentences (packed to the example's length) for models with a tokenizer, else the example inputs."""
    if n < 1:
        raise UsageError(f"--calibration {n}: give at least 1 calibration sentence")
    if data is not None:
        return _from_file(Path(data), model, example)
    if hasattr(model, "tokenize"):
        texts = list(pack(model.tokenizer, sentences("calibration", limit=n), _length(example)))
        return _tokenized(model, texts, _length(example))
    print("note: calibrating on the example inputs only (no tokenizer to read real text with)",
          file=sys.stderr)
    return [example]


def _length(example) -> int:
    return example[0].shape[-1]


def _tokenized(model, texts: list[str], length: int) -> list:
    return [model.tokenize(texts[i:i + BATCH], max_length=length, pad_to=length)
            for i in range(0, len(texts), BATCH)]


def _from_file(path: Path, model, example) -> list:
    if path.suffix == ".txt":
        if not hasattr(model, "tokenize"):
            raise UsageError(f"--data {path}: text needs a model with a tokenizer; give a .npy array instead")
        texts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not texts:
            raise UsageError(f"--data {path} holds no text (every line is blank): give one text per line")
        return _tokenized(model, texts, _length(example))
    if path.suffix == ".npy":
        import numpy as np
        import torch

        array = torch.from_numpy(np.load(path, allow_pickle=False))
        if array.shape[1:] != example[0].shape[1:]:
            raise UsageError(f"--data {path}: inputs of shape {tuple(array.shape[1:])}, the model's example "
                             f"is {tuple(example[0].shape[1:])}: give an array "
                             f"[N, {', '.join(map(str, example[0].shape[1:]))}]")
        if len(array) == 0:
            raise UsageError(f"--data {path} holds no inputs: give an array [N, ...] of N ≥ 1 inputs")
        return [(array[i:i + BATCH].to(example[0].dtype),) for i in range(0, len(array), BATCH)]
    raise UsageError(f"--data {path}: expected a .txt (texts) or .npy (input array) file")
