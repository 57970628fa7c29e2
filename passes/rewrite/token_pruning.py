"""``token_pruning``: drop unimportant tokens between blocks (EViT / Sparsifiner / Focus-DETR style).

Before each block listed in ``layers`` the residual stream x [B, N, D] goes through

    s          = token_scores(q, k, mask)      from the *previous* block's attention (cls / received / last)
    x', index  = token_select(x, s, keep, protect, fuse)

so block L and everything after it run on ``protect + round(keep · (N − protect))`` tokens (plus one
fused token with ``fuse``). k follows the runtime length, so one graph serves every input length.
With ``select: roi`` the scores go through ``roi_scores`` first (the `roi` pass's boxes, from the
class-token maps of the layers it averages) and ``token_select`` keeps exactly the RoI tokens: a
data-dependent length, for eager PyTorch only (ONNX export refuses, naming the op).

**Keeping the graph consistent.** Everything downstream of the selection that depends on the token
count is rewritten, which is what re-tracing with a shorter sequence would give:

- tensors aligned with the old tokens that are used after the selection (the attention mask of later
  layers, mean-pooling weights, their token count) are routed through ``token_gather(t, index, dims)``
  on each axis of size N: so for MiniLM the attention mask and the mean pooling follow the kept tokens;
- sizes: a ``sym_size`` of an old token axis (dynamic graphs), a literal N (graphs specialised to the
  image size, e.g. ``view(x, [197, B·12, 64])``) and symbolic arithmetic built from them
  (``B · 197``) are recomputed from the new stream's ``sym_size``; the graph is then re-sorted.

This is only safe if N is not also the size of another axis it meets; such a site is refused
(trace with another example length). Other refusals: block 0 (no attention before it to score
with), blocks whose stream cannot be found or is not [B, N, D], a previous attention the scores
cannot be read from (explicit chains with other ops before the softmax), ``keep`` = 1, ``select: roi``
without a `roi` pass that read the block before.

Decisions per pruned block: its layer, keep, score mode, protect, fuse, the site scored from, and the
traced length before and after. Evidence: `token_importance`'s mass kept at this keep ratio, when that
analysis ran.

``keep`` is at least 1/1000: `token_select` counts in permille and reads ``keep = 0`` as "every token
with a finite score" (the RoI mode), so a smaller ratio would keep everything while the plan reported a
pruned length. A decision from a plan is checked against the graph as `decide` would have made it: the
site of its layer, scored from the block before, a keep ratio in [1/1000, 1) (0 with ``roi``), a known
score mode, a ``protect`` that leaves tokens to choose from, a ``core`` set of the previous MLP's
neurons, ``roi`` layers at or before the scored block on a grid that fits the token count.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx
from torch.fx.passes.tools_common import legalize_graph

from sparsegraph import facts, graph_edit, ir, meta, svg
from sparsegraph.attention_scores import MODES, score_mode
from sparsegraph.codegen import core_scores, roi_scores, token_gather, token_scores, token_select
from sparsegraph.errors import ConfigError
from sparsegraph.pass_contract import Refused, RewritePass, SiteDecision, option, refusals
from sparsegraph.registry import register_pass
from sparsegraph.sections import Section

_SYM_ARITHMETIC = frozenset({operator.mul, operator.add, operator.sub, operator.floordiv, operator.neg})
KEEP_MIN = 0.001  # token_select counts in permille: a smaller keep rounds to 0, which the op reads as "RoI"


@register_pass("token_pruning")
@dataclass(frozen=True)
class TokenPruning(RewritePass):
    """Keep the top tokens by attention received before chosen blocks (see the module docstring)."""

    layers: tuple[int, ...] = option((), "blocks (by attention-site layer index) before which tokens are "
                                     "pruned; at least one", range=(0, None))
    keep: float = option(0.7, "fraction of the non-protected tokens kept at each pruned block (at least "
                         "1/1000: the op counts in permille)", range=(KEEP_MIN, 1.0))
    score: str = option("auto", "token importance: cls, received, last (auto: last for causal attention, "
                        "cls when a leading token is protected, else received), or core (the previous MLP's "
                        "hot neurons; needs activation_profile)", choices=(*MODES, "core"))
    protect: int = option(1, "leading tokens always kept (the class token)", range=(0, None))
    fuse: bool = option(False, "fold the dropped tokens into one score-weighted token (EViT)")
    chunk: int = option(256, "query rows per step for score 'received'", range=(1, None))
    select: str = option("topk", "topk: keep a ratio of tokens; roi: keep the tokens inside the RoI boxes "
                         "(needs the roi pass; data-dependent length, eager only)", choices=("topk", "roi"))

    def __post_init__(self):
        super().__post_init__()
        if not self.layers:
            raise ConfigError("option 'layers' of pass 'token_pruning' is empty, so no block would be "
                              "pruned; list the blocks before which tokens are dropped (e.g. layers: [4])")

    @classmethod
    def report_section(cls, plan, model=None):
        return Section(figures=_schedule(plan))

    def decide(self, gm, ctx, stats):
        sites = ir.attention_sites(gm)
        by_layer = {s.layer: s for s in sites}
        decisions, current = {}, None  # current: the token count after the last pruned block
        for site in sites:
            opts = ctx.options(self, site.id, site.module_path)
            if site.layer not in self.layers:
                continue
            with refusals(stats, site.id):  # the tokens before a block depend on the blocks pruned before it
                previous = by_layer.get(site.layer - 1)
                if opts.keep >= 1.0 and opts.select == "topk":
                    raise Refused("keep is 1: nothing to drop")
                N = current or ir.shape(_stream(site, previous, opts.protect))[1]
                decision = {"layer": site.layer, "keep": opts.keep,
                            "score": score_mode(site, opts.score, opts.protect), "protect": opts.protect,
                            "fuse": opts.fuse, "chunk": opts.chunk, "score_site": previous.id}
                if decision["score"] == "core":
                    decision["core"] = _core_neurons(ctx, gm, site.layer - 1)
                if opts.select == "roi":
                    decision.update(keep=0.0, score="cls", roi=_roi_settings(ctx, previous))
                    kept = current = None
                else:
                    kept = current = token_select.kept_count(N, opts.keep, opts.protect) + int(opts.fuse)
                importance = facts.read(ctx.plan, "token_importance", previous.id, facts.TokenImportance,
                                        modes=token_scores.MODES)
                mass = importance.mass_kept.get(f"{opts.keep:g}") if importance is not None else None
                decisions[site.id] = SiteDecision(decision, {
                    "tokens_before": N, "tokens_after": kept or "RoI",
                    **({"importance_mass_kept": mass} if mass else {})})
        missing = sorted(set(self.layers) - set(by_layer))
        if missing:
            stats.counters["layers_not_found"] = missing
        return decisions

    def check_decision(self, site, entry, gm):
        sites = {s.id: s for s in ir.attention_sites(gm)}
        if site not in sites:
            entry.fail(f"names {site!r}, which is not an attention site of this graph")
        found, d = sites[site], entry["decision"]
        d.mapping(required=("layer", "keep", "score", "protect", "fuse", "chunk", "score_site"),
                  optional=("core", "roi"))
        if d["layer"].integer() != found.layer:
            d["layer"].fail(f"is {d['layer'].value}, but site {site!r} is block {found.layer}")
        previous = sites.get(d["score_site"].text())
        if previous is None or previous.layer != found.layer - 1:
            before = [s.id for s in sites.values() if s.layer == found.layer - 1]
            d["score_site"].fail(
                f"must be the attention site of block {found.layer - 1}, the block before the pruned one "
                f"({before[0] if before else 'none: block 0 cannot be pruned'!r})")
        score = _check_mode(d)
        protect = d["protect"].integer(0)
        d["fuse"].flag()
        d["chunk"].integer(1)
        try:
            stream = _stream(found, previous, protect)
        except Refused as reason:
            entry.fail(f"the block cannot be pruned: {reason}")
        if score == "core" or "core" in d:
            _check_core(d["core"], gm, found.layer - 1)
        if "roi" in d:
            _check_roi(d["roi"], sites, previous, ir.shape(stream)[1])
        entry["evidence"].mapping(required=("tokens_after",), extra=True)  # apply reports it
        if entry["evidence"]["tokens_after"].value != "RoI":
            entry["evidence"]["tokens_after"].integer(1)

    def apply(self, gm, ctx, decisions, stats):
        for site_id, decision in sorted(decisions.items(), key=lambda kv: kv[1].decision["layer"]):
            with ctx.at(site_id):
                d = decision.decision
                sites = {s.id: s for s in ir.attention_sites(gm)}
                site, previous = sites.get(site_id), sites.get(d["score_site"])
                if site is None or previous is None:
                    raise RuntimeError(f"token_pruning: site {site_id} or {d['score_site']} is not in the "
                                       "graph")
                _prune(gm, site, previous, d)
                ir.propagate_shapes(gm, ctx.example.args, ctx.example.kwargs)
                stats.rewritten += 1
        stats.counters["schedule"] = {d.decision["layer"]: d.evidence["tokens_after"]
                                      for d in sorted(decisions.values(), key=lambda d: d.decision["layer"])}


def _roi_settings(ctx, previous) -> dict:
    """The roi pass's settings, when it read the attention this block is scored from (else `Refused`)."""
    summary = ctx.plan.summary("roi")
    if summary is None:
        raise Refused("select 'roi' needs the roi pass to run first (add 'roi' before token_pruning)")
    if summary["site"] != previous.id:
        raise Refused(f"select 'roi' scores from {previous.id} but the roi pass read {summary['site']}; "
                      "set roi's layer to the block before the pruned one")
    roi = facts.read(ctx.plan, "roi", summary["site"], facts.RoiSettings)
    return {"layers": roi.layers, "grid": roi.grid, "protect": roi.protect, "threshold": roi.threshold,
            "max_boxes": roi.max_boxes}


