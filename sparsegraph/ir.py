"""The IR: an FX GraphModule, and the queries every pass uses to read it.

Two capture paths produce two dialects: torch.export gives ATen nodes (``aten.linear.default``),
``torch.fx.symbolic_trace`` gives torch-level nodes (``call_module`` on an ``nn.Linear``, ``F.gelu``,
``x.softmax(-1)``). `kind` maps both to one small vocabulary of canonical op kinds, so passes never
match raw targets.

Site queries find the places sparsity applies and return frozen dataclasses:

- `attention_sites`: ``scaled_dot_product_attention`` calls and explicit ``matmul → softmax → matmul``
  chains, with heads, KV heads (GQA is read off the K projection), head dim, causality (from
  ``is_causal`` or from a mask built by comparing aranges / ``tril``), and the Q/K/V/output projections;
  self-attention only: `cross_attention_sites` are the others (below);
- `mlp_sites`: ``linear → act → linear`` and gated ``act(linear_g(x)) * linear_u(x) → linear`` blocks, the
  gated ones also with gate and up as the two halves of one fused linear (Phi-3); the activation is one
  node or GELU's tanh approximation written out op by op (GPT-2).
- `conv_sites`: pointwise convolutions (1x1 kernel, stride 1, groups 1, no padding) over an image, with
  the eval-mode batch norm and ReLU-like clamp that alone follow them (what a rewrite may fold in).

Two kinds of attention. Cross-attention reads its keys and values from another sequence than its
queries (a DiT's or a decoder's ``encoder_hidden_states``); its score grid is queries × *other* tokens,
so block patterns of the token stream, token importance and token pruning do not apply to it. The rule:
walking back from q and from k across every op but a linear (norms, RoPE, concatenation, indexing,
layout; not along shape-only edges), the nearest linear projections are reached; the attention is cross
when both sides reach some and the tensors those projections read differ. Joint attention over a
concatenation of streams (CogVideoX, HunyuanVideo, Mochi: ``q = [q_img; q_txt]``, ``k = [k_img; k_txt]``)
reads the same streams on both sides, so it is self-attention; a decode step whose keys also come from a
cache input reaches the same projection. Cross sites have ids ``xattn:PATH`` and their own layer numbers,
so ``attn:`` sites stay one per block, as token pruning and RoI read them.

What an MLP site is not: a *conditioning* MLP. Diffusion transformers embed the timestep (and pooled
text) with ``linear → SiLU → linear`` and turn it into AdaLN shift/scale/gate with ``SiLU → linear``: one
row per sample, broadcast over every token of the stream. Those match the MLP shape, but they transform
no token and cost nothing next to the blocks. The rule: an MLP is not a site when a value computed from
its output (across layout ops, dropout, activations, linears and elementwise ops, a few ops on) is
broadcast by an elementwise op onto a tensor with more elements, i.e. when its rows are samples that
condition a token stream rather than the stream's tokens. A tabular MLP on ``[batch, features]`` keeps
its rows and stays a site.

`annotate` writes each site's facts onto its nodes (`sparsegraph.meta`), `propagate_shapes` writes
concrete shapes at the example inputs into ``node.meta["val"]`` (for both dialects), and
`to_networkx` gives the dataflow graph for analyses that are graph algorithms.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import operator
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import networkx as nx
import torch
import torch.fx
import torch.nn.functional as F
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils import _pytree as pytree

from sparsegraph import meta

aten = torch.ops.aten

# ------------------------------------------------------------------------------------------------------------
# Canonical op kinds

_FUNCTIONS: dict[object, str] = {}
_METHODS: dict[str, str] = {}
_MODULES: dict[type, str] = {}


def _targets(kind: str, *targets: object) -> None:
    for t in targets:
        _FUNCTIONS[t] = kind


def _aten(kind: str, *names: str) -> None:
    """Register ATen overloads by name; overloads missing from an older torch are skipped."""
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(aten, packet, None)
        if op is not None and hasattr(op, overload or "default"):
            _FUNCTIONS[getattr(op, overload or "default")] = kind


_aten("linear", "linear.default")
_targets("linear", F.linear)
_aten("sdpa", "scaled_dot_product_attention.default")
_targets("sdpa", F.scaled_dot_product_attention)
_aten("matmul", "matmul.default", "bmm.default", "mm.default")
_targets("matmul", torch.matmul, torch.bmm, torch.mm, operator.matmul)
_aten("softmax", "softmax.int", "_softmax.default", "_safe_softmax.default")
_targets("softmax", torch.softmax, F.softmax)
_aten("gelu", "gelu.default")
_targets("gelu", F.gelu)
_aten("relu", "relu.default", "relu_.default")
_targets("relu", F.relu, torch.relu)
_aten("silu", "silu.default", "silu_.default")
_targets("silu", F.silu)
_aten("conv", "conv1d.default", "conv2d.default", "conv3d.default", "convolution.default")
_targets("conv", F.conv1d, F.conv2d, F.conv3d)
_aten("mul", "mul.Tensor", "mul.Scalar")
_targets("mul", operator.mul, torch.mul)
_aten("div", "div.Tensor", "div.Scalar")
_targets("div", operator.truediv, torch.div)
_aten("add", "add.Tensor", "add.Scalar")
_targets("add", operator.add, torch.add)
_aten("sub", "sub.Tensor", "rsub.Scalar")
_targets("sub", operator.sub, torch.sub)
_aten("neg", "neg.default")
_targets("neg", operator.neg, torch.neg)
_aten("cat", "cat.default")
_targets("cat", torch.cat)
_aten("tanh", "tanh.default")
_targets("tanh", torch.tanh, F.tanh)
_aten("pow", "pow.Tensor_Scalar")
_targets("pow", torch.pow, operator.pow)
_aten("masked_fill", "masked_fill.Scalar", "masked_fill.Tensor", "where.self", "where.ScalarOther")
_targets("masked_fill", torch.where)
_aten("compare", "le.Tensor", "lt.Tensor", "ge.Tensor", "gt.Tensor", "le.Scalar", "lt.Scalar", "ge.Scalar",
      "gt.Scalar")
_targets("compare", operator.le, operator.lt, operator.ge, operator.gt, torch.le, torch.lt, torch.ge,
         torch.gt)
_aten("triangle", "tril.default", "triu.default")
_targets("triangle", torch.tril, torch.triu)
_aten("arange", "arange.default", "arange.start", "arange.start_step")
_targets("arange", torch.arange)
_aten("sym_size", "sym_size.int")
_aten("embedding", "embedding.default")
_targets("embedding", F.embedding)
_aten("dropout", "dropout.default", "native_dropout.default")
_targets("dropout", F.dropout)
_aten("layer_norm", "layer_norm.default", "native_layer_norm.default")
_targets("layer_norm", F.layer_norm)
# A write of new keys/values into a KV cache (`sparsegraph.kv_cache`): attention reads the cache it
# returns, so walks from attention to its k/v projections pass through it.
_aten("cache_write", "index_copy_.default", "index_copy.default")
# Ops that only move or reinterpret data: walks through the graph pass across them.
_aten("shape", "view.default", "reshape.default", "_unsafe_view.default", "transpose.int", "permute.default",
      "contiguous.default", "clone.default", "expand.default", "unsqueeze.default", "squeeze.dim",
      "squeeze.default", "flatten.using_ints", "unflatten.int", "select.int", "slice.Tensor", "split.Tensor",
      "split_with_sizes.default", "chunk.default", "unbind.int", "t.default", "to.dtype", "to.dtype_layout",
      "to.device", "_to_copy.default", "alias.default", "detach.default", "type_as.default",
      "_assert_tensor_metadata.default", "lift_fresh_copy.default", "repeat_interleave.self_int")
_targets("shape", operator.getitem, torch.reshape, torch.transpose, torch.permute, torch.flatten,
         torch.unflatten, torch.unbind, torch.chunk, torch.split, torch.squeeze, torch.unsqueeze, torch.t,
         torch.repeat_interleave)

_METHODS.update({
    "matmul": "matmul", "bmm": "matmul", "softmax": "softmax", "relu": "relu", "mul": "mul", "add": "add",
    "div": "div", "sub": "sub", "neg": "neg", "tanh": "tanh", "pow": "pow", "masked_fill": "masked_fill",
    "tril": "triangle", "triu": "triangle",
    "le": "compare", "lt": "compare", "ge": "compare", "gt": "compare",
    **{m: "shape" for m in ("view", "reshape", "transpose", "permute", "contiguous", "clone", "expand",
                            "unsqueeze", "squeeze", "flatten", "unflatten", "unbind", "chunk", "split",
                            "to", "type_as", "float", "half", "bfloat16", "detach", "t", "size",
                            "repeat_interleave")},
})
_MODULES.update({
    torch.nn.Linear: "linear", torch.nn.Conv1d: "conv", torch.nn.Conv2d: "conv", torch.nn.Conv3d: "conv",
    torch.nn.GELU: "gelu", torch.nn.ReLU: "relu", torch.nn.SiLU: "silu", torch.nn.Softmax: "softmax",
    torch.nn.Dropout: "dropout", torch.nn.Embedding: "embedding", torch.nn.Identity: "shape",
    torch.nn.LayerNorm: "layer_norm",
})

ACTIVATIONS = frozenset({"gelu", "relu", "silu"})
# Between QKᵀ and the softmax: scale, masks and soft-capping (Gemma-2's ``cap · tanh(s / cap)``)
_SCORE_OPS = frozenset({"mul", "div", "add", "sub", "masked_fill", "tanh", "shape"})
# between a projection and attention
_ROPE_OPS = frozenset({"shape", "mul", "add", "sub", "neg", "cat", "cache_write"})
_PASS_THROUGH = frozenset({"shape", "dropout"})


def kind(node: torch.fx.Node) -> str | None:
    """The canonical op kind of `node` (``"linear"``, ``"sdpa"``, ``"softmax"``, ``"shape"``, …) or None."""
    if node.op == "call_function":
        return _FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return _METHODS.get(node.target)
    if node.op == "call_module":
        module = _submodule(node)
        for cls in type(module).__mro__:
            if cls in _MODULES:
                return _MODULES[cls]
    return None


# ------------------------------------------------------------------------------------------------------------
# Node helpers


def val(node: torch.fx.Node):
    """The example value recorded on `node` (a fake tensor, a tuple of them, a number) or None."""
    return node.meta.get("val")


def shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def get_attr(gm: torch.nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _submodule(node: torch.fx.Node) -> torch.nn.Module:
    return get_attr(node.graph.owning_module, node.target)


def _arg(node: torch.fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


@dataclass(frozen=True)
class LinearParts:
    """The operands of a linear node, in either dialect: ``y = x @ weight.T + bias``."""

    x: torch.fx.Node
    weight: torch.Tensor | None  # None when the weight is computed in the graph
    bias: torch.Tensor | None
    in_features: int
    out_features: int
    module_path: str


# the roles of the linear layers of attention and MLP sites (what weight passes and `linear_profile` match)
LINEAR_ROLES = ("attn.q", "attn.k", "attn.v", "attn.qkv", "attn.out", "mlp.up", "mlp.gate", "mlp.down")


def role_linears(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, meta.NodeInfo]]:
    """The linear nodes of `gm` with a role in `LINEAR_ROLES`, each with its `meta.NodeInfo`, in graph
    order."""
    return [(n, meta.get(n)) for n in list(gm.graph.nodes)
            if kind(n) == "linear" and meta.get(n) is not None and meta.get(n).role in LINEAR_ROLES]


def linear_parts(node: torch.fx.Node) -> LinearParts:
    gm = node.graph.owning_module
    if node.op == "call_module":
        mod = _submodule(node)
        return LinearParts(node.args[0], mod.weight, mod.bias, mod.in_features, mod.out_features, node.target)
    x, w = node.args[0], node.args[1]
    b = _arg(node, 2, "bias")
    weight = get_attr(gm, w.target) if w.op == "get_attr" else None
    bias = get_attr(gm, b.target) if isinstance(b, torch.fx.Node) and b.op == "get_attr" else None
    w_shape = tuple(weight.shape) if weight is not None else shape(w)
    path = w.target.rsplit(".", 1)[0] if w.op == "get_attr" else module_path(node)
    return LinearParts(x, weight, bias, int(w_shape[1]), int(w_shape[0]), path)


def module_path(node: torch.fx.Node) -> str:
    """Dotted path of the module `node` came from, or "" when the graph does not say."""
    if node.op == "call_module":
        return str(node.target)
    if kind(node) == "linear" and isinstance(node.args[1], torch.fx.Node) and node.args[1].op == "get_attr":
        return node.args[1].target.rsplit(".", 1)[0]
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return path if isinstance(path, str) else ""
    return ""


def users_through(node: torch.fx.Node, through: frozenset[str]) -> list[torch.fx.Node]:
    """Users of `node`, looking through chains of ops whose kind is in `through`."""
    found, seen, queue = [], set(), deque([node])
    while queue:
        n = queue.popleft()
        for user in n.users:
            if user in seen:
                continue
            seen.add(user)
            if kind(user) in through:
                queue.append(user)
            else:
                found.append(user)
    return found


def producers_through(node, through: frozenset[str], stop: Callable[[torch.fx.Node], bool],
                      limit: int = 64) -> list[torch.fx.Node]:
    """Nodes satisfying `stop` found walking back from `node` across ops whose kind is in `through`."""
    found, seen, queue = [], set(), deque([node])
    while queue and len(seen) < limit:
        n = queue.popleft()
        if not isinstance(n, torch.fx.Node) or n in seen:
            continue
        seen.add(n)
        if stop(n):
            found.append(n)
        elif kind(n) in through:
            queue.extend(n.all_input_nodes)
    return found


def _is_linear(n: torch.fx.Node) -> bool:
    return kind(n) == "linear"


def _single_linear(node, through=_ROPE_OPS) -> torch.fx.Node | None:
    found = producers_through(node, through, _is_linear)
    return found[0] if len(set(found)) == 1 else None


# ------------------------------------------------------------------------------------------------------------
# Calling a GraphModule with flat inputs, and shapes


def flatten_inputs(gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """The values bound to `gm`'s placeholders when it is called as ``gm(*args, **kwargs)``."""
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is not None and info.in_spec is not None:
        from torch.export._tree_utils import reorder_kwargs
        from torch.fx._pytree import tree_flatten_spec

        if kwargs:
            kwargs = reorder_kwargs(kwargs, info.in_spec)
        given = pytree.tree_structure((tuple(args), kwargs))
        if given != info.in_spec:  # tree_flatten_spec would silently drop extra inputs
            spec = info.in_spec  # torch ≥ 2.10 has children(), older ones children_specs
            positional, keywords = spec.children() if hasattr(spec, "children") else spec.children_specs
            raise ValueError(f"the graph takes {positional.num_children} positional input(s) and keywords "
                             f"{keywords.context}; got {len(args)} positional and {sorted(kwargs)}")
        return list(tree_flatten_spec((list(args), kwargs), info.in_spec))
    bound = inspect.signature(gm.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    return [bound.arguments[name.lstrip("*")] for name in placeholders]


def propagate_shapes(gm: torch.fx.GraphModule, args: tuple, kwargs: dict | None = None) -> None:
    """Run `gm` on fake copies of the example inputs and record each node's value in ``meta["val"]``.

    Concrete shapes at the example inputs are what the site queries and the cost model read. The graph's
    code stays dynamic; only this meta is specialised. Parameters stay real (no copy is made).

    Where an op's output shape depends on the data (``nonzero``: Mochi keeps each prompt's unmasked
    tokens), fake tensors cannot say it; then the graph runs once for real on copies of the inputs and
    each node records a fake tensor of the shape it produced.
    """
    flat = flatten_inputs(gm, args, kwargs or {})
    mode = torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True)
    fake = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in flat]
    with torch.no_grad():
        try:
            _NamedFakeProp(gm, mode).propagate_dont_convert_inputs(*fake)
        except NodeError as e:
            if not isinstance(e.__cause__, torch._subclasses.fake_tensor.DynamicOutputShapeException):
                raise
            _RecordingRun(gm, mode).run(*[x.clone() if isinstance(x, torch.Tensor) else x for x in flat])


