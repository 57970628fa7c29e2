"""The CPU path's tiling of a block layout: an exact partition into columns, band and gathered calls."""

import math

import numpy as np
import pytest
import torch

from sparsegraph.attention_layouts import layout_from_block_mask
from sparsegraph.codegen import attention_tiles as tiles
from sparsegraph.codegen import block_sparse_attention as bsa


@pytest.fixture
def small_tiles(torch_path, monkeypatch):
    """The torch path, with small test shapes allowed to take tiles (the defaults are sized for block
    64 at long sequences)."""
    monkeypatch.setattr(tiles, "MIN_KEYS", 16)
    monkeypatch.setattr(tiles, "MAX_REST", 1.0)
    tiles._cache.clear()
    yield
    tiles._cache.clear()


def _vertical_slash(H, nq, nk, causal, seed=0):
    """Per head: a sink, two vertical columns, the diagonal and the previous block; one stray block."""
    g = torch.Generator().manual_seed(seed)
    bm = torch.zeros(H, nq, nk, dtype=torch.bool)
    for h in range(H):
        bm[h, :, 0] = True
        bm[h, :, torch.randperm(nk, generator=g)[:2]] = True
        i = torch.arange(nq)
        bm[h, i, i.clamp(max=nk - 1)] = True
        bm[h, i[1:], (i[1:] - 1).clamp(max=nk - 1)] = True
        bm[h, int(torch.randint(nq, (1,), generator=g)), int(torch.randint(nk, (1,), generator=g))] = True
    if causal:
        bm &= torch.ones(nq, nk, dtype=torch.bool).tril()
    return bm


def _coverage(t: tiles.Tiling, H, nq, nk):
    """How many times each block is computed (and not masked) by the tiles and the rest."""
    count = bsa.block_mask_from_layout(t.rest, nk).numpy().astype(int)
    for c in t.columns:
        for h, cols in zip(c.heads.all, c.cols, strict=True):
            rows = np.arange(c.first_row, nq)
            for j in cols:
                count[h, rows[rows >= j] if c.causal else rows, j] += 1
    for b in t.bands:
        (i0, i1), (d0, _) = b.rows, b.offsets
        for g, h in enumerate(b.heads.all):
            for r, i in enumerate(range(i0, i1)):
                for w, taken in enumerate(b.excluded[g, r]):
                    count[h, i, i + d0 + w] += not taken
    return count


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("L,block", [(128, 16), (70, 16), (256, 32)])
def test_tiles_cover_every_listed_block_exactly_once(small_tiles, causal, L, block):
    H = 4
    nq = nk = math.ceil(L / block)
    bm = _vertical_slash(H, nq, nk, causal)
    t = tiles.tiling(layout_from_block_mask(bm), L, L, block, causal, group=2)
    assert np.array_equal(_coverage(t, H, nq, nk), bm.numpy().astype(int))
    assert t.columns and t.bands  # the structure was found, not all left to the gathered path


def test_shared_structure_runs_as_one_call_per_kind(small_tiles):
    """Heads with the same sink, columns and local band: one columns call and one band call for all of
    them."""
    H, nq, block = 6, 8, 16
    bm = torch.zeros(H, nq, nq, dtype=torch.bool)
    bm[:, :, [0, 5]] = True
    i = torch.arange(1, nq)
    bm[:, i, i] = bm[:, i, i - 1] = True
    bm[:, 0, 0] = True
    t = tiles.tiling(layout_from_block_mask(bm), nq * block, nq * block, block, False, group=1)
    assert [(c.heads, c.first_row, c.cols[0]) for c in t.columns] == [(tiles.Heads(0, 1, H), 0, (0, 5))]
    assert [(b.heads, b.rows, b.offsets) for b in t.bands] == [(tiles.Heads(0, 1, H), (1, nq), (-1, 0))]
    assert not (t.rest >= 0).any()
    # the band masks the blocks the columns tile took: (1, 0), (5, 5), (6, 5)
    assert ({(i0 + 1, w) for i0, w in zip(*np.nonzero(t.bands[0].excluded[0]), strict=True)}
            == {(1, 0), (5, 1), (6, 0)})


