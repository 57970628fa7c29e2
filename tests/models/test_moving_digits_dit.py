"""The ``moving_digits_dit`` fixture: its clip generator, its structure (sites, positions at larger grids),
tracing, and that its samples show the digit they were asked for.

Recognisability, measured with the shipped weights (see the model's docstring, ``Figures measured``): the
classifier's majority vote over frames equals the requested label for 87.5% of 40 clips at guidance 4 (4
per digit, 16 Euler steps, seed 0) and 67.5% at guidance 2 (what `bench dit_quality` samples with); chance
is 10%. The issue asks for far above chance; the test asks for at least RECOGNISED_FLOOR (five times
chance) at guidance 4, where a few clips changing their vote on another CPU's rounding cannot fail it.
"""

from __future__ import annotations

import pytest
import torch

import sparsegraph as sg
from sparsegraph import ir, models
from sparsegraph.models import moving_digits_dit as mdd

RECOGNISED_FLOOR = 0.5


@pytest.fixture(scope="module")
def shipped():
    return mdd.load(batch=2)


def test_clips_are_deterministic_ranged_and_moving():
    a, la = mdd.clips(6, "test", seed=3)
    b, lb = mdd.clips(6, "test", seed=3)
    assert torch.equal(a, b) and torch.equal(la, lb)
    other, _ = mdd.clips(6, "test", seed=4)
    assert not torch.equal(a, other)
    assert a.shape == (6, 1, mdd.FRAMES, mdd.CANVAS, mdd.CANVAS) and la.dtype == torch.int64
    assert float(a.min()) == -1.0 and float(a.max()) <= 1.0
    # each clip shows one digit that moves: the frames differ, their ink (sum of pixels) is the same
    ink = (a + 1).sum((1, 3, 4))  # [6, T]
    torch.testing.assert_close(ink, ink[:, :1].expand_as(ink), rtol=1e-5, atol=1e-3)
    assert all(not torch.equal(a[i, 0, 0], a[i, 0, -1]) or not torch.equal(a[i, 0, 0], a[i, 0, 1])
               for i in range(6))


def test_clips_follow_requested_labels_and_split():
    labels = torch.tensor([3, 1, 4, 1, 5, 9])
    _, got = mdd.clips(6, "train", seed=0, labels=labels)
    assert torch.equal(got, labels)
    with pytest.raises(ValueError, match="split"):
        mdd.clips(2, "validation")


def test_bounce_stays_on_the_canvas():
    p = torch.arange(-40, 41)
    q = mdd._bounce(p, 16)
    assert int(q.min()) == 0 and int(q.max()) == 16
    assert torch.equal(q[40:57], torch.arange(17))  # 0 … 16 unchanged
    assert torch.equal(mdd._bounce(torch.tensor([17, 18, 32, 33]), 16), torch.tensor([15, 14, 0, 1]))


def test_positions_are_factorised_per_axis():
    pos = mdd.positions_3d(3, 4, 5, 48)
    assert pos.shape == (60, 48)
    dt, dh, dw = mdd.axis_dims(48)
    grid = pos.view(3, 4, 5, 48)
    # the time part depends only on t, the height part only on h, the width part only on w
    assert torch.equal(grid[:, :1, :1, :dt].expand(3, 4, 5, dt), grid[..., :dt])
    assert torch.equal(grid[:1, :, :1, dt:dt + dh].expand(3, 4, 5, dh), grid[..., dt:dt + dh])
    assert torch.equal(grid[:1, :1, :, dt + dh:].expand(3, 4, 5, dw), grid[..., dt + dh:])


