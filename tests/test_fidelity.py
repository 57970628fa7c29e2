"""The fidelity metrics and the calibration split they are checked on."""

from __future__ import annotations

import math

import pytest
import torch

from sparsegraph.errors import ConfigError
from sparsegraph.fidelity import Fidelity, output_tensor


def spread(dense, sparse):  # a module-level callable, importable by its module's name
    return -float((dense - sparse).abs().max())


def test_cosine_top1_and_kl_against_hand_computed_values():
    dense = [torch.tensor([[1.0, 0.0], [0.0, 2.0]])]
    sparse = [torch.tensor([[1.0, 2.0], [0.0, 3.0]])]
    assert Fidelity("cosine", min=0.9).score(dense, sparse) == pytest.approx((1 / math.sqrt(5) + 1) / 2)
    assert Fidelity("top1", min=0.9).score(dense, sparse) == pytest.approx(0.5)  # row 0: argmax 0 vs 1
    p, q = torch.tensor([1.0, 0.0]).softmax(0), torch.tensor([1.0, 2.0]).softmax(0)
    kl_row0 = float((p * (p / q).log()).sum())
    p, q = torch.tensor([0.0, 2.0]).softmax(0), torch.tensor([0.0, 3.0]).softmax(0)
    kl_row1 = float((p * (p / q).log()).sum())
    assert Fidelity("kl", max=0.1).score(dense, sparse) == pytest.approx((kl_row0 + kl_row1) / 2)
    # rows of every batch weigh alike: a batch of 1 row and one of 3 rows give the mean of 4 rows
    a, b = torch.eye(4), torch.eye(4)
    b[0] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    assert Fidelity("top1", min=0.5).score([a[:1], a[1:]], [b[:1], b[1:]]) == pytest.approx(0.75)


def test_perplexity_is_the_ratio_of_held_out_perplexities_and_skips_masked_positions():
    from sparsegraph.context import Batch

    ids = torch.tensor([[1, 2, 0, 3], [2, 2, 1, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])  # the last position of row 1 is padding
    g = torch.Generator().manual_seed(0)
    dense, sparse = torch.randn(2, 4, 5, generator=g), torch.randn(2, 4, 5, generator=g)

    def ce(logits):
        values = [torch.nn.functional.cross_entropy(logits[r, p], ids[r, p + 1]) for r in range(2)
                  for p in range(3) if mask[r, p + 1]]
        return torch.stack(values).mean().item()

    batch = Batch((), {"input_ids": ids, "attention_mask": mask})
    f = Fidelity("perplexity", max=1.05)
    assert f.score([dense], [sparse], [batch]) == pytest.approx(math.exp(ce(sparse) - ce(dense)))
    assert f.score([dense], [dense], [Batch((ids,))]) == pytest.approx(1.0)
    assert f.exact == 1.0 and f.loss(1.03) == pytest.approx(0.03) and not f.meets(1.06)
    with pytest.raises(ConfigError, match="needs next-token logits"):
        f.score([torch.zeros(2, 5)], [torch.zeros(2, 5)], [batch])
    with pytest.raises(ConfigError, match="bounded by 'max'"):
        Fidelity("perplexity", min=1.0)


def test_bounds_losses_and_meets():
    cos, kl = Fidelity("cosine", min=0.99), Fidelity("kl", max=0.05)
    assert cos.meets(0.99) and not cos.meets(0.9899) and cos.loss(0.98) == pytest.approx(0.02)
    assert kl.meets(0.05) and not kl.meets(0.051) and kl.loss(0.03) == pytest.approx(0.03)


def test_callable_and_importable_metrics():
    dense, sparse = [torch.zeros(2, 3)], [torch.full((2, 3), 0.5)]
    assert Fidelity(spread, min=-1.0).score(dense, sparse) == pytest.approx(-0.5)
    named = Fidelity(f"{spread.__module__}:spread", min=-1.0)
    assert Fidelity(spread, min=-1.0).name == named.metric
    assert named.score(dense, sparse) == pytest.approx(-0.5)
    with pytest.raises(ConfigError, match="cannot be imported"):
        Fidelity(f"{spread.__module__}:nothing", min=0.0).score(dense, sparse)


def test_outputs_of_another_shape_and_without_floats_are_refused():
    with pytest.raises(ConfigError, match="token pruning on a token-level output"):
        Fidelity("cosine", min=0.9).score([torch.zeros(1, 5, 4)], [torch.zeros(1, 3, 4)])
    with pytest.raises(ConfigError, match="no floating-point tensor"):
        output_tensor((torch.zeros(2, dtype=torch.long),))
    assert output_tensor({"ids": torch.zeros(1, dtype=torch.long), "logits": torch.ones(2)}).sum() == 2


def test_the_split_holds_out_the_last_share_and_never_everything():
    f = Fidelity("cosine", min=0.9, holdout=0.25)
    assert f.split(list(range(8))) == (list(range(6)), [6, 7])
    assert f.split([0, 1]) == ([0], [1])
    assert Fidelity("cosine", min=0.9, holdout=0.9).split([0, 1, 2]) == ([0], [1, 2])
    for bad in (0, 1, float("nan")):
        with pytest.raises(ConfigError):
            Fidelity("cosine", min=0.9, holdout=bad)