class NodeError(Exception):
    """Running the graph failed at `node`."""

    def __init__(self, node: torch.fx.Node, error: BaseException):
        info = meta.get(node)
        where = f" (site {info.site}, role {info.role})" if info else ""
        super().__init__(f"node {node.name} = {node.target}{where}: {type(error).__name__}: {error}")
        self.node = node


class _NamedFakeProp(FakeTensorProp):
    def run_node(self, n):
        try:
            return super().run_node(n)
        except NodeError:
            raise
        except Exception as e:
            raise NodeError(n, e) from e


class _RecordingRun(torch.fx.Interpreter):
    """Runs the graph on real tensors and stores a fake copy of each node's value in ``meta["val"]``."""

    def __init__(self, gm: torch.fx.GraphModule, mode):
        super().__init__(gm)
        self.mode = mode

    def run_node(self, n):
        try:
            result = super().run_node(n)
        except Exception as e:
            raise NodeError(n, e) from e
        n.meta["val"] = pytree.tree_map_only(torch.Tensor, self.mode.from_tensor, result)
        return result


# ------------------------------------------------------------------------------------------------------------
# Sites


@dataclass(frozen=True)
class AttentionSite:
    """One attention: ``softmax(q kᵀ · scale + mask) v`` over ``heads`` query heads.

    q, k, v are the attention core's inputs, shaped [batch, heads, seq, head_dim] (k and v may already be
    repeated across query heads: `kv_heads` is read off the K projection); at an explicit chain `k` is the
    node holding kᵀ [batch, heads, head_dim, seq] (`key_transposed`). `out` is the node producing the
    attention output (the SDPA call, or the second matmul of an explicit chain); `core` all nodes between.

    How the scores are made, read once here so that no pass reads operands by position: `scale` (SDPA's
    ``scale`` or 1/√E; an explicit chain's constant factors), `dropout` (SDPA's ``dropout_p``),
    `is_causal` (SDPA's flag; a causal *mask* is among `masks` instead) and `masks`, each a node with how
    it enters: ``"sdpa"`` (SDPA's ``attn_mask``: bool keeps True, float is added), ``"add"`` (added to the
    scores) or ``"masked_fill"`` (True positions set to −inf). An explicit chain with other ops between
    the scores and the softmax is not plain scaled, masked attention: its `scale` is None (`readable`).
    `cross`: the keys and values come from another sequence than the queries (the module docstring).
    """

    id: str
    layer: int
    module_path: str
    form: str  # "sdpa" | "explicit"
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool
    has_mask: bool
    q: torch.fx.Node
    k: torch.fx.Node
    v: torch.fx.Node
    core: tuple[torch.fx.Node, ...]
    out: torch.fx.Node
    mask: torch.fx.Node | None
    q_proj: torch.fx.Node | None
    k_proj: torch.fx.Node | None
    v_proj: torch.fx.Node | None
    o_proj: torch.fx.Node | None
    scale: float | None = None
    dropout: float = 0.0
    is_causal: bool = False
    masks: tuple[tuple[torch.fx.Node, str], ...] = ()
    cross: bool = False

    @property
    def kind(self) -> str:
        """``"attention"`` (self-attention) or ``"cross_attention"``, as the plan lists sites."""
        return "cross_attention" if self.cross else "attention"

    @property
    def gqa(self) -> bool:
        return self.kv_heads != self.heads

    @property
    def key_transposed(self) -> bool:
        """Whether `k` holds kᵀ (explicit chains multiply q by kᵀ)."""
        return self.form == "explicit"

    @property
    def readable(self) -> bool:
        """Whether the scores are plain scaled, masked q·k (an SDPA call, or an explicit chain whose ops
        between the scores and the softmax are only scale and masks)."""
        return self.scale is not None