def _core_neurons(ctx, gm, layer: int) -> dict:
    """The hot neurons (and centres) activation_profile found in the MLP of `layer` (else `Refused`)."""
    mlp = next((m for m in ir.mlp_sites(gm) if m.layer == layer), None)
    if mlp is None:
        raise Refused(f"score 'core' needs an MLP in block {layer}; none was found")
    profile = facts.read(ctx.plan, "activation_profile", mlp.id, facts.SiteActivations,
                         widths={"down_input": mlp.intermediate})
    stats = profile.observed.get("down_input") if profile is not None else None
    if stats is None:
        raise Refused("score 'core' needs activation_profile to run first (it finds the hot neurons)")
    return {"mlp_site": mlp.id, "hot": stats.hot, "centre": stats.centre}


def _check_mode(d) -> str:
    """The score mode and keep ratio of a decision (an `Entry`): ``roi`` keeps its RoI tokens (keep 0, class-
    token scores), anything else keeps a ratio in [KEEP_MIN, 1) of tokens ranked by a known mode."""
    score = d["score"].text((*token_scores.MODES, "core"))
    if "roi" in d:
        if d["keep"].number() != 0.0:
            d["keep"].fail("must be 0 with 'roi': the op keeps the tokens inside the RoI boxes, however many")
        if score != "cls":
            d["score"].fail("must be 'cls' with 'roi': the boxes come from class-token attention")
        return score
    keep = d["keep"].number(KEEP_MIN, 1.0)
    if keep == 1.0:
        d["keep"].fail("is 1: every token would be kept; leave the block out of the plan")
    if "core" in d and score != "core":
        d["score"].fail(f"is {score!r} but the decision holds 'core' neurons; the score is 'core' with them")
    return score


