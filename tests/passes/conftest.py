import pytest
import torch

from sparsegraph import models


@pytest.fixture(scope="session")
def explicit_calibrated():
    """explicit_attention with 4 calibration batches of random tokens, the last one padded."""
    model, example = models.load("explicit_attention")
    g = torch.Generator().manual_seed(1)
    batches = []
    for i in range(4):
        ids = torch.randint(0, 1000, (2, 48), generator=g)
        mask = torch.ones_like(ids)
        if i == 3:
            mask[1, 30:] = 0
        batches.append((ids, mask))
    return model, example, batches