@dataclass(frozen=True)
class MLPSite:
    """One MLP block: ``down(act(up(x)))``, or gated ``down(act(gate(x)) * up(x))`` (SwiGLU, GeGLU), with
    `hidden` inputs and `intermediate` neurons (I). `act` holds the activation's output: one node, or the
    last multiply of an explicitly written tanh-GELU (GPT-2's ``gelu_new``, found as ``"gelu"``).

    Fused gated (Phi-3's ``gate_up_proj``): one linear of 2I outputs, ``h = x [W₀; W₁]ᵀ + [b₀; b₁]``, is
    split along its last axis into ``h₀ = h[..., :I]`` and ``h₁ = h[..., I:]`` (the nodes `halves`), and
    ``down(act(h_g) * h_u)`` with g = `gate_half` and u = 1 − g. Then `up` and `gate` are the same node
    (the fused linear) and neuron j of the site is row j of W₀ and row j of W₁, i.e. rows j and I + j of
    the fused weight: slicing neurons slices both halves alike, and a pass sparsifying the input of "up
    and gate" changes the one linear.
    """

    id: str
    layer: int
    module_path: str
    gated: bool
    activation: str
    hidden: int
    intermediate: int
    up: torch.fx.Node
    gate: torch.fx.Node | None
    act: torch.fx.Node
    mul: torch.fx.Node | None
    down: torch.fx.Node
    halves: tuple[torch.fx.Node, torch.fx.Node] | None = None
    gate_half: int | None = None

    @property
    def fused(self) -> bool:
        """Whether one linear computes gate and up (`halves` and `gate_half` say how its output splits)."""
        return self.halves is not None

    @property
    def intermediate_node(self) -> torch.fx.Node:
        """The node whose output feeds the down projection: ``act(...)``, or the gate product."""
        return self.mul if self.gated else self.act


def attention_sites(gm: torch.fx.GraphModule) -> list[AttentionSite]:
    """Every self-attention in `gm`, in graph order (the targets of attention patterns and token passes)."""
    return _number([s for s in _attentions(gm) if not s.cross], "attn", _attention_paths)


