"""``sparse_attention``: attention sites become ``sparsegraph::block_sparse_attention`` with per-head layouts.

For each attention site that ``head_patterns`` measured, the decision holds the block size, the traced
query/key lengths and, per head, the pattern and its parameters (not the layout: structured patterns
are functions of their parameters, ``block_topk`` keeps its block lists). ``apply`` stores the heads as
one layout table (`sparsegraph.attention_layouts.table`), which the op lays out at every call's
lengths, and replaces the site:

- SDPA ``sdpa(q, k, v, attn_mask, is_causal, scale)`` → ``block_sparse_attention(q, k, v, layout,
  additive(attn_mask), block, causal, scale)``; a bool mask becomes ``where(mask, 0, −inf)``; GQA
  (``enable_gqa`` or k/v with fewer heads) is the op's own (query head h reads kv head h // group);
- explicit ``softmax(q kᵀ / c + mask) v`` (or ``· c``; mask added, or ``masked_fill``-ed) → the same op
  with k = (kᵀ)ᵀ, scale = 1/c, and the mask made additive.

The result is exact where the layout lists every block (dense heads), and drops exactly the blocks a
head's pattern leaves out elsewhere: the attention mass lost is 1 − recall on the calibration data.

**Sequence length.** One compiled graph runs at every length, in PyTorch and in ONNX alike: the
structured families (local, sink + local, multi-diagonal, vertical-slash, skip, dynamic top-k) are
bands of the block grid, laid out afresh for each length (and cached). ``block_topk`` heads exist
only at the grid they were fitted at: at any other length they run dense (exact) and a
`LayoutWarning` says so; the plan marks them ``length_bound``.

**Resolution (video sites).** Where ``head_patterns`` found the site's token grid (T, H, W) (a video
DiT's Conv3d patch embedding, or its ``grid`` option), the decision records it. A plan applied to a graph
traced at another grid (a longer clip, a larger canvas) is handled per family:

- ``window_3d``: *re-specialised*: its extents are in grid units (tokens each way in t, h, w), so the
  head is laid out on the grid traced here (`attention_layouts.token_grid`); the counters say how many;
- ``local``, ``sink_local``, ``multi_diagonal``, ``vertical_slash``, ``block_topk``: *refused* with a
  `PlanEntryError` naming both grids: their offsets are in blocks of the frame-major sequence, so a
  diagonal that meant "the same place one frame back" means another place when H·W changes;
- ``dense``, ``skip``, ``dynamic_topk``: valid at any grid (nothing laid out, or chosen per input).
- ``pyramid``: as its near part (``window_3d``: re-specialised; ``local``: refused); its pooled keys
  are every block's, at any grid.

A compiled graph called at another token count than its window heads' grid raises
`attention_layouts.ResolutionError` (the same message and fix); the plan stays valid across timesteps,
which change no shape.

A ``pyramid`` head is its near part's blocks plus the table's ``POOLED`` flag (the op reads its other
blocks pooled); a decision with pyramid heads at a causal or masked site is refused.

A ``skip`` head lists no block (the op returns zeros for it) and its calibrated mean output is added
after the op. A site with ``dynamic_topk`` heads calls ``sparsegraph::dynamic_block_sparse_attention``
instead, with the static heads' layout and, per head, how many blocks to choose per input (0 for the
static heads): those heads work at any length.

Refused, with the reason: sites head_patterns did not measure; every head dense (nothing skipped);
mean density above ``max_density``; dropout in the attention; causal attention with L ≠ S; explicit
chains with other ops between the scores and the softmax. Counts are in sites; the counters add heads
rewritten, the heads whose layout is length-bound and the pyramid heads.

A decision from a plan must hold one head per query head of the site, each a known pattern with
exactly its parameters (`facts.PARAMS`), which must describe blocks: windows, sinks, ``k`` and block sizes ≥
1, integer diagonals and columns (columns ≥ 0), ``block_topk`` blocks on its grid, a ``skip`` mean
per output channel; and the site's own causality. A head that lists no block at all would output
zeros and is refused (``skip`` is the pattern for a head replaced by its mean).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparsegraph import attention_layouts, facts, graph_edit, ir, meta
from sparsegraph.codegen import dynamic_block_sparse_attention
from sparsegraph.codegen.block_sparse_attention import OP
from sparsegraph.pass_contract import Refused, RewritePass, SiteDecision, option
from sparsegraph.registry import register_pass


@register_pass("sparse_attention")
@dataclass(frozen=True)
class SparseAttention(RewritePass):
    """Block-sparse attention from per-head patterns (see the module docstring)."""

    requires = ("head_patterns",)

    max_density: float = option(0.9, "sites whose mean head density is above this stay dense",
                                range=(0.0, 1.0))

    def sites(self, gm):
        return [*ir.attention_sites(gm), *ir.cross_attention_sites(gm)]

    def decide_site(self, site, opts, ctx):
        if site.cross:
            raise Refused("cross-attention (keys from another sequence than the queries): no head patterns")
        found = facts.read(ctx.plan, "head_patterns", site.id, facts.SitePatterns)
        if found is None:
            raise Refused("head_patterns has no measurement for this site")
        lengths = _lengths(site)
        reason = _unsupported_site(site, lengths)
        if reason is not None:
            raise Refused(reason)
        if len(found.heads) != site.heads:
            raise Refused(f"head_patterns measured {len(found.heads)} heads, the site has {site.heads}")
        if all(h.pattern == "dense" for h in found.heads):
            raise Refused("every head is dense at the recall target: nothing to skip")
        if found.density > opts.max_density:
            raise Refused(f"mean head density {found.density:.2f} is above max_density {opts.max_density}")
        L, S = lengths
        grid = {"grid": list(found.grid)} if found.grid is not None else {}
        return SiteDecision(
            {"block": found.block, "seq_len": L, "key_len": S, "causal": site.causal, **grid,
             "heads": [{"pattern": h.pattern, "params": h.params} for h in found.heads]},
            {"density": found.density, "recall": [h.recall for h in found.heads],
             "length_bound": [i for i, h in enumerate(found.heads) if h.pattern == "block_topk"]})

    def check_decision(self, site, entry, gm):
        found = next((s for s in ir.attention_sites(gm) if s.id == site), None)
        if found is None:
            entry.fail(f"names {site!r}, which is not an attention site of this graph")
        d = entry["decision"]
        d.mapping(required=("block", "seq_len", "key_len", "causal", "heads"), optional=("grid",))
        d["block"].integer(1)
        d["seq_len"].integer(1)
        d["key_len"].integer(1)
        if d["causal"].flag() != found.causal:
            d["causal"].fail(f"is {d['causal'].value}, but the site's attention is "
                             f"{'causal' if found.causal else 'not causal'}")
        reason = _unsupported_site(found, _lengths(found))
        if reason is not None:
            entry.fail(f"the site cannot take block-sparse attention: {reason}")
        heads = d["heads"].elements(found.heads, what="one per query head of the site")
        if (found.causal or found.masks) and any(h["pattern"].value == "pyramid" for h in heads):
            d["heads"].fail("has pyramid heads at a causal or masked site: a pooled key would mix keys the "
                            "mask tells apart. Fit this site without the pyramid family")
        width = (ir.shape(found.v) or (found.head_dim,))[-1]
        for head in heads:
            head.mapping(required=("pattern", "params"))  # a decision's head is its pattern, nothing else
            facts.check_head(head, width)
        grids = {tuple(h["params"]["shape"].value) for h in heads if h["pattern"].value == "block_topk"}
        if len(grids) > 1:
            d["heads"].fail(f"block_topk heads are fitted at different grids {sorted(grids)}; one site has "
                            "one grid")
        if "grid" in d.value:
            for x in d["grid"].elements(3, what="[T, H, W] tokens"):
                x.integer(1)
            _check_resolution(found, d)
        try:
            attention_layouts.table(d["heads"].value, block=d["block"].value)
        except ValueError as e:
            d["heads"].fail(str(e))
        density = entry["evidence"].get("density")
        if density is not None and density.value is not None:
            density.number(0.0, 1.0)

    def apply(self, gm, ctx, decisions, stats):
        heads = bound = moved = pyramids = 0
        for site in ir.attention_sites(gm):
            decision = decisions.get(site.id)
            if decision is None:
                continue
            with ctx.at(site.id):
                d, respecialised = _at_grid(site, decision.decision)
                moved += respecialised
                _replace(gm, site, d, decision.evidence.get("density"))
                heads += sum(h["pattern"] != "dense" for h in d["heads"])
                pyramids += sum(h["pattern"] == "pyramid" for h in d["heads"])
                bound += sum(h["pattern"] == "block_topk" for h in d["heads"])
                stats.rewritten += 1
        stats.counters.update(sparse_heads=heads, length_bound_heads=bound, respecialised_window_heads=moved,
                              pyramid_heads=pyramids)


_GRID_BOUND = ("local", "sink_local", "multi_diagonal", "vertical_slash", "block_topk")


def _family(head: dict) -> str:
    """A head's pattern as far as the token grid goes: a pyramid is its near part."""
    return head["params"]["near"] if head["pattern"] == "pyramid" else head["pattern"]


