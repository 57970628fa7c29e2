"""Shared fixtures: zoo models loaded and traced once per session, and the GPU skip.

`zoo` gives ``zoo(name) -> Traced(model, example, gm)``; every model is loaded and traced at most once
per session, so test_trace.py and test_ir.py share the heavy ones (vit_b_16, resnet50, vit_small,
llama_tiny: a few seconds each). Tests must treat what it returns as read-only: use a fresh
``models.load(name)`` to mutate a model or to rewrite a graph.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import pytest
import torch
import torch.fx

import sparsegraph as sg
from sparsegraph import models


class Traced(NamedTuple):
    model: torch.nn.Module
    example: tuple
    gm: torch.fx.GraphModule


def pytest_configure(config):
    # .ci/run runs its heavy part on two pytest-xdist workers (-n 2): one core each, so that torch's and
    # OpenMP's threads do not oversubscribe the machine
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    # pyproject only declares the `gpu` marker; skipping without CUDA happens here.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none here); run on a lent GPU with -m gpu")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def zoo():
    """``zoo(name)``: the zoo model `name`, its example inputs and its traced graph, cached per session."""
    cache: dict[str, Traced] = {}

    def get(name: str) -> Traced:
        if name not in cache:
            model, example = models.load(name)
            cache[name] = Traced(model, example, sg.trace(model, example))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def explicit(zoo) -> Traced:
    """The hand-written explicit-attention transformer (3 layers, width 128), traced."""
    return zoo("explicit_attention")


@pytest.fixture(scope="session")
def minilm(zoo) -> Traced:
    """The real pretrained MiniLM-L6 sentence encoder, traced."""
    return zoo("minilm")