def cross_attention_sites(gm: torch.fx.GraphModule) -> list[AttentionSite]:
    """Every cross-attention in `gm` (keys and values from another sequence than the queries), in graph
    order, with ids ``xattn:PATH`` and layers numbered among themselves."""
    return _number([s for s in _attentions(gm) if s.cross], "xattn", _attention_paths)


def mlp_sites(gm: torch.fx.GraphModule) -> list[MLPSite]:
    """Every MLP block in `gm`, in graph order."""
    found = [s for n in gm.graph.nodes for s in [_mlp_site(n)] if s is not None]
    return _number(found, "mlp", lambda s: [s.up, s.gate, s.down])


def sites(gm: torch.fx.GraphModule) -> list[AttentionSite | MLPSite | ConvSite]:
    return [*attention_sites(gm), *cross_attention_sites(gm), *mlp_sites(gm), *conv_sites(gm)]


def _attentions(gm: torch.fx.GraphModule) -> list[AttentionSite]:
    found = []
    for node in gm.graph.nodes:
        k = kind(node)
        if k == "sdpa":
            found.append(_sdpa_site(node))
        elif k == "softmax":
            site = _explicit_site(node)
            if site is not None:
                found.append(site)
    return found


def _explicit_parts(core, qk, softmax, out) -> tuple[float, list] | None:
    """``(scale, [(mask node, 'add' | 'masked_fill'), ...])`` between an explicit chain's ``q kᵀ`` and its
    softmax, or None when other ops sit there (then the chain is not plain scaled, masked attention)."""
    scale, masks = 1.0, []
    for n in core:
        if n is qk or n is out or n is softmax:
            continue
        k = kind(n)
        others = [a for a in n.args if not (isinstance(a, torch.fx.Node) and a in core)]
        if k in ("div", "mul") and len(others) == 1 and isinstance(others[0], (int, float)):
            scale = scale / others[0] if k == "div" else scale * others[0]
        elif k == "add" and len(others) == 1 and isinstance(others[0], torch.fx.Node):
            masks.append((others[0], "add"))
        elif k == "masked_fill" and isinstance(n.args[1], torch.fx.Node) and n.args[0] in core \
                and n.args[2] == float("-inf"):
            masks.append((n.args[1], "masked_fill"))
        elif k != "shape":
            return None
    return scale, masks


def stream_input(site: AttentionSite) -> torch.fx.Node | None:
    """The residual-stream node [batch, tokens, dim] entering the block of an attention site, or None.

    Walking back from the Q projection's input across layout ops, dropout and a pre-norm LayerNorm,
    the stream is the first node that also feeds a residual ``add``: the block input of a pre-norm
    block (ViT: ``x → LN → attention``, ``x + ·``) and the previous block's output LayerNorm of a
    post-norm one (BERT: ``LN_out → q/k/v`` and ``LN_out + ·``).
    """
    if site.q_proj is None:
        return None
    node = linear_parts(site.q_proj).x
    for _ in range(16):
        if not isinstance(node, torch.fx.Node):
            return None
        if any(kind(u) == "add" for u in node.users):
            return node
        if kind(node) not in ("shape", "dropout", "layer_norm"):
            return None
        node = node.args[0]
    return None


def _sdpa_site(node: torch.fx.Node) -> AttentionSite:
    q, k, v = node.args[:3]
    mask = _arg(node, 3, "attn_mask")
    is_causal = bool(_arg(node, 5, "is_causal", False))
    gqa = bool(node.kwargs.get("enable_gqa", False))
    site = _attention(form="sdpa", q=q, k=k, v=v, core=(node,), out=node, mask=mask,
                      causal=is_causal or (mask is not None and _causal_mask(mask)), kv_from_k=gqa)
    return dataclasses.replace(site, scale=float(_arg(node, 6, "scale") or shape(q)[-1] ** -0.5),
                               dropout=float(_arg(node, 4, "dropout_p", 0.0) or 0.0), is_causal=is_causal,
                               masks=((mask, "sdpa"),) if isinstance(mask, torch.fx.Node) else ())


def _explicit_site(softmax: torch.fx.Node) -> AttentionSite | None:
    qk = [n for n in producers_through(softmax.args[0], _SCORE_OPS, lambda n: kind(n) == "matmul")]
    pv = [u for u in users_through(softmax, _PASS_THROUGH) if kind(u) == "matmul"]
    if len(set(qk)) != 1 or len(pv) != 1:
        return None
    qk, pv = qk[0], pv[0]
    if softmax not in producers_through(pv.args[0], _PASS_THROUGH, lambda n: n is softmax):
        return None  # the probabilities must be the left operand of the second matmul
    q, kt, v = qk.args[0], qk.args[1], pv.args[1]
    if shape(q) is None or len(shape(q)) != 4:
        return None
    between = _nodes_between(qk, softmax)
    masks = [a for n in between if kind(n) in ("add", "masked_fill") for a in n.all_input_nodes
             if a not in between and a is not qk]
    mask = masks[0] if masks else None
    site = _attention(form="explicit", q=q, k=kt, v=v, core=(qk, *sorted(between - {qk}), pv),
                      out=pv, mask=mask, causal=any(_causal_mask(m) for m in masks), kv_from_k=False)
    parts = _explicit_parts(site.core, qk, softmax, pv)
    return site if parts is None else dataclasses.replace(site, scale=parts[0], masks=tuple(parts[1]))


def _attention(*, form, q, k, v, core, out, mask, causal, kv_from_k) -> AttentionSite:
    q_shape, k_shape = shape(q), shape(k)
    heads, head_dim = q_shape[1], q_shape[-1]
    q_proj, k_proj, v_proj = _single_linear(q), _single_linear(k), _single_linear(v)
    kv_heads = k_shape[1] if kv_from_k else heads
    if not kv_from_k and k_proj is not None and k_proj is not q_proj:
        kv_heads = linear_parts(k_proj).out_features // head_dim
    outs = [u for u in users_through(out, _PASS_THROUGH) if _is_linear(u)]
    o_proj = outs[0] if len(outs) == 1 else None
    return AttentionSite(id="", layer=-1, module_path="", form=form, heads=heads, kv_heads=kv_heads,
                         head_dim=head_dim, causal=causal,
                         has_mask=mask is not None and _depends_on_input(mask), q=q, k=k, v=v, core=core,
                         out=out, mask=mask if isinstance(mask, torch.fx.Node) else None,
                         q_proj=q_proj, k_proj=k_proj, v_proj=v_proj, o_proj=o_proj, cross=_is_cross(q, k))


def _is_cross(q: torch.fx.Node, k: torch.fx.Node) -> bool:
    """Whether the keys are projected from other tensors than the queries (the module docstring's rule)."""
    from_q, from_k = _projected_from(q), _projected_from(k)
    return bool(from_q) and bool(from_k) and from_q != from_k


def _projected_from(node: torch.fx.Node, limit: int = 256) -> frozenset[torch.fx.Node]:
    """The inputs of the nearest linears `node` is computed from, walking back across every other op along
    edges that carry tensors (a ``sym_size`` or other number is not followed: it carries a size, not the
    data)."""
    found, seen, queue = set(), set(), deque([node])
    while queue and len(seen) < limit:
        n = queue.popleft()
        if n in seen:
            continue
        seen.add(n)
        if _is_linear(n):
            found.add(linear_parts(n).x)
        else:
            queue.extend(a for a in n.all_input_nodes if tensors(val(a)))
    return frozenset(found)