def _traced_grid(site, recorded) -> tuple[int, int, int] | None:
    """The site's token grid in this graph: the Conv3d's (`attention_layouts.token_grid`), else the
    recorded one where its token count is this site's length (a grid given as an option)."""
    graph = site.q.graph.owning_module
    found = attention_layouts.token_grid(graph, site) if graph is not None else None
    if found is None and recorded is not None and math.prod(recorded) == _lengths(site)[0]:
        return tuple(recorded)
    return found


def _check_resolution(site, d) -> None:
    """Refuse (entry.fail) a decision fitted at another token grid whose heads cannot follow it."""
    recorded = tuple(d["grid"].value)
    here = _traced_grid(site, recorded)
    if here == recorded:
        return
    bound = sorted({h["pattern"] for h in d["heads"].value if _family(h) in _GRID_BOUND})
    windows = any(_family(h) == "window_3d" for h in d["heads"].value)
    size = "x".join(map(str, recorded))
    now = "x".join(map(str, here)) if here is not None else f"{_lengths(site)[0]} tokens (no grid found)"
    if bound:
        d["grid"].fail(f"the plan was fitted at a token grid of {size} (T x H x W), this graph's is {now}: "
                       f"heads with {', '.join(bound)} patterns are block offsets of the frame-major "
                       "sequence and mean other places at another grid. Calibrate at this size "
                       "(sparsegraph.compile with calibration batches at this resolution), or fit "
                       "window_3d patterns (head_patterns' patterns), which are re-specialised to any grid")
    if windows and here is None:
        d["grid"].fail(f"the plan's window_3d heads were fitted at a token grid of {size}; at {now} the grid "
                       "is unknown (no Conv3d patch embedding whose output has the site's length): give "
                       "head_patterns the option grid: [T, H, W] for this size")