def _check_core(c, gm, layer: int) -> None:
    """A ``core`` entry: the hot neurons and centres of the MLP of block `layer` (the one scored from)."""
    mlp = next((m for m in ir.mlp_sites(gm) if m.layer == layer), None)
    c.mapping(required=("mlp_site", "hot", "centre"))
    if mlp is None or c["mlp_site"].text() != mlp.id:
        c["mlp_site"].fail(f"must be the MLP site of block {layer} ({mlp.id if mlp else 'there is none'!r})")
    c["hot"].indices(mlp.intermediate, min_length=1, what="neuron")
    c["centre"].numbers(mlp.intermediate, what="one per neuron of the MLP")


def _check_roi(r, sites: dict, previous, tokens: int) -> None:
    """A ``roi`` entry: class-token maps of blocks up to the scored one, on a grid that is the token count."""
    r.mapping(required=("layers", "grid", "protect", "threshold", "max_boxes"))
    layers = r["layers"].elements(min_length=1)
    for e in layers:
        if e.text() not in sites or sites[e.value].layer > previous.layer:
            e.fail(f"must be an attention site at or before block {previous.layer} (the RoI scores are read "
                   "before the pruned block)")
    if len({e.value for e in layers}) != len(layers):
        r["layers"].fail("repeats a site")
    grid, protect = r["grid"].integer(1), r["protect"].integer(0)
    if protect + grid * grid != tokens:
        r["grid"].fail(f"{protect} protected + {grid}² patches are not the {tokens} tokens here")
    r["threshold"].number(0.0, 1.0)
    r["max_boxes"].integer(1)


