"""Real photographs, offline: scikit-learn's two sample images cut into seeded random crops.

``sklearn.datasets.load_sample_images()`` ships two 427×640 RGB photographs inside scikit-learn (a
temple, a flower; needs Pillow to decode). `crops` turns them into as many distinct inputs as a
calibration or a fidelity measurement needs, the way ImageNet evaluation feeds a classifier: each crop
takes one of the images, a square of a side drawn uniformly from [`min_side`, 427] pixels at a random
place, flipped left-right with probability ½, resized to `size`×`size` (bilinear, antialiased), scaled
to [0, 1] and normalised with ImageNet's channel mean and standard deviation. All draws come from one
``torch.Generator`` seeded with `seed`: the same call gives the same crops on any machine.

Two photographs are little data: crops of them are many *different* inputs for comparing a model with
its sparse self (top-1 agreement, KL), not a labelled test set.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.cache
def _images() -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_sample_images

    return tuple(torch.tensor(image).permute(2, 0, 1).float().div(255.0)
                 for image in load_sample_images().images)


def crops(n: int, size: int = 224, seed: int = 0, min_side: int = 160,
          images: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """`n` ImageNet-normalised random crops [n, 3, size, size] of the sample images (module docstring), or
    of `images` ([3, H, W] in [0, 1]; a square side is at most the shorter of H and W)."""
    images = _images() if images is None else images
    g = torch.Generator().manual_seed(seed)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        image = images[int(torch.randint(len(images), (1,), generator=g))]
        height, width = image.shape[1:]
        limit = min(height, width)
        side = int(torch.randint(min(min_side, limit), limit + 1, (1,), generator=g))
        top = int(torch.randint(height - side + 1, (1,), generator=g))
        left = int(torch.randint(width - side + 1, (1,), generator=g))
        crop = image[:, top:top + side, left:left + side]
        if bool(torch.rand(1, generator=g) < 0.5):
            crop = crop.flip(-1)
        crop = F.interpolate(crop[None], size=(size, size), mode="bilinear", antialias=True)
        out[i] = (crop[0].clamp(0.0, 1.0) - mean) / std
    return out
