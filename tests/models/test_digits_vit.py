"""The ``digits_vit`` fixture: its data, its shipped weights, tracing, shorter token sequences, retraining."""

from __future__ import annotations

import pytest
import torch

from sparsegraph import models
from sparsegraph.models import digits_vit as dv

ACCURACY_TARGET = 0.95


@pytest.fixture(scope="module")
def shipped():
    model, example = dv.load(batch=4)
    return model, example


def test_dataset_shapes_and_ranges():
    for split, n in (("train", 5752), ("test", 359)):
        d = dv.dataset(split)
        assert d.images.shape == (n, 1, 32, 32) and d.images.dtype == torch.float32
        assert d.labels.shape == (n,) and d.labels.dtype == torch.int64
        assert d.boxes.shape == (n, 4) and d.boxes.dtype == torch.int64
        assert float(d.images.min()) >= 0.0 and float(d.images.max()) <= 1.0
        assert set(d.labels.tolist()) == set(range(10))


def test_dataset_is_deterministic():
    a, b = dv.dataset("test"), dv.dataset("test")
    for field in ("images", "labels", "boxes", "source"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    a.images.zero_()  # callers get copies: mutating one leaves the next call alone
    assert dv.dataset("test").images.sum() > 0


def test_boxes_are_tight_and_inside_the_canvas():
    for split in ("train", "test"):
        d = dv.dataset(split)
        x0, y0, x1, y1 = d.boxes.unbind(1)
        assert bool(((x0 >= 0) & (y0 >= 0) & (x1 <= 32) & (y1 <= 32) & (x0 < x1) & (y0 < y1)).all())
        assert bool(((x1 - x0 <= 16) & (y1 - y0 <= 16)).all())
        cols = torch.arange(32)
        inside_x = (cols >= x0[:, None]) & (cols < x1[:, None])  # [N, 32]
        inside_y = (cols >= y0[:, None]) & (cols < y1[:, None])
        inside = inside_y[:, :, None] & inside_x[:, None, :]  # [N, 32(y), 32(x)]
        nonzero = d.images[:, 0] > 0
        assert not bool((nonzero & ~inside).any()), "a nonzero pixel lies outside its box"
        # tight: every box edge row/column holds a nonzero pixel
        for i in range(0, len(d), 97):
            img = nonzero[i]
            bx0, by0, bx1, by1 = d.boxes[i].tolist()
            assert img[by0, bx0:bx1].any() and img[by1 - 1, bx0:bx1].any()
            assert img[by0:by1, bx0].any() and img[by0:by1, bx1 - 1].any()


def test_train_and_test_use_disjoint_source_digits():
    train, test = dv.dataset("train"), dv.dataset("test")
    train_src, test_src = set(train.source.tolist()), set(test.source.tolist())
    assert not train_src & test_src
    assert len(train_src) + len(test_src) == 1797
    assert len(train) == 4 * len(train_src)  # several placements of each train digit


def test_zoo_registers_digits_vit():
    model, (x,) = models.load("digits_vit")
    assert isinstance(model, dv.DigitsViT) and not model.training
    assert x.shape == (1, 1, 32, 32)


def test_shipped_model_accuracy(shipped):
    model, _ = shipped
    assert dv.accuracy(model, "test") >= ACCURACY_TARGET


def test_missing_weights_error_says_how_to_rebuild(monkeypatch, tmp_path):
    monkeypatch.setattr(dv, "WEIGHTS", tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match=r"python -m sparsegraph\.models\.digits_vit"):
        dv.load()


def test_export_matches_eager(shipped):
    model, (x,) = shipped
    ep = torch.export.export(model, (x,), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), model(x), atol=1e-5, rtol=0)


def test_blocks_take_shorter_token_sequences(shipped):
    model, (x,) = shipped
    with torch.no_grad():
        tokens = model.tokens(x)[:, :33]  # CLS + 32 patch tokens
        for block in model.blocks:
            tokens = block(tokens)
        assert tokens.shape == (x.shape[0], 33, 64)
        assert torch.isfinite(model.head(model.norm(tokens)[:, 0])).all()


@pytest.mark.slow  # a full one-minute retrain: `pytest -m slow`, not CI (its 30-minute budget is spent)
def test_retraining_reproduces_the_shipped_accuracy(shipped):
    model, _ = shipped
    threads = torch.get_num_threads()
    retrained = dv.train()
    assert torch.get_num_threads() == threads
    assert abs(dv.accuracy(retrained) - dv.accuracy(model)) <= 0.01
