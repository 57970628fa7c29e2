"""window_3d layouts: the block mask against a brute-force token-level mask, why it is not bands, the table
row, the resolution refusal, and the op's output against dense masked attention."""

import math

import pytest
import torch

from sparsegraph import attention_layouts as layouts
from sparsegraph.codegen import use_backend
from sparsegraph.codegen.block_sparse_attention import OP


def token_window(extent, grid) -> torch.Tensor:
    """bool [L, L]: query n sees key m (frame-major tokens), straight from the definition."""
    T, H, W = grid
    n = torch.arange(T * H * W)
    t, h, w = n // (H * W), n // W % H, n % W
    return (((t[:, None] - t[None]).abs() <= extent[0]) & ((h[:, None] - h[None]).abs() <= extent[1])
            & ((w[:, None] - w[None]).abs() <= extent[2]))


def brute_blocks(extent, grid, block) -> torch.Tensor:
    """bool [nb, nb]: blocks holding at least one allowed (query, key) pair."""
    m = token_window(extent, grid)
    nb = math.ceil(m.shape[0] / block)
    pad = nb * block - m.shape[0]
    return torch.nn.functional.pad(m, (0, pad, 0, pad)).view(nb, block, nb, block).any(3).any(1)


@pytest.mark.parametrize("grid", [(3, 5, 7), (4, 8, 8), (2, 6, 10), (5, 3, 4), (1, 9, 9)])
@pytest.mark.parametrize("block", [4, 7, 16, 64])
def test_window_blocks_match_the_token_mask(grid, block):
    for extent in [(0, 0, 0), (1, 1, 1), (0, 2, 1), (2, 0, 3), (1, 3, 0), (9, 9, 9)]:
        got = layouts.window_block_mask(extent, grid, block)
        assert torch.equal(got, brute_blocks(extent, grid, block)), (extent, grid, block)


def test_window_is_not_bands_at_the_same_cost():
    """Blocks of two rows (W = 8, block 16) on 4 frames of 8 rows: the bands Δt·4 + d, |d| ≤ 1 that cover
    the window (a_t = a_h = a_w = 1) also list rows that wrap to the neighbouring frame's other edge."""
    grid, block, extent = (4, 8, 8), 16, (1, 1, 1)
    window = layouts.window_block_mask(extent, grid, block)
    per_frame = 8 * 8 // block
    diagonals = [dt * per_frame + d for dt in (-1, 0, 1) for d in (-1, 0, 1)]
    banded = layouts.pattern_mask("multi_diagonal", {"diagonals": diagonals}, 16, 16, False)
    assert bool((banded | ~window).all())  # the bands hold the window ...
    assert int(banded.sum()) > int(window.sum())  # ... and list more blocks
    extra = int((banded & ~window).sum())
    assert extra == int(banded.sum()) - int(window.sum()) and extra > 0


def test_table_row_lays_out_the_window_and_refuses_another_grid():
    heads = [{"pattern": "window_3d", "params": {"extent": [1, 2, 2], "grid": [4, 8, 8]}},
             {"pattern": "local", "params": {"window": 2}}, {"pattern": "dense", "params": {}}]
    table = layouts.table(heads, block=16)
    layouts.check_table(table, 3)
    mask = layouts.block_mask(table, 16, 16, False)
    assert torch.equal(mask[0], layouts.window_block_mask([1, 2, 2], [4, 8, 8], 16))
    assert torch.equal(mask[1], layouts.pattern_mask("local", {"window": 2}, 16, 16, False))
    assert bool(mask[2].all())
    with pytest.raises(layouts.ResolutionError, match=r"4×8×8 = 256 tokens .*20×20 blocks.*plan="):
        layouts.layout(table, 20, 20, False)
    with pytest.raises(ValueError, match="block size"):
        layouts.table(heads)


def test_window_bands_heads_only_tables_are_unchanged():
    """Tables without window heads are laid out as before (plans and saved models stay valid)."""
    heads = [{"pattern": "local", "params": {"window": 2}}, {"pattern": "sink_local",
                                                             "params": {"sinks": 1, "window": 1}}]
    assert torch.equal(layouts.table(heads), layouts.table(heads, block=16))
    assert int(layouts.table(heads)[:, 0].max()) < layouts.WINDOW


@pytest.mark.parametrize("backend", ["eager", "reference"])
def test_window_attention_matches_dense_masked_attention(backend):
    grid, block, extents = (3, 6, 6), 16, [[1, 1, 1], [0, 5, 5], [2, 0, 0]]
    L = math.prod(grid)
    table = layouts.table([{"pattern": "window_3d", "params": {"extent": e, "grid": list(grid)}}
                           for e in extents], block=block)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, L, 32, generator=g) for _ in range(3))
    with use_backend(backend), torch.no_grad():
        out = OP(q, k, v, table, None, block, False, 32 ** -0.5)
    allowed = torch.stack([brute_blocks(e, grid, block) for e in extents])  # [H, nb, nb]
    qb = torch.arange(L) // block
    elem = allowed[:, qb][:, :, qb]
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=torch.where(elem, 0.0, float("-inf"))[None], scale=32 ** -0.5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # the window drops blocks: the result is not dense attention
    assert (out - torch.nn.functional.scaled_dot_product_attention(q, k, v)).abs().max() > 1e-2