def _mlp_site(act: torch.fx.Node) -> MLPSite | None:
    """The MLP site whose activation's output is `act`, or None."""
    activation = _activation(act)
    if activation is None:
        return None
    name, act_input = activation
    first = _single_linear(act_input, through=frozenset({"shape"}))
    if first is None:
        return None
    users = users_through(act, _PASS_THROUGH)
    if len(users) != 1:
        return None
    (user,) = users
    if _is_linear(user):
        return _checked_site(name, up=first, gate=None, act=act, mul=None, down=user)
    if kind(user) != "mul":
        return None
    others = [a for a in user.all_input_nodes
              if act not in producers_through(a, _PASS_THROUGH, lambda n: n is act)]
    up = _single_linear(others[0], through=frozenset({"shape"})) if len(others) == 1 else None
    downs = [u for u in users_through(user, _PASS_THROUGH) if _is_linear(u)]
    if up is None or len(downs) != 1 or linear_parts(up).x is not linear_parts(first).x:
        return None
    if up is not first:
        return _checked_site(name, up=up, gate=first, act=act, mul=user, down=downs[0])
    gate, other = _half(act_input, first), _half(others[0], first)
    if gate is None or other is None or gate[0] == other[0]:
        return None
    halves = (gate[1], other[1]) if gate[0] == 0 else (other[1], gate[1])
    return _checked_site(name, up=first, gate=first, act=act, mul=user, down=downs[0], halves=halves,
                         gate_half=gate[0])


def _checked_site(activation: str, *, up, gate, act, mul, down, halves=None,
                  gate_half=None) -> MLPSite | None:
    """The site, if the down projection reads as many neurons as up makes (half the fused linear's) and
    the block transforms tokens rather than conditioning them (`_broadcast_downstream`)."""
    up_parts, down_parts = linear_parts(up), linear_parts(down)
    intermediate = up_parts.out_features // (2 if halves is not None else 1)
    if down_parts.in_features != intermediate or _broadcast_downstream(down):
        return None
    return MLPSite(id="", layer=-1, module_path="", gated=gate is not None, activation=activation,
                   hidden=up_parts.in_features, intermediate=intermediate, up=up, gate=gate, act=act, mul=mul,
                   down=down, halves=halves, gate_half=gate_half)


_ELEMENTWISE = frozenset({"add", "mul", "sub", "div"})
# What a conditioning vector passes through on its way to the stream it modulates: AdaLN's SiLU → linear,
# chunk/unsqueeze into shift, scale and gate, ``1 + scale``, a learned table added (Wan).
_CONDITIONING_PATH = frozenset({"shape", "dropout", "linear", *ACTIVATIONS, *_ELEMENTWISE})


def _broadcast_downstream(node: torch.fx.Node, depth: int = 16) -> bool:
    """Whether a value computed from `node`, at most `depth` ops on along `_CONDITIONING_PATH`, enters an
    elementwise op whose output has more elements than it: one row per sample spread over a token axis
    (AdaLN modulation, timestep embeddings). The token stream itself only meets smaller operands there."""
    frontier, seen = [node], {node}
    for _ in range(depth):
        reached = []
        for n in frontier:
            size = _numel(n)
            for user in n.users:
                grown = _numel(user)
                if kind(user) in _ELEMENTWISE and size is not None and grown is not None and grown > size:
                    return True
                if user not in seen and kind(user) in _CONDITIONING_PATH:
                    seen.add(user)
                    reached.append(user)
        frontier = reached
    return False


def _numel(node: torch.fx.Node) -> int | None:
    s = shape(node)
    return math.prod(s) if s is not None else None


def _activation(node: torch.fx.Node) -> tuple[str, torch.fx.Node] | None:
    """(activation name, its input) when `node` is an activation's output, else None."""
    k = kind(node)
    if k in ACTIVATIONS:
        return k, node.args[0]
    x = _tanh_gelu_input(node)
    return ("gelu", x) if x is not None else None


def _tanh_gelu_input(out: torch.fx.Node) -> torch.fx.Node | None:
    """x when `out` computes ``0.5·x · (1 + tanh(√(2/π)·(x + 0.044715·x³)))`` op by op, else None.

    That is GELU's tanh approximation as Hugging Face's ``NewGELUActivation`` (GPT-2's ``gelu_new``) writes
    it. It is read here rather than replaced by ``gelu(x, approximate="tanh")``: ATen's fused kernel rounds
    differently in the last bit, and a dense compile must give the model's own outputs exactly.
    Multiplications and additions are matched in either operand order.
    """
    if kind(out) != "mul" or not all(isinstance(a, torch.fx.Node) for a in out.args[:2]):
        return None
    a, b = out.args[:2]
    for half, bracket in ((a, b), (b, a)):
        x, t = _scaled(half, 0.5), _shifted(bracket, 1.0)
        if x is None or t is None or kind(t) != "tanh":
            continue
        inner = _scaled(t.args[0], math.sqrt(2 / math.pi))
        if inner is not None and _is_x_plus_cubic(inner, x):
            return x
    return None


def _scaled(node, factor: float) -> torch.fx.Node | None:
    """y when `node` is ``y · factor`` (either order), else None."""
    return _with_number(node, "mul", factor)


def _shifted(node, offset: float) -> torch.fx.Node | None:
    """y when `node` is ``y + offset`` (either order), else None."""
    return _with_number(node, "add", offset)


def _with_number(node, op: str, number: float) -> torch.fx.Node | None:
    """y when `node` is the `op` kind of y and a constant equal to `number` (to 1e-6), either order."""
    if not isinstance(node, torch.fx.Node) or kind(node) != op or node.kwargs or len(node.args) != 2:
        return None
    for y, c in (node.args, node.args[::-1]):
        close = isinstance(c, (int, float)) and math.isclose(c, number, rel_tol=1e-6)
        if close and isinstance(y, torch.fx.Node):
            return y
    return None


def _is_x_plus_cubic(node: torch.fx.Node, x: torch.fx.Node) -> bool:
    """Whether `node` is ``x + 0.044715·x³`` (either order)."""
    if kind(node) != "add" or node.kwargs or len(node.args) != 2 or x not in node.args:
        return False
    cube = _scaled(node.args[1] if node.args[0] is x else node.args[0], 0.044715)
    return cube is not None and kind(cube) == "pow" and cube.args[0] is x and cube.args[1] == 3


def _half(node, fused: torch.fx.Node) -> tuple[int, torch.fx.Node] | None:
    """(0 or 1, the node cutting it out) when `node` holds, up to layout ops, the first or the second half
    of `fused`'s output along its last axis, else None."""
    while isinstance(node, torch.fx.Node):
        index = _half_index(node, fused)
        if index is not None:
            return index, node
        if kind(node) != "shape" or not node.args:
            return None
        node = node.args[0]
    return None


_CHUNKS = (aten.chunk.default, torch.chunk, "chunk")
_SPLITS = (aten.split.Tensor, aten.split_with_sizes.default, torch.split, "split")