def _stream(site, previous, protect: int) -> torch.fx.Node:
    """The stream node [batch, tokens, dim] entering the block of `site`, when that block can be pruned
    scoring from `previous` (else `Refused`, saying why)."""
    if previous is None:
        raise Refused("no attention before this block to score tokens with (prune from layer 1 on)")
    stream = ir.stream_input(site)
    shape = ir.shape(stream) if stream is not None else None
    if shape is None or len(shape) != 3:
        raise Refused("the residual stream entering this block was not found as a [batch, tokens, dim] "
                      "tensor")
    N = shape[1]
    if protect >= N:
        raise Refused(f"protect={protect} covers all {N} tokens")
    if N in {shape[0], shape[2], site.heads, site.head_dim}:
        raise Refused(f"the token count {N} equals another axis size here (batch / dim / heads), so sizes "
                      "cannot be told apart; trace with an example of another length")
    if not previous.readable:
        raise Refused("the previous attention has ops between its scores and softmax; its scores cannot be "
                      "read")
    return stream


# ------------------------------------------------------------------------------------------- rewrite


def _cls_scores(gm, site, before) -> torch.fx.Node:
    q, k, _, mask, scale = graph_edit.attention_operands(gm, site, before)
    with gm.graph.inserting_before(before):
        return gm.graph.call_function(token_scores.OP.overload, (q, k, mask, scale, "cls", 256))


def _prune(gm: torch.fx.GraphModule, site, previous, d: dict) -> None:
    g = gm.graph
    stream = ir.stream_input(site)
    N = ir.shape(stream)[1]
    before = _after(stream)
    scores = _scores(gm, previous, d, before)
    with g.inserting_before(before):
        select = g.call_function(token_select.OP.overload,
                                 (stream, scores, float(d["keep"]), int(d["protect"]), bool(d["fuse"])))
        kept = g.call_function(operator.getitem, (select, 0))
        index = g.call_function(operator.getitem, (select, 1))
        length = g.call_function(torch.ops.aten.sym_size.int, (kept, 1))
    for n in (scores, select, kept, index, length):
        meta.copy_provenance(site.q_proj, n)
    _Respecialise(gm, stream, N, kept, index, length).run()
    legalize_graph(gm)
    gm.graph.lint()
    gm.recompile()


def _scores(gm, previous, d: dict, before: torch.fx.Node) -> torch.fx.Node:
    """The [B, N] token scores node: attention (token_scores), core neurons (core_scores), then the RoI
    restriction (roi_scores) when the decision says so."""
    g = gm.graph
    q, k, _, mask, scale = graph_edit.attention_operands(gm, previous, before)
    if "core" in d:
        c = d["core"]
        mlp = next(m for m in ir.mlp_sites(gm) if m.id == c["mlp_site"])
        hot = graph_edit.add_tensor(gm, f"{mlp.module_path}.core_neurons", torch.tensor(c["hot"]), before)
        centre = graph_edit.add_tensor(gm, f"{mlp.module_path}.core_centre", torch.tensor(c["centre"]),
                                       before)
        with g.inserting_before(before):
            scores = g.call_function(core_scores.OP.overload, (mlp.intermediate_node, hot, centre, mask))
    else:
        with g.inserting_before(before):
            scores = g.call_function(token_scores.OP.overload, (q, k, mask, scale, d["score"], d["chunk"]))
    if "roi" in d:
        r = d["roi"]
        sites = {s.id: s for s in ir.attention_sites(gm)}
        per_layer = [scores if i == previous.id else _cls_scores(gm, sites[i], before) for i in r["layers"]]
        with g.inserting_before(before):
            scores = g.call_function(roi_scores.OP.overload, (per_layer, r["grid"], r["protect"],
                                                              float(r["threshold"]), r["max_boxes"]))
    return scores


