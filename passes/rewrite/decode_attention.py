"""``decode_attention``: in decode steps, attention over the KV cache reads only some cache blocks.

A decode step attends one new token over the whole cache: a memory-bound read of every cached key and
value, which grows with the context. This pass replaces a decode step's SDPA by
``sparsegraph::decode_attention`` (`codegen/decode_attention.py`), which reads per head

- ``mode: static``: the head's pattern from ``head_patterns`` (local window, sink + local, diagonals,
  vertical columns: bands of the block grid, counted back from the current token), always with the
  current token's block. Heads whose family has no band form (``block_topk``, ``skip``,
  ``dynamic_topk``) read every block (dense, exact) and are counted;
- ``mode: dynamic``: ``sinks`` leading blocks and the current one, plus the blocks of highest block-mean
  q·k per step (Quest / NOSA style), ``keep`` of the blocks in all, chosen per kv head.

It decides on any graph (the full-sequence one, where the plan is made) but rewrites only attention
with one query per sequence: the decode-step graph of `sparsegraph.generation` (``Pass.decode``); in
the full-sequence and prefill graphs nothing changes and ``counters["not a decode step"]`` says how many
sites were left for that reason. The k and v the op reads are the cache itself, before a GQA repeat
(Hugging Face's ``repeat_kv`` copies the whole cache every step; the op shares each kv head instead).

Refused, with the reason: attention written out as matmul-softmax-matmul (the op replaces SDPA calls),
a site without a mask (the op reads the valid length from it), and in static mode sites head_patterns
did not measure or whose heads are all dense. Counts are in sites.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsegraph import attention_layouts, facts, graph_edit, ir
from sparsegraph.codegen.decode_attention import OP
from sparsegraph.pass_contract import Refused, RewritePass, SiteDecision, option
from sparsegraph.registry import register_pass

_BANDS = frozenset({"dense", "local", "sink_local", "multi_diagonal", "vertical_slash"})


@register_pass("decode_attention")
@dataclass(frozen=True)
class DecodeAttention(RewritePass):
    """Decode-step attention that reads only some cache blocks (see the module docstring)."""

    decode = True  # its rewrites exist only in decode steps

    mode: str = option("static", "static: head_patterns' pattern per head; dynamic: blocks chosen per step",
                       choices=("static", "dynamic"))
    keep: float = option(0.1, "dynamic: share of the cache blocks a step reads (sinks and the current block "
                              "included)", range=(0.0, 1.0))
    block: int = option(64, "dynamic: cache block size in slots (static: head_patterns' block)",
                        range=(1, None))
    sinks: int = option(1, "dynamic: leading blocks always read", range=(0, None))

    def sites(self, gm):
        return [*ir.attention_sites(gm), *ir.cross_attention_sites(gm)]

    def decide_site(self, site, opts, ctx):
        if site.cross:
            raise Refused("cross-attention: its keys are another sequence, not the decoded tokens' cache")
        if site.form != "sdpa":
            raise Refused("attention written out as matmul-softmax-matmul: the op replaces SDPA calls")
        if site.mask is None:
            raise Refused("no attention mask: the op reads the cache's valid length from it")
        if opts.mode == "dynamic":
            heads = [_sink_local(opts.sinks)] * site.heads
            return SiteDecision({"block": opts.block, "keep": opts.keep, "heads": heads},
                                {"mode": "dynamic", "dense_heads": 0})
        patterns = facts.read(ctx.plan, "head_patterns", site.id, facts.SitePatterns, heads=site.heads)
        if patterns is None:
            raise Refused("head_patterns did not measure this site: run it first, or use mode: dynamic")
        heads = [{"pattern": h.pattern, "params": h.params} if h.pattern in _BANDS
                 else {"pattern": "dense", "params": {}} for h in patterns.heads]
        if all(h["pattern"] == "dense" for h in heads):
            raise Refused("every head is dense in head_patterns' facts (or has no band pattern)")
        unbanded = sum(h.pattern not in _BANDS for h in patterns.heads)
        return SiteDecision({"block": patterns.block, "keep": 0.0, "heads": heads},
                            {"mode": "static", "dense_heads": unbanded})

    def check_decision(self, site, entry, gm):
        found = next((s for s in ir.attention_sites(gm) if s.id == site), None)
        if found is None:
            entry.fail(f"names {site!r}, which is not an attention site of this graph")
        d = entry["decision"]
        d.mapping(required=("block", "keep", "heads"))
        d["block"].integer(1)
        d["keep"].number(0.0, 1.0)
        for head in d["heads"].elements(found.heads, what="one per query head of the site"):
            facts.check_head(head, None)
            if head["pattern"].value not in _BANDS:
                head["pattern"].fail(f"is not a band pattern {sorted(_BANDS)}")

    def apply(self, gm, ctx, decisions, stats):
        for site in ir.attention_sites(gm):
            decision = decisions.get(site.id)
            if decision is None:
                continue
            q_shape = ir.shape(site.q)
            if q_shape is None or q_shape[2] != 1:
                stats.counters["not a decode step"] = stats.counters.get("not a decode step", 0) + 1
                continue
            d = decision.decision
            table = attention_layouts.table(d["heads"])
            sdpa = site.core[0]
            with ctx.at(site.id):
                k, v = _cache(site.k, site.kv_heads), _cache(site.v, site.kv_heads)
                layout = graph_edit.add_tensor(gm, f"{site.module_path}.decode_layout", table, sdpa)
                graph_edit.replace_with_call(sdpa, OP.overload, (site.q, k, v, site.mask, layout,
                                                                 float(d["keep"]), int(d["block"]),
                                                                 float(site.scale)))
            stats.rewritten += 1


def _sink_local(sinks: int) -> dict:
    return ({"pattern": "sink_local", "params": {"sinks": sinks, "window": 1}} if sinks
            else {"pattern": "local", "params": {"window": 1}})


def _cache(node: torch.fx.Node, kv_heads: int) -> torch.fx.Node:
    """The keys or values with their kv heads: `node` itself, or what a GQA repeat (unsqueeze, expand,
    reshape) was made from."""
    found = node
    while ir.kind(found) == "shape" and (ir.shape(found) is None or len(ir.shape(found)) != 4
                                         or ir.shape(found)[1] != kv_heads):
        found = found.args[0]
    shape = ir.shape(found)
    if shape is None or len(shape) != 4 or shape[1] != kv_heads:
        raise Refused(f"the attention's keys/values are not [batch, {kv_heads} kv heads, slots, dim]")
    return found