def _half_index(node: torch.fx.Node, fused: torch.fx.Node) -> int | None:
    """Which half of `fused`'s output h [..., 2I] `node` is (0 or 1), or None."""
    width = linear_parts(fused).out_features
    if width % 2 or node.op != "call_function" or not node.args:
        return None
    if node.target is aten.slice.Tensor:
        cut = slice(_arg(node, 2, "start"), _arg(node, 3, "end"), _arg(node, 4, "step"))
        last = node.args[0] is fused and _last_axis(node, _arg(node, 1, "dim", 0))
        return _slice_half(cut, width) if last else None
    if node.target is not operator.getitem:
        return None
    if node.args[0] is fused:  # torch-level indexing, h[..., a:b]
        key = _last_axis_key(node.args[1], len(shape(fused) or ()))
        return _slice_half(key, width) if key is not None else None
    return _split_half(node, fused, width)


def _split_half(item: torch.fx.Node, fused: torch.fx.Node, width: int) -> int | None:
    """i for ``chunk(h, 2, -1)[i]`` or ``split(h, I, -1)[i]`` (or sizes ``[I, I]``), else None."""
    split, index = item.args
    if not isinstance(split, torch.fx.Node) or not split.args or split.args[0] is not fused:
        return None
    halves = _split_sizes(split, width) == [width // 2] * 2 and _last_axis(split, _arg(split, 2, "dim", 0))
    return index if halves and index in (0, 1) else None


def _last_axis_key(key, rank: int) -> slice | None:
    """The slice when the index `key` cuts only the last axis (``[..., a:b]``, ``[:, :, a:b]``), else None."""
    if not isinstance(key, tuple) or not key or not isinstance(key[-1], slice):
        return None
    lead = key[:-1]
    if lead == (Ellipsis,) or (len(key) == rank and all(k == slice(None) for k in lead)):
        return key[-1]
    return None


def _slice_half(cut: slice, width: int) -> int | None:
    """0 for the slice ``[:I]`` of an axis of 2I, 1 for ``[I:]``, else None."""
    start, end = cut.start or 0, cut.stop
    if cut.step not in (None, 1):
        return None
    if (start, end) == (0, width // 2):
        return 0
    return 1 if start == width // 2 and (end is None or end >= width) else None


def _split_sizes(split: torch.fx.Node, width: int) -> list[int] | None:
    """The sizes a ``chunk`` or ``split`` node cuts a `width`-wide axis into; None for other nodes."""
    if split.op not in ("call_function", "call_method"):
        return None
    if split.target in _CHUNKS:
        chunks = _arg(split, 1, "chunks")
        return [-(-width // chunks)] * chunks if isinstance(chunks, int) and chunks > 0 else None
    if split.target in _SPLITS:
        size = split.args[1] if len(split.args) > 1 else next(
            (v for k, v in split.kwargs.items() if k.startswith("split_size")), None)
        if isinstance(size, (list, tuple)):
            return list(size)
        return [size] * -(-width // size) if isinstance(size, int) and size > 0 else None
    return None


def _last_axis(node: torch.fx.Node, dim) -> bool:
    """Whether `dim` names the last axis of `node`'s first argument."""
    rank = len(shape(node.args[0]) or ())
    return isinstance(dim, int) and (dim == -1 or (rank > 0 and dim == rank - 1))


def _attention_paths(site: AttentionSite):
    return [site.q_proj, site.k_proj, site.v_proj, site.o_proj]


def _number(found: list, prefix: str, linears: Callable) -> list:
    """Give each site its layer index (graph order) and a stable id from its modules' common path."""
    numbered, used = [], set()
    for layer, site in enumerate(found):
        paths = [linear_parts(n).module_path for n in linears(site) if n is not None]
        # No projection found as a linear (GPT-2's fused Conv1D q/k/v): the module the core ran in
        attention = isinstance(site, AttentionSite)
        path = _common_prefix(paths) or module_path(site.core[0] if attention else site.act)
        anchor = meta.get(site.core[0] if attention else site.up)
        site_id, layer, path = _identity(anchor, prefix, layer, path, used)
        numbered.append(dataclasses.replace(site, id=site_id, layer=layer, module_path=path))
    return numbered


def _identity(anchor, prefix: str, layer: int, path: str, used: set[str]) -> tuple[str, int, str]:
    """``(id, layer, module path)`` of a site: the ones its capture-time anchor recorded (kept whatever was
    rewritten since), else ``PREFIX:PATH`` (``PREFIX:LAYER`` without a path), primed until unused."""
    if anchor is not None:
        site_id, layer, path = anchor.site, anchor.layer, anchor.module_path
    else:
        site_id = f"{prefix}:{path}" if path else f"{prefix}:{layer}"
        while site_id in used:
            site_id += "'"
    used.add(site_id)
    return site_id, layer, path


def _common_prefix(paths: list[str]) -> str:
    """The modules' common dotted path; of one module alone, its parent (a site is not its projection:
    Mochi's attention, whose q and k pass through norms, has only its V projection found)."""
    parts = [p.split(".") for p in dict.fromkeys(paths) if p]
    if not parts:
        return ""
    if len(parts) == 1:
        return ".".join(parts[0][:-1])
    common = []
    for pieces in zip(*parts):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    return ".".join(common)


def _nodes_between(src: torch.fx.Node, dst: torch.fx.Node) -> set[torch.fx.Node]:
    """Nodes on paths from `src` to `dst` (both included)."""
    forward, queue = {src}, deque([src])
    while queue:
        for u in queue.popleft().users:
            if u not in forward and u <= dst:
                forward.add(u)
                queue.append(u)
    backward, queue = {dst}, deque([dst])
    while queue:
        for a in queue.popleft().all_input_nodes:
            if a in forward and a not in backward:
                backward.add(a)
                queue.append(a)
    return backward


def _ancestors(node: torch.fx.Node, limit: int = 256) -> list[torch.fx.Node]:
    """Ancestors by value (shape-only edges, ``sym_size``, are not followed)."""
    seen, queue, out = set(), deque([node]), []
    while queue and len(out) < limit:
        n = queue.popleft()
        if n in seen:
            continue
        seen.add(n)
        out.append(n)
        if kind(n) != "sym_size":
            queue.extend(n.all_input_nodes)
    return out


def _causal_mask(mask) -> bool:
    """Whether `mask` is built causally: a ``tril``/``triu``, a comparison of two aranges, or a constant
    lower-triangular buffer."""
    if not isinstance(mask, torch.fx.Node):
        return False
    for n in _ancestors(mask):
        k = kind(n)
        if k == "triangle":
            return True
        if k == "compare" and len(n.all_input_nodes) == 2 and all(
                any(kind(a) == "arange" for a in _ancestors(x, 32)) for x in n.all_input_nodes):
            return True
        if n.op == "get_attr":
            t = get_attr(n.graph.owning_module, n.target)
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == t.shape[-2] > 1:
                square = t.reshape(-1, t.shape[-2], t.shape[-1])[0]
                keep = square.bool() if t.dtype == torch.bool else square > square.min()
                if torch.equal(keep, torch.ones_like(keep).tril()):
                    return True
    return False


def _depends_on_input(node) -> bool:
    return isinstance(node, torch.fx.Node) and any(n.op == "placeholder" for n in _ancestors(node))


# ------------------------------------------------------------------------------------------------------------
# Pointwise convolutions


@dataclass(frozen=True)
class ConvSite:
    """A pointwise convolution: a 2-d convolution with a 1x1 kernel, groups 1, stride 1 and no padding over
    an image [N, C, H, W], i.e. one matrix product ``W [O, C] · x[n] [C, H·W]`` per image (the 1x1 layers
    of MobileNets and EfficientNets, 95% of EfficientNet-Lite0's conv weights). Other convolutions
    (spatial kernels, strided, grouped or depthwise) are not sites.

    `height`/`width` are the image's at the example inputs. `norm` is the eval-mode batch norm that alone
    reads the conv's output, with stored statistics and affine parameters (`norm_parts`): folding it into
    the weight gives the same map, ``W' = W·γ/√(σ²+ε)``, ``b' = β + (b − μ)·γ/√(σ²+ε)``. `act` is the
    clamp-like activation (ReLU, ReLU6, hardtanh, clamp with number bounds) that alone reads the norm's
    output (the conv's, without a norm), and `bounds` its (lo, hi), None where unbounded. Both are found
    in the ATen and torch-function dialects (and as modules: BatchNorm2d in eval mode, ReLU, ReLU6,
    Hardtanh).
    """

    id: str
    layer: int
    module_path: str
    conv: torch.fx.Node
    x: torch.fx.Node
    in_channels: int
    out_channels: int
    height: int
    width: int
    norm: torch.fx.Node | None = None
    act: torch.fx.Node | None = None
    bounds: tuple[float | None, float | None] | None = None

    @property
    def weight(self) -> torch.Tensor | None:
        """The stored weight [O, C, 1, 1], or None when the graph computes it."""
        if self.conv.op == "call_module":
            return _submodule(self.conv).weight
        w = _arg(self.conv, 1, "weight")
        return get_attr(self.conv.graph.owning_module, w.target) if w.op == "get_attr" else None

    @property
    def bias(self) -> torch.Tensor | None:
        """The stored bias [O], or None (none, or computed in the graph)."""
        if self.conv.op == "call_module":
            return _submodule(self.conv).bias
        b = _arg(self.conv, 2, "bias")
        return get_attr(self.conv.graph.owning_module, b.target) if isinstance(b, torch.fx.Node) and \
            b.op == "get_attr" else None

    @property
    def out(self) -> torch.fx.Node:
        """The last node of conv → norm → act: what the rest of the graph reads."""
        return self.act or self.norm or self.conv


def conv_sites(gm: torch.fx.GraphModule) -> list[ConvSite]:
    """Every pointwise convolution in `gm`, in graph order, with ids ``conv:PATH`` (the weight's module)."""
    found, used = [], set()
    for node in gm.graph.nodes:
        site = _conv_site(node)
        if site is None:
            continue
        anchor = meta.get(node)
        w = _arg(node, 1, "weight") if node.op != "call_module" else None
        path = (str(node.target) if node.op == "call_module" else w.target.rsplit(".", 1)[0]
                if isinstance(w, torch.fx.Node) and w.op == "get_attr" else module_path(node))
        site_id, layer, path = _identity(anchor if anchor is not None and anchor.role == "conv.1x1" else None,
                                         "conv", len(found), path, used)
        found.append(dataclasses.replace(site, id=site_id, layer=layer, module_path=path))
    return found


@dataclass(frozen=True)
class ConvGeometry:
    """What makes a convolution node pointwise or not: its weight's shape [O, C/groups, *kernel] (None
    when unknown), stride, padding and groups, as the call gives them, and its input's example shape."""

    weight_shape: tuple[int, ...] | None
    stride: object
    padding: object
    groups: object
    transposed: bool
    image: tuple[int, ...] | None

    @property
    def pointwise(self) -> bool:
        """A 2-d, 1x1, ungrouped, unstrided, unpadded convolution over a batched image."""
        return not self.mismatches()

    def mismatches(self) -> list[str]:
        """What keeps the convolution from being pointwise, as a user would say it (empty: it is)."""
        kernel = self.weight_shape[2:] if self.weight_shape is not None else None
        found = []
        if kernel is None:
            found.append("a weight of unknown shape")
        elif len(kernel) != 2:
            found.append(f"a {len(kernel)}-d convolution")
        elif kernel != (1, 1):
            found.append(f"kernel {kernel[0]}×{kernel[1]}")
        if self.groups != 1:
            depthwise = self.weight_shape is not None and self.weight_shape[1] == 1
            found.append(f"groups {self.groups}{' (depthwise)' if depthwise else ''}")
        if not _all_equal(self.stride, 1):
            found.append(f"stride {self.stride}")
        if self.padding not in ("valid", "same") and not _all_equal(self.padding, 0):
            found.append(f"padding {self.padding}")
        if self.transposed:
            found.append("transposed")
        if self.image is None or len(self.image) != 4:
            found.append("not over a batched image [N, C, H, W]")
        return found


def conv_geometry(node: torch.fx.Node) -> ConvGeometry | None:
    """The `ConvGeometry` of a convolution node (``kind(node) == "conv"``), in either dialect; None for
    other nodes."""
    if kind(node) != "conv":
        return None
    x = node.args[0]
    image = shape(x) if isinstance(x, torch.fx.Node) else None
    if node.op == "call_module":
        mod = _submodule(node)
        return ConvGeometry(tuple(mod.weight.shape), mod.stride, mod.padding, mod.groups, False, image)
    w = _arg(node, 1, "weight")
    weight_shape = shape(w) if isinstance(w, torch.fx.Node) else None
    if node.target is aten.convolution.default:  # (x, w, b, stride, padding, dilation, transposed, _, groups)
        return ConvGeometry(weight_shape, node.args[3], node.args[4], node.args[8], bool(node.args[6]), image)
    return ConvGeometry(weight_shape, _arg(node, 3, "stride", 1), _arg(node, 4, "padding", 0),
                        _arg(node, 6, "groups", 1), False, image)


def _conv_site(node: torch.fx.Node) -> ConvSite | None:
    geometry = conv_geometry(node)
    if geometry is None or not geometry.pointwise:
        return None
    x, weight_shape, image = node.args[0], geometry.weight_shape, geometry.image
    norm = _folded_norm(node)
    act = _single_user(norm or node)
    bounds = _clamp_bounds(act) if act is not None else None
    return ConvSite("", 0, "", node, x, int(weight_shape[1]), int(weight_shape[0]), int(image[2]),
                    int(image[3]), norm, act if bounds is not None else None, bounds)


def _all_equal(value, number: int) -> bool:
    return all(v == number for v in value) if isinstance(value, (list, tuple)) else value == number


def _single_user(node: torch.fx.Node) -> torch.fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


_BATCH_NORM = (aten.batch_norm.default, F.batch_norm, torch.batch_norm)


def _folded_norm(conv: torch.fx.Node) -> torch.fx.Node | None:
    """The eval-mode batch norm over `conv`'s output, when it alone reads it and `norm_parts` can read it."""
    norm = _single_user(conv)
    if norm is None or norm.args[0] is not conv:
        return None
    if norm.op == "call_module":
        mod = _submodule(norm)
        ok = (isinstance(mod, torch.nn.BatchNorm2d) and not mod.training and mod.running_mean is not None
              and mod.running_var is not None)
        return norm if ok else None
    if norm.op != "call_function" or norm.target not in _BATCH_NORM:
        return None
    training = _arg(norm, 5, "training", False)
    stored = _norm_operands(norm)
    ok = training is False and all(a is None or (isinstance(a, torch.fx.Node) and a.op == "get_attr")
                                   for a in stored) and stored[2] is not None and stored[3] is not None
    return norm if ok else None


def norm_parts(norm: torch.fx.Node) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor,
                                             torch.Tensor, float]:
    """``(γ, β, μ, σ², ε)`` of a `ConvSite.norm` (γ, β None when the norm has no affine parameters)."""
    if norm.op == "call_module":
        mod = _submodule(norm)
        return mod.weight, mod.bias, mod.running_mean, mod.running_var, float(mod.eps)
    gm = norm.graph.owning_module
    gamma, beta, mean, var = (None if a is None else get_attr(gm, a.target) for a in _norm_operands(norm))
    return gamma, beta, mean, var, float(_arg(norm, 7, "eps", 1e-5))


def _norm_operands(norm: torch.fx.Node) -> list:
    """The weight, bias, running mean and running variance arguments of a batch-norm call."""
    names = ("weight", "bias", "running_mean", "running_var")
    return [_arg(norm, i, name) for i, name in enumerate(names, 1)]


# In place or not: the act reads a value nothing else reads (its only user), so folding it is the same.
_CLAMPS = {aten.relu.default: "relu", aten.relu_.default: "relu", F.relu: "relu", torch.relu: "relu",
           aten.relu6.default: "relu6", F.relu6: "relu6", aten.hardtanh.default: "hardtanh",
           aten.hardtanh_.default: "hardtanh", F.hardtanh: "hardtanh", aten.clamp.default: "clamp",
           aten.clamp_.default: "clamp", torch.clamp: "clamp"}


def _clamp_bounds(node: torch.fx.Node) -> tuple[float | None, float | None] | None:
    """(lo, hi) of a clamp-like activation node (None: unbounded on that side), or None for other nodes."""
    if node.op == "call_module":
        mod = _submodule(node)
        if isinstance(mod, torch.nn.ReLU6):
            return 0.0, 6.0
        if isinstance(mod, torch.nn.Hardtanh):
            return float(mod.min_val), float(mod.max_val)
        return (0.0, None) if isinstance(mod, torch.nn.ReLU) else None
    how = _CLAMPS.get(node.target) if node.op == "call_function" else None
    if how is None:
        return None
    if how == "relu":
        return 0.0, None
    if how == "relu6":
        return 0.0, 6.0
    if how == "hardtanh":
        lo, hi = _arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0)
    else:
        lo, hi = _arg(node, 1, "min"), _arg(node, 2, "max")
    numbers = all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in (lo, hi))
    if not numbers or (lo is None and hi is None):
        return None
    return (None if lo is None else float(lo)), (None if hi is None else float(hi))


# ------------------------------------------------------------------------------------------------------------
# Annotation and views


def annotate(gm: torch.fx.GraphModule) -> None:
    """Write every site's facts onto its nodes (``node.meta["sparsegraph"]``)."""
    for site in [*attention_sites(gm), *cross_attention_sites(gm)]:
        def put(node, role, site=site):
            if node is not None:
                meta.set_info(node, meta.NodeInfo(site.id, role, site.layer, site.module_path))

        packed = site.q_proj is not None and site.q_proj is site.k_proj
        put(site.q_proj, "attn.qkv" if packed else "attn.q")
        if not packed:
            put(site.k_proj, "attn.k")
            put(site.v_proj, "attn.v")
        if site.form == "sdpa":
            put(site.out, "attn.core")
        else:
            put(site.core[0], "attn.qk")
            for n in site.core[1:-1]:
                if kind(n) == "softmax":
                    put(n, "attn.softmax")
            put(site.out, "attn.pv")
        put(site.o_proj, "attn.out")
    for site in conv_sites(gm):
        meta.set_info(site.conv, meta.NodeInfo(site.id, "conv.1x1", site.layer, site.module_path))
    for site in mlp_sites(gm):
        gate = None if site.fused else site.gate  # the fused linear is the site's up projection
        for node, role in ((site.up, "mlp.up"), (gate, "mlp.gate"), (site.act, "mlp.act"),
                           (site.mul, "mlp.mul"), (site.down, "mlp.down")):
            if node is not None:
                meta.set_info(node, meta.NodeInfo(site.id, role, site.layer, site.module_path))


def site_nodes(gm: torch.fx.GraphModule) -> dict[str, list[torch.fx.Node]]:
    """Annotated nodes grouped by site id (rewritten nodes keep the site of the nodes they replaced)."""
    groups: dict[str, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        info = meta.get(node)
        if info is not None:
            groups.setdefault(info.site, []).append(node)
    return groups


def to_networkx(gm: torch.fx.GraphModule) -> nx.DiGraph:
    """The dataflow graph: one vertex per node (attributes op, target, kind, shape, site, role)."""
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        info = meta.get(node)
        g.add_node(node.name, op=node.op, target=str(node.target), kind=kind(node), shape=shape(node),
                   site=info.site if info else None, role=info.role if info else None)
        for src in node.all_input_nodes:
            g.add_edge(src.name, node.name)
    return g


def pretty(gm: torch.fx.GraphModule) -> str:
    """The graph as short text, one line per node, for golden tests, dumps and reading what a pass did::

        %linear = linear(%x, %up.weight[64, 16], %up.bias[64])        mlp.up @ mlp:up

    ATen targets lose their namespace and overload (``aten.linear.default`` → ``linear``), our ops keep
    theirs (``sparsegraph.sparse_linear``); parameters and buffers show their shape; nodes of a site show
    its role and id. Inputs, shape-only bookkeeping (``sym_size``) and the export's guards are left out.
    """
    lines, gm_attr = [], {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = get_attr(gm, node.target)
            gm_attr[node] = f"%{node.target}" + (f"{list(value.shape)}" if isinstance(value, torch.Tensor)
                                                 else "")
    for node in gm.graph.nodes:
        if (node.op in ("placeholder", "get_attr") or kind(node) == "sym_size"
                or node.name.startswith("_guards")):
            continue
        if node.op == "output":
            lines.append(f"return {_pretty_args(node.args[0], gm_attr)}")
            continue
        target = _pretty_target(node)
        info = meta.get(node)
        role = f"  {info.role} @ {info.site}" if info is not None else ""
        args = ", ".join([_pretty_args(a, gm_attr) for a in node.args]
                         + [f"{k}={_pretty_args(v, gm_attr)}" for k, v in node.kwargs.items()])
        lines.append(f"%{node.name} = {target}({args}){role}")
    return "\n".join(lines)


def _pretty_target(node: torch.fx.Node) -> str:
    if node.op != "call_function":
        return str(node.target)
    if isinstance(node.target, torch._ops.OpOverload):
        namespace, name = node.target.namespace, node.target._schema.name.split("::")[-1]
        return name if namespace == "aten" else f"{namespace}.{name}"
    module, name = (getattr(node.target, "__module__", "") or "",
                    getattr(node.target, "__name__", str(node.target)))
    return f"{module.rsplit('.', 1)[-1]}.{name}" if module.startswith("sparsegraph") else name


def _pretty_args(value, attrs: dict) -> str:
    if isinstance(value, torch.fx.Node):
        return attrs.get(value, f"%{value.name}")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_pretty_args(v, attrs) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return repr(value) if isinstance(value, str) else str(value)


def tensors(value) -> Iterable[torch.Tensor]:
    """Every tensor inside a (possibly nested) value."""
    return [x for x in pytree.tree_leaves(value) if isinstance(x, torch.Tensor)]
