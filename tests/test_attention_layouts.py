"""attention_layouts: pattern families as bands of the block grid, one table laid out at any length."""

import threading
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsegraph import attention_layouts as layouts


def _by_definition(pattern, params, nq, nk, causal):
    """Each family written out from its definition (head_patterns' docstring), independently of the bands."""
    rel = torch.arange(nq)[:, None] + (nk - nq) - torch.arange(nk)[None, :]
    col = torch.arange(nk)[None, :].expand(nq, nk)
    if pattern == "dense":
        mask = torch.ones(nq, nk, dtype=torch.bool)
    elif pattern == "local":
        mask = rel.abs() < params["window"]
    elif pattern == "sink_local":
        mask = (rel.abs() < params["window"]) | (col < params["sinks"])
    elif pattern == "multi_diagonal":
        mask = torch.zeros(nq, nk, dtype=torch.bool)
        for d in params["diagonals"]:
            mask |= rel == d
    elif pattern == "vertical_slash":
        mask = torch.zeros(nq, nk, dtype=torch.bool)
        for d in params["diagonals"]:
            mask |= rel == d
        for c in params["columns"]:
            mask |= col == c
    elif pattern == "block_topk":
        mask = torch.zeros(nq, nk, dtype=torch.bool)
        for i, cols in enumerate(params["blocks"]):
            mask[i, cols] = True
    else:  # skip, dynamic_topk: no static block
        mask = torch.zeros(nq, nk, dtype=torch.bool)
    if causal:
        mask &= rel >= 0
    return mask


_DIAGONALS = st.lists(st.integers(-9, 9), max_size=4, unique=True).map(sorted)


@st.composite
def _head(draw, nq, nk):
    family = draw(st.sampled_from(["dense", "local", "sink_local", "multi_diagonal", "vertical_slash", "skip",
                                   "dynamic_topk", "block_topk"]))
    if family == "local":
        params = {"window": draw(st.integers(1, 10))}
    elif family == "sink_local":
        params = {"window": draw(st.integers(1, 10)), "sinks": draw(st.integers(1, 5))}
    elif family == "multi_diagonal":
        params = {"diagonals": draw(_DIAGONALS)}
    elif family == "vertical_slash":
        params = {"diagonals": draw(_DIAGONALS),
                  "columns": draw(st.lists(st.integers(0, 12), max_size=4, unique=True))}
    elif family == "block_topk":
        rows = st.lists(st.integers(0, nk - 1), max_size=nk, unique=True).map(sorted)
        params = {"shape": [nq, nk], "blocks": [draw(rows) for _ in range(nq)]}
    else:
        params = {}
    return {"pattern": family, "params": params}


def _heads(nq, nk):
    return st.lists(_head(nq, nk), min_size=1, max_size=4)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), nq=st.integers(1, 9), nk=st.integers(1, 9), causal=st.booleans(),
       at_nq=st.integers(1, 12), at_nk=st.integers(1, 12))
def test_a_table_lays_out_every_family_as_defined_at_any_grid(data, nq, nk, causal, at_nq, at_nk):
    """Laid out at its own grid and at any other, a table gives each head's definition; fixed heads
    exist at their own grid only and run dense (with a warning) at another."""
    heads = data.draw(_heads(nq, nk))
    table = layouts.table(heads)
    for grid_q, grid_k in ((nq, nk), (at_nq, at_nk)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = layouts.block_mask(table, grid_q, grid_k, causal)
        moved = (grid_q, grid_k) != (nq, nk)
        for h, head in enumerate(heads):
            if head["pattern"] == "block_topk" and moved:
                want = layouts.allowed_blocks(grid_q, grid_k, causal)
            else:
                want = _by_definition(head["pattern"], head["params"], grid_q, grid_k, causal)
            assert torch.equal(got[h], want), (head, grid_q, grid_k, causal)
            if head["pattern"] != "block_topk" or not moved:
                assert torch.equal(layouts.pattern_mask(head["pattern"], head["params"], grid_q, grid_k,
                                                        causal), want)
        fixed_moved = moved and any(h["pattern"] == "block_topk" for h in heads)
        assert any(issubclass(w.category, layouts.LayoutWarning) for w in caught) == fixed_moved
        lists = layouts.layout(table, grid_q, grid_k, causal)
        assert torch.equal(layouts.block_mask_from_layout(lists, grid_k), got)


def test_layouts_are_cached_per_table_and_length_and_follow_edits():
    table = layouts.table([{"pattern": "local", "params": {"window": 1}}])
    first = layouts.layout(table, 4, 4, False)
    assert layouts.layout(table, 4, 4, False) is first  # cached
    assert layouts.layout(table, 5, 5, False).shape[1] == 5  # another length: laid out afresh
    table[0, layouts.HEADER] = 1  # edited in place (diagonal 0 → 1): the version counter moves
    assert not torch.equal(layouts.layout(table, 4, 4, False), first)


def test_concurrent_layouts_agree():
    table = layouts.table([{"pattern": "vertical_slash",
                            "params": {"columns": [0, 3], "diagonals": [0, 2]}}] * 3)
    want = {n: layouts.layout_from_block_mask(layouts.block_mask(table, n, n, True)) for n in range(1, 40)}
    errors, barrier = [], threading.Barrier(4)

    def work():
        barrier.wait()
        for _ in range(3):
            for n in range(1, 40):
                if not torch.equal(layouts.layout(table, n, n, True), want[n]):
                    errors.append(n)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_malformed_tables_are_refused_with_a_reason():
    table = layouts.table([{"pattern": "local", "params": {"window": 2}}] * 2)
    with pytest.raises(ValueError, match="heads=3"):
        layouts.check_table(table, 3)
    with pytest.raises(ValueError, match="does not match its header"):
        layouts.check_table(table[:, :-1], 2)
    bad = table.clone()
    bad[1, 0] = 8  # 0–3, plus the pooled flag 4: 8 is no kind
    with pytest.raises(ValueError, match="kinds"):
        layouts.check_table(bad, 2)
    with pytest.raises(ValueError, match="unknown attention pattern"):
        layouts.table([{"pattern": "diagonalish", "params": {}}])