def _after(node: torch.fx.Node) -> torch.fx.Node:
    """The node after `node` and after every placeholder (insertion point for nodes that use `node`)."""
    n = node.next
    while n.op == "placeholder":
        n = n.next
    return n


class _Respecialise:
    """Rewrite everything after a token selection to run on the kept tokens (see the module docstring)."""

    def __init__(self, gm, stream, N, kept, index, length):
        self.gm, self.stream, self.N = gm, stream, N
        self.kept, self.index, self.length = kept, index, length
        select = kept.args[0]
        self.before = _ancestors(select) | {select, kept, index, length}
        self.after = _descendants(stream) - self.before
        # nodes feeding what runs after the selection (pooling weights, their count, ...) but not the
        # selection
        self.feeding = _ancestors_of(self.after) - self.before
        self.gathered: dict[torch.fx.Node, torch.fx.Node] = {}
        self.sym: dict[torch.fx.Node, object] = {}

    def run(self) -> None:
        for n in list(self.gm.graph.nodes):
            if n in self.before or n.op not in ("call_function", "call_method", "call_module"):
                continue
            if n not in self.after and n not in self.feeding:
                continue
            if not isinstance(ir.val(n), (torch.Tensor, tuple, list)):
                continue  # size arithmetic: rebuilt by `_sym` where a rewritten node uses it
            n.args = self._map(n.args)
            n.kwargs = self._map(n.kwargs)

    def _map(self, args):
        return torch.fx.node.map_aggregate(args, self._map_one)

    def _map_one(self, a):
        if isinstance(a, int) and not isinstance(a, bool) and a == self.N:
            return self.length
        if not isinstance(a, torch.fx.Node):
            return a
        if a is self.stream:
            return self.kept
        if a in self.after or a in self.feeding or a in (self.kept, self.index, self.length):
            return a  # already on the kept tokens (rewritten in graph order before its users)
        value = ir.val(a)
        if isinstance(value, torch.Tensor):
            return self._gather(a) if a.op != "get_attr" else a
        if isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool):
            return self._sym(a)
        return a

    def _gather(self, a):
        shape = ir.shape(a)
        dims = [d for d in range(1, len(shape)) if shape[d] == self.N]
        if not dims:
            return a
        if a not in self.gathered:
            g = self.gm.graph
            with g.inserting_after(self.length):
                node = g.call_function(token_gather.OP.overload, (a, self.index, dims))
            meta.copy_provenance(a, node)
            self.gathered[a] = node
        return self.gathered[a]

    def _sym(self, a):
        """A size node recomputed for the new length (a sym_size of an old token axis → the new length)."""
        if a in self.sym:
            return self.sym[a]
        result = a
        if a.target is torch.ops.aten.sym_size.int:
            t, d = a.args
            s = ir.shape(t)
            if d != 0 and s is not None and s[d] == self.N and t not in self.after:
                result = self.length
        elif a.target in _SYM_ARITHMETIC:
            args = self._map(a.args)
            if args != a.args:
                with self.gm.graph.inserting_after(self.length):
                    result = self.gm.graph.call_function(a.target, args)
                meta.copy_provenance(a, result)
        self.sym[a] = result
        return result


def _ancestors(node: torch.fx.Node) -> set[torch.fx.Node]:
    return _ancestors_of({node}) | {node}


def _ancestors_of(nodes) -> set[torch.fx.Node]:
    return _closure([i for n in nodes for i in n.all_input_nodes], lambda n: n.all_input_nodes)


def _descendants(node: torch.fx.Node) -> set[torch.fx.Node]:
    return _closure(list(node.users), lambda n: n.users)


def _closure(start: list, step) -> set[torch.fx.Node]:
    """Every node reachable from `start` by repeatedly following `step` (inputs or users)."""
    seen, stack = set(), start
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(step(n))
    return seen


def _schedule(plan) -> list[tuple[str, str]]:
    """The token keep schedule: tokens kept before each pruned block (at the traced length)."""
    schedule = plan.passes.get("token_pruning", {}).get("stats", {}).get("counters", {}).get("schedule")
    if not schedule:
        return []
    labels = [f"before block {layer}" for layer in schedule]
    values = [float(v) if isinstance(v, (int, float)) else 0.0 for v in schedule.values()]
    return [("Token keep schedule", svg.bars("tokens kept (traced length)", labels, {"tokens": values}))]