def test_structure_sites_and_trace():
    model = models.seeded(lambda: mdd.MovingDigitsDiT(dim=48, depth=3, heads=4))
    x0, labels = mdd.clips(2, "test", seed=0)
    t = torch.tensor([0.3, 0.7])
    example = (mdd.noised(x0, t, torch.randn_like(x0)), t, labels)
    ep = torch.export.export(model, example, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(*example), model(*example), atol=1e-5, rtol=0)
    gm = sg.trace(model, example)
    attn, mlps = ir.attention_sites(gm), ir.mlp_sites(gm)
    assert len(attn) == 3 and not ir.cross_attention_sites(gm)
    assert len(mlps) == 3
    assert all("adaLN" not in s.module_path and "t_embed" not in s.module_path for s in mlps), \
        [s.module_path for s in mlps]
    assert all(s.heads == 4 and not s.causal for s in attn)
    tokens = (mdd.FRAMES // mdd.PATCH[0]) * (mdd.CANVAS // mdd.PATCH[1]) * (mdd.CANVAS // mdd.PATCH[2])
    assert all(ir.shape(s.q)[2] == tokens for s in attn)


def test_the_class_builds_and_runs_at_a_larger_grid():
    """Another engineer scales this layout (32 frames of 256x256: 16·64·64 tokens); here the same class at
    a smaller but still larger-than-trained grid, with random weights, runs to the right shape."""
    model = models.seeded(lambda: mdd.MovingDigitsDiT(frames=16, height=64, width=96, dim=48, depth=2,
                                                        heads=4))
    x = torch.randn(1, 1, 16, 64, 96)
    with torch.no_grad():
        out = model(x, torch.tensor([0.5]), torch.tensor([mdd.NULL]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="multiples of the patch"):
        mdd.MovingDigitsDiT(frames=7)


def test_shipped_model_loads_and_denoises(shipped):
    model, (x, t, label) = shipped
    assert isinstance(model, mdd.MovingDigitsDiT) and not model.training
    assert x.shape == (2, 1, mdd.FRAMES, mdd.CANVAS, mdd.CANVAS) and t.shape == (2,) and label.shape == (2,)
    zoo_model, zoo_example = models.load("moving_digits_dit")
    assert isinstance(zoo_model, mdd.MovingDigitsDiT) and len(zoo_example) == 3
    # the trained velocity is much closer to ε − x0 than a zero guess (the loss at t = 0.5)
    x0, labels = mdd.clips(8, "test", seed=11)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(11))
    tt = torch.full((8,), 0.5)
    with torch.no_grad():
        v = model(mdd.noised(x0, tt, noise), tt, labels)
    target = noise - x0
    assert float((v - target).pow(2).mean()) < 0.5 * float(target.pow(2).mean())


def test_calibration_batches_hold_one_timestep_each():
    batches = mdd.calibration(n=2, timesteps=(0.2, 0.8), batch=3)
    assert len(batches) == 4
    for i, (x, t, label) in enumerate(batches):
        assert x.shape == (3, 1, mdd.FRAMES, mdd.CANVAS, mdd.CANVAS)
        assert torch.equal(t, torch.full((3,), (0.2, 0.8)[i // 2]))
        assert label.dtype == torch.int64
    again = mdd.calibration(n=2, timesteps=(0.2, 0.8), batch=3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))


def test_missing_weights_error_says_how_to_rebuild(monkeypatch, tmp_path):
    monkeypatch.setattr(mdd, "WEIGHTS", tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match=r"python -m sparsegraph\.models\.moving_digits_dit"):
        mdd.load()


def test_an_interrupted_training_resumes_to_the_same_weights(tmp_path):
    """A run stopped after 3 of 6 steps and resumed from its checkpoint directory ends with the same losses
    and bit-identical EMA weights as an uninterrupted run; a state made for another run is refused."""
    sizes = {"dim": 48, "depth": 1, "heads": 2}
    whole, whole_losses = mdd.train(steps=6, batch=4, **sizes)

    class Interrupt(Exception):
        pass

    def interrupt(step, ema):
        raise Interrupt

    with pytest.raises(Interrupt):
        mdd.train(steps=6, batch=4, checkpoint=tmp_path, save_every=3, every=3, on_checkpoint=interrupt,
                  **sizes)
    resumed, resumed_losses = mdd.train(steps=6, batch=4, checkpoint=tmp_path, save_every=3, **sizes)
    assert resumed_losses == whole_losses and len(whole_losses) == 6
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))
    with pytest.raises(ValueError, match=r"steps=6 sizes=.*not steps=8"):
        mdd.train(steps=8, batch=4, checkpoint=tmp_path, **sizes)


@pytest.mark.slow
@pytest.mark.ci
def test_samples_show_the_requested_digit(shipped):
    """The classifier (logistic regression on located 8x8 crops of real train frames) recognises the
    requested digit in generated clips far above chance (0.1); it reads real test clips almost always."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the threads the rate was measured with (the sums' order)
    try:
        model, _ = shipped
        classifier = mdd.DigitClassifier()
        real, real_labels = mdd.clips(100, "test", seed=5)
        assert mdd.recognised(classifier, real, real_labels) >= 0.9
        labels = torch.arange(40) % 10
        rate = mdd.recognised(classifier, mdd.sample(model, labels, steps=16, seed=0, guidance=4.0), labels)
    finally:
        torch.set_num_threads(threads)
    assert rate >= RECOGNISED_FLOOR, rate
