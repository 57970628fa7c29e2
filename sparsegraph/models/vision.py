"""Vision models from torchvision and timm, random init (structure and speed, not accuracy)."""

from __future__ import annotations

from sparsegraph.models import image_input, seeded


def vit_b_16(batch: int = 1):
    import torchvision

    return seeded(lambda: torchvision.models.vit_b_16(weights=None)), image_input(224, batch)


def resnet50(batch: int = 1):
    import torchvision

    return seeded(lambda: torchvision.models.resnet50(weights=None)), image_input(224, batch)


def vit_small(batch: int = 1):
    import timm

    return (seeded(lambda: timm.create_model("vit_small_patch16_224", pretrained=False)),
            image_input(224, batch))