def test_dense_causal_head_is_one_is_causal_call():
    bm = torch.ones(2, 8, 8, dtype=torch.bool).tril()
    t = tiles.tiling(layout_from_block_mask(bm), 128, 128, 16, True, group=1)
    assert [(c.heads, c.causal) for c in t.columns] == [(tiles.Heads(0, 1, 2), True)] and not t.bands


def test_scattered_layout_is_left_to_the_gathered_path():
    bm = torch.rand(4, 8, 8, generator=torch.Generator().manual_seed(0)) < 0.3
    t = tiles.tiling(layout_from_block_mask(bm), 128, 128, 16, False, group=1)
    assert t.calls == 0 and torch.equal(bsa.block_mask_from_layout(t.rest, 8), bm)


def test_strided_head_groups_keep_views():
    assert tiles._strided([0, 1, 2, 3], 1) == [tiles.Heads(0, 1, 4)]
    assert tiles._strided([0, 2, 4, 5], 1) == [tiles.Heads(0, 2, 3), tiles.Heads(5, 1, 1)]
    # GQA 2: heads 1, 2 read kv heads 0, 1 (evenly spaced); heads 0, 1, 2 read 0, 0, 1 (not)
    assert tiles._strided([0, 1, 2], 2) == [tiles.Heads(0, 1, 2), tiles.Heads(2, 1, 1)]
    assert tiles.Heads(1, 1, 2).kv(2) == tiles.Heads(0, 1, 2)


def _masks(B, H, L, S):
    padding = torch.zeros(B, 1, 1, S)
    padding[-1, ..., S - 21:] = float("-inf")  # more than a block of padding: whole tiles see none
    return {"none": None, "padding": padding, "padding expanded": padding.expand(B, 1, L, S).contiguous(),
            "full": torch.randn(B, H, L, S, generator=torch.Generator().manual_seed(3))}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("B,H,Hkv,L", [(1, 4, 2, 128), (2, 4, 2, 70), (2, 4, 4, 96)])
def test_tiled_cpu_path_matches_the_reference(small_tiles, causal, B, H, Hkv, L):
    block, E = 16, 16
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, h, L, E, generator=g) for h in (H, Hkv, Hkv))
    nq = math.ceil(L / block)
    bm = _vertical_slash(H, nq, nq, causal)
    bm[1] = torch.ones(nq, nq, dtype=torch.bool).tril() if causal else True  # a dense head among them
    layout = layout_from_block_mask(bm)
    assert tiles.tiling(layout, L, L, block, causal, H // Hkv).calls > 0
    for name, mask in _masks(B, H, L, L).items():
        ref = bsa.reference_lists(q, k, v, layout, mask, block, causal, E ** -0.5)
        torch.testing.assert_close(bsa.cpu_lists(q, k, v, layout, mask, block, causal, E ** -0.5), ref,
                                   rtol=1e-5, atol=1e-5, msg=f"mask {name}")


def test_merge_is_the_softmax_over_the_union():
    """Two halves of the keys, merged by log-sum-exp, give attention over all keys."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 8, generator=g) for _ in range(3))
    full, _ = tiles.attend(q, k, v, None, 0.3)
    acc, lse = tiles.attend(q, k[:, :, :4], v[:, :, :4], None, 0.3)
    tiles.merge(acc, lse, *tiles.attend(q, k[:, :, 4:], v[:, :, 4:], None, 0.3))
    torch.testing.assert_close(acc, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_the_matmul_attend_off_the_cpu_agrees_with_the_flash_kernel(causal):
    """The eager path on CUDA attends with plain matmuls: same output and log-sum-exp as the CPU kernel."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 20, 8, generator=g) for _ in range(3))
    mask = torch.zeros(2, 1, 1, 20)
    mask[1, ..., 12:] = float("-inf")
    want_out, want_lse = tiles.attend(q, k, v, mask, 0.3, causal=causal)
    got_out, got_lse = tiles.attend_matmul(q, k, v, mask, 0.3, causal=causal)
    torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_lse, want_lse, rtol=1e-5, atol=1e-5)
