"""Calibration batches for a model, as the CLI and the demo make them.

From a file (`--data`: a ``.txt`` of texts, one per line, for models with a tokenizer; a ``.npy``
array of inputs [N, ...] for the model's first input; or a ``.npz`` of one array [N, ...] per input,
named as the model's ``forward`` names them, for models that take several: a video DiT's noisy clip,
timestep and label), or by default from real text: held-in standard-library sentences for models
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
    if path.suffix == ".npz":
        return _from_npz(path, model, example)
    raise UsageError(f"--data {path}: expected a .txt (texts), .npy (input array) or .npz (an array per "
                     "input) file")


def _from_npz(path: Path, model, example) -> list:
    """Batches from an ``.npz`` holding one array [N, ...] per input the example fills, named as the
    model's ``forward`` parameters; each array's trailing shape and dtype kind must match the example's."""
    import inspect

    import numpy as np
    import torch

    with np.load(path, allow_pickle=False) as f:
        arrays = {name: f[name] for name in f.files}
    names = [p.name for p in inspect.signature(model.forward).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:len(example)]
    missing, unknown = [n for n in names if n not in arrays], sorted(set(arrays) - set(names))
    if missing or unknown:
        raise UsageError(f"--data {path}: the model's inputs are {', '.join(names)}; give one array per "
                         f"input named so (np.savez(path, {', '.join(f'{n}=...' for n in names)}))"
                         + (f"; missing: {', '.join(missing)}" if missing else "")
                         + (f"; not an input: {', '.join(unknown)}" if unknown else ""))
    counts = {name: len(arrays[name]) for name in names}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise UsageError(f"--data {path}: every array needs the same number N ≥ 1 of inputs along its first "
                         f"axis, got {counts}")
    batches = [[] for _ in range(0, len(arrays[names[0]]), BATCH)]
    for name, ex in zip(names, example):
        array = torch.from_numpy(arrays[name])
        if isinstance(ex, torch.Tensor):
            if array.shape[1:] != ex.shape[1:]:
                raise UsageError(f"--data {path}: {name} has inputs of shape {tuple(array.shape[1:])}, the "
                                 f"model's example {tuple(ex.shape[1:])}: give an array [N, "
                                 f"{', '.join(map(str, ex.shape[1:]))}]")
            array = array.to(ex.dtype)
        for b, i in enumerate(range(0, len(array), BATCH)):
            batches[b].append(array[i:i + BATCH])
    return [tuple(b) for b in batches]