def _at_grid(site, d: dict) -> tuple[dict, int]:
    """The decision with its window_3d heads laid out on this graph's token grid (re-specialised), and
    how many heads moved to another grid (`_check_resolution` has refused what cannot move)."""
    if "grid" not in d:
        return d, 0
    here = _traced_grid(site, d["grid"])
    if here is None or list(here) == list(d["grid"]):
        return d, 0
    heads = [{"pattern": h["pattern"], "params": {**h["params"], "grid": list(here)}}
             if _family(h) == "window_3d" else h for h in d["heads"]]
    return {**d, "grid": list(here), "heads": heads}, sum(_family(h) == "window_3d" for h in d["heads"])


def _lengths(site) -> tuple[int, int]:
    q, k = ir.shape(site.q), ir.shape(site.k)
    return q[2], (k[-1] if site.form == "explicit" else k[2])  # explicit: k is kᵀ [B, H, E, S]


def _unsupported_site(site, lengths) -> str | None:
    """Why the op cannot replace this site's attention (None: it can)."""
    L, S = lengths
    if site.causal and L != S:
        return f"causal attention with {L} queries and {S} keys (the op's causal mask is for L = S)"
    if site.dropout != 0.0:
        return "attention dropout is on"
    if not site.readable:
        return "the explicit chain has ops between the scores and the softmax other than scale and mask"
    return None


def _replace(gm, site, d: dict, density: float | None) -> None:
    out = site.out
    name = site.module_path or site.id
    layout = graph_edit.add_tensor(gm, f"{name}.attention_layout",
                                   attention_layouts.table(d["heads"], block=int(d["block"])), out)
    g = gm.graph
    q, k, v, additive, scale = graph_edit.attention_operands(gm, site, out)
    topk = [h["params"]["k"] if h["pattern"] == "dynamic_topk" else 0 for h in d["heads"]]
    if any(topk):
        chosen = graph_edit.add_tensor(gm, f"{name}.attention_topk", torch.tensor(topk), out)
        target, operands = dynamic_block_sparse_attention.OP.overload, (q, k, v, layout, chosen)
    else:
        target, operands = OP.overload, (q, k, v, layout)
    with g.inserting_before(out):
        new = g.call_function(target, (*operands, additive, int(d["block"]), bool(d["causal"]), float(scale)))
    meta.copy_provenance(out, new)
    info = meta.get(out)
    if info is not None:
        meta.set_info(new, meta.NodeInfo(info.site, info.role, info.layer, info.module_path, density=density))
    result = new
    skipped = [h["params"]["mean"] if h["pattern"] == "skip" else None for h in d["heads"]]
    if any(m is not None for m in skipped):  # skipped heads computed nothing (zeros): add their means
        width = len(next(m for m in skipped if m is not None))
        bias = torch.tensor([m if m is not None else [0.0] * width for m in skipped])[:, None, :]
        bias_node = graph_edit.add_tensor(gm, f"{name}.skipped_head_means", bias, new)
        with g.inserting_after(new):
            result = g.call_function(torch.ops.aten.add.Tensor, (new, bias_node))
        meta.copy_provenance(out, result)
    out.replace_all_uses_with(result)
    g.erase_node(out)
