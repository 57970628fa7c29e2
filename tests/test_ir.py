"""Site queries (`sparsegraph.ir`): exact attention/MLP counts and facts on every zoo model, node
annotations, both capture dialects, and the networkx view."""

import math
from dataclasses import dataclass

import networkx as nx
import pytest
import torch
import torch.nn.functional as F

import sparsegraph as sg
from sparsegraph import ir, meta


@dataclass(frozen=True)
class Expected:
    attention: int
    mlp: int
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    causal: bool = False
    has_mask: bool = False
    form: str = "sdpa"
    hidden: int | None = None
    intermediate: int | None = None
    activation: str | None = None
    gated: bool = False
    packed_qkv: bool = False  # one linear makes q, k and v (torchvision and timm ViTs)
    conv: int = 0  # pointwise (1x1, stride 1) convolutions


EXPECTED = {
    "explicit_attention": Expected(3, 3, heads=4, kv_heads=4, head_dim=32, has_mask=True, form="explicit",
                                   hidden=128, intermediate=512, activation="gelu"),
    "minilm": Expected(6, 6, heads=12, kv_heads=12, head_dim=32, has_mask=True, hidden=384, intermediate=1536,
                       activation="gelu"),
    "vit_b_16": Expected(12, 12, heads=12, kv_heads=12, head_dim=64, hidden=768, intermediate=3072,
                         activation="gelu", packed_qkv=True),
    "vit_small": Expected(12, 12, heads=6, kv_heads=6, head_dim=64, hidden=384, intermediate=1536,
                          activation="gelu", packed_qkv=True),
    "llama_tiny": Expected(4, 4, heads=8, kv_heads=2, head_dim=32, causal=True, hidden=256, intermediate=688,
                           activation="silu", gated=True),
    "resnet50": Expected(0, 0, conv=33),  # conv1 and conv3 of 16 bottlenecks, layer1's downsample
}

MODELS = [
    "explicit_attention",
    "minilm",
    pytest.param("vit_b_16", marks=[pytest.mark.slow, pytest.mark.ci]),
    pytest.param("llama_tiny", marks=[pytest.mark.slow, pytest.mark.ci]),
    pytest.param("vit_small", marks=pytest.mark.slow),
    pytest.param("resnet50", marks=pytest.mark.slow),
]


def _nodes(gm):
    return set(gm.graph.nodes)


def _path(node):
    return ir.linear_parts(node).module_path


def _inside(node, module_path):
    """Whether linear `node` belongs to the module at `module_path` (a packed projection may be it)."""
    path = _path(node)
    return path == module_path or path.startswith(module_path + ".")


@pytest.mark.parametrize("name", MODELS)
def test_site_counts(zoo, name):
    gm = zoo(name).gm
    want = EXPECTED[name]
    assert len(ir.attention_sites(gm)) == want.attention
    assert len(ir.mlp_sites(gm)) == want.mlp
    assert len(ir.conv_sites(gm)) == want.conv
    assert len(ir.sites(gm)) == want.attention + want.mlp + want.conv


@pytest.mark.parametrize("name", MODELS)
def test_attention_site_facts(zoo, name):
    gm = zoo(name).gm
    want = EXPECTED[name]
    sites = ir.attention_sites(gm)
    assert [s.layer for s in sites] == list(range(want.attention))
    assert len({s.id for s in sites}) == len(sites)
    nodes = _nodes(gm)
    for s in sites:
        assert ((s.form, s.heads, s.kv_heads, s.head_dim)
                == (want.form, want.heads, want.kv_heads, want.head_dim))
        assert (s.causal, s.has_mask, s.gqa) == (want.causal, want.has_mask, want.kv_heads != want.heads)
        assert s.module_path and s.id == f"attn:{s.module_path}"
        projections = (s.q_proj, s.k_proj, s.v_proj, s.o_proj)
        assert all(n is not None and ir.kind(n) == "linear" for n in projections)
        assert {s.q, s.k, s.v, s.out, *s.core, *projections} <= nodes
        assert all(_inside(n, s.module_path) for n in projections)
        assert ir.shape(s.q)[1:] == (want.heads, ir.shape(s.q)[2], want.head_dim)  # [batch, heads, seq, dim]
        assert (s.q_proj is s.k_proj is s.v_proj) == want.packed_qkv
        qkv_width = (want.heads + 2 * want.kv_heads) * want.head_dim
        if want.packed_qkv:
            assert ir.linear_parts(s.q_proj).out_features == qkv_width
            assert meta.get(s.q_proj).role == "attn.qkv"
        else:
            assert sum(ir.linear_parts(n).out_features for n in (s.q_proj, s.k_proj, s.v_proj)) == qkv_width
            assert ([meta.get(n).role for n in (s.q_proj, s.k_proj, s.v_proj)]
                    == ["attn.q", "attn.k", "attn.v"])
        assert meta.get(s.o_proj).role == "attn.out"
        assert s.out is s.core[-1]


@pytest.mark.parametrize("name", MODELS)
def test_mlp_site_facts(zoo, name):
    gm = zoo(name).gm
    want = EXPECTED[name]
    sites = ir.mlp_sites(gm)
    assert [s.layer for s in sites] == list(range(want.mlp))
    assert len({s.id for s in sites}) == len(sites)
    nodes = _nodes(gm)
    for s in sites:
        assert (s.hidden, s.intermediate, s.activation, s.gated) == (
            want.hidden, want.intermediate, want.activation, want.gated)
        assert s.module_path and s.id == f"mlp:{s.module_path}"
        assert ir.kind(s.act) == want.activation
        assert (s.gate is not None, s.mul is not None) == (want.gated, want.gated)
        linears = [n for n in (s.up, s.gate, s.down) if n is not None]
        assert set(linears) | {s.act} <= nodes and all(ir.kind(n) == "linear" for n in linears)
        assert all(_path(n).startswith(s.module_path + ".") for n in linears)
        assert [meta.get(n).role for n in (s.up, s.act, s.down)] == ["mlp.up", "mlp.act", "mlp.down"]
        up, down = ir.linear_parts(s.up), ir.linear_parts(s.down)
        assert (up.in_features, up.out_features) == (want.hidden, want.intermediate)
        assert (down.in_features, down.out_features) == (want.intermediate, want.hidden)
        assert s.intermediate_node is (s.mul if want.gated else s.act)


@pytest.mark.slow
@pytest.mark.ci
def test_llama_projection_paths(zoo):
    gm = zoo("llama_tiny").gm
    for layer, (attn, mlp) in enumerate(zip(ir.attention_sites(gm), ir.mlp_sites(gm))):
        prefix = f"lm.model.layers.{layer}"
        assert attn.module_path == f"{prefix}.self_attn" and mlp.module_path == f"{prefix}.mlp"
        assert [_path(n) for n in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)] == [
            f"{prefix}.self_attn.{p}_proj" for p in "qkvo"]
        assert [_path(n) for n in (mlp.gate, mlp.up, mlp.down)] == [
            f"{prefix}.mlp.{p}_proj" for p in ("gate", "up", "down")]


def test_explicit_attention_core_is_the_matmul_softmax_matmul_chain(explicit):
    for s in ir.attention_sites(explicit.gm):
        kinds = [ir.kind(n) for n in s.core]
        assert kinds[0] == "matmul" and kinds[-1] == "matmul" and kinds.count("softmax") == 1
        assert s.mask is not None and s.module_path == f"blocks.{s.layer}.attn"


def test_annotations_mark_every_site_node(explicit):
    gm = explicit.gm
    by_site = ir.site_nodes(gm)
    sites = ir.sites(gm)
    assert set(by_site) == {s.id for s in sites}
    for s in sites:
        infos = [meta.get(n) for n in by_site[s.id]]
        assert all(i.layer == s.layer and i.module_path == s.module_path for i in infos)
    roles = {(i.site, i.role) for n in gm.graph.nodes if (i := meta.get(n)) is not None}
    for s in ir.attention_sites(gm):
        assert {(s.id, r) for r in ("attn.q", "attn.k", "attn.v", "attn.qk", "attn.softmax", "attn.pv",
                                    "attn.out")} <= roles
        assert meta.get(s.q_proj).role == "attn.q" and meta.get(s.o_proj).role == "attn.out"
    for s in ir.mlp_sites(gm):
        assert {(s.id, r) for r in ("mlp.up", "mlp.act", "mlp.down")} <= roles
        assert meta.get(s.down).role == "mlp.down"
    assert meta.check(gm) == []


def test_networkx_view_is_the_dataflow_graph(explicit):
    gm = explicit.gm
    g = ir.to_networkx(gm)
    assert isinstance(g, nx.DiGraph)
    assert g.number_of_nodes() == len(gm.graph.nodes)
    uses = {(src.name, n.name) for n in gm.graph.nodes for src in n.all_input_nodes}
    assert set(g.edges) == uses
    assert nx.is_directed_acyclic_graph(g)
    down = ir.mlp_sites(gm)[0].down
    attrs = g.nodes[down.name]
    assert (attrs["kind"], attrs["site"], attrs["role"]) == ("linear", "mlp:blocks.0.mlp", "mlp.down")
    assert attrs["shape"] == ir.shape(down)
    # a graph algorithm on it: every MLP's down projection is reachable from the token ids
    ids = next(n.name for n in gm.graph.nodes if n.op == "placeholder")
    assert all(nx.has_path(g, ids, s.down.name) for s in ir.mlp_sites(gm))


# -- hand-made blocks: dialects and variants that the default run would otherwise not cover -----------------


class SwiGLU(torch.nn.Module):
    def __init__(self, dim=16, hidden=48):
        super().__init__()
        self.gate_proj, self.up_proj = torch.nn.Linear(dim, hidden), torch.nn.Linear(dim, hidden)
        self.down_proj = torch.nn.Linear(hidden, dim)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class CausalGQA(torch.nn.Module):
    """SDPA attention with 4 query heads sharing 2 KV heads, causal."""

    def __init__(self, dim=32, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q_proj = torch.nn.Linear(dim, dim)
        self.k_proj = torch.nn.Linear(dim, kv_heads * self.head_dim)
        self.v_proj = torch.nn.Linear(dim, kv_heads * self.head_dim)
        self.o_proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class Wrapped(torch.nn.Module):
    def __init__(self, inner, refuse_export=False):
        super().__init__()
        self.block, self.refuse_export = inner, refuse_export

    def forward(self, x):
        if self.refuse_export and torch.compiler.is_exporting():
            raise RuntimeError("refuses export, so capture falls back to torch.fx")
        return self.block(x)


def _trace(inner, refuse_export):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Wrapped(inner(), refuse_export).eval()
    gm = sg.trace(model, (torch.randn(2, 5, 16 if inner is SwiGLU else 32),))
    dialect = ("fx" if any(n.op == "call_module" and n.target != "_guards_fn" for n in gm.graph.nodes)
               else "aten")
    assert dialect == ("fx" if refuse_export else "aten")
    return gm


@pytest.mark.parametrize("refuse_export", [False, True], ids=["export", "fx"])
def test_gated_mlp_found_in_both_dialects(refuse_export):
    gm = _trace(SwiGLU, refuse_export)
    assert ir.attention_sites(gm) == []
    (s,) = ir.mlp_sites(gm)
    assert (s.id, s.module_path, s.gated, s.activation, s.hidden, s.intermediate) == (
        "mlp:block", "block", True, "silu", 16, 48)
    assert ([_path(n) for n in (s.gate, s.up, s.down)]
            == ["block.gate_proj", "block.up_proj", "block.down_proj"])
    assert ir.kind(s.mul) == "mul"


class FusedSwiGLU(torch.nn.Module):
    """Phi-3's MLP: gate and up are the halves of one linear's output, cut by ``chunk``, ``split`` or slices
    (then with the gate the second half)."""

    def __init__(self, cut, dim=32, hidden=48):
        super().__init__()
        self.cut, self.hidden = cut, hidden
        self.gate_up_proj, self.down_proj = torch.nn.Linear(dim, 2 * hidden), torch.nn.Linear(hidden, dim)

    def forward(self, x):
        h = self.gate_up_proj(x)
        if self.cut == "chunk":
            gate, up = h.chunk(2, dim=-1)
        elif self.cut == "split":
            gate, up = h.split(self.hidden, dim=-1)
        else:
            up, gate = h[..., :self.hidden], h[..., self.hidden:]
        return self.down_proj(up * F.silu(gate))


@pytest.mark.parametrize("cut", ["chunk", "split", "slice"])
@pytest.mark.parametrize("refuse_export", [False, True], ids=["export", "fx"])
def test_fused_gated_mlp_found_in_both_dialects(refuse_export, cut):
    gm = _trace(lambda: FusedSwiGLU(cut), refuse_export)
    (s,) = ir.mlp_sites(gm)
    assert (s.id, s.gated, s.fused, s.activation, s.hidden, s.intermediate, s.gate_half) == (
        "mlp:block", True, True, "silu", 32, 48, 1 if cut == "slice" else 0)
    assert s.up is s.gate and _path(s.up) == "block.gate_up_proj" and _path(s.down) == "block.down_proj"
    assert [ir.shape(h)[-1] for h in s.halves] == [48, 48]
    assert ir.producers_through(s.act.args[0], frozenset({"shape"}), lambda n: n is s.halves[s.gate_half])
    roles = [meta.get(n).role for n in (s.up, s.act, s.mul, s.down)]
    assert roles == ["mlp.up", "mlp.act", "mlp.mul", "mlp.down"]  # the fused linear is the site's up


class TanhGELUMLP(torch.nn.Module):
    """GPT-2's MLP on linear layers: GELU's tanh approximation written out as Hugging Face's
    ``NewGELUActivation`` does (`kappa` other than 0.044715: some other function)."""

    def __init__(self, kappa=0.044715, dim=32, hidden=64):
        super().__init__()
        self.kappa = kappa
        self.c_fc, self.c_proj = torch.nn.Linear(dim, hidden), torch.nn.Linear(hidden, dim)

    def forward(self, x):
        h = self.c_fc(x)
        return self.c_proj(0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + self.kappa
                                                                                      * torch.pow(h, 3.0)))))


@pytest.mark.parametrize("refuse_export", [False, True], ids=["export", "fx"])
def test_written_out_tanh_gelu_is_a_gelu_activation_in_both_dialects(refuse_export):
    gm = _trace(TanhGELUMLP, refuse_export)
    (s,) = ir.mlp_sites(gm)
    assert (s.id, s.gated, s.activation, s.hidden, s.intermediate) == ("mlp:block", False, "gelu", 32, 64)
    assert ir.kind(s.act) == "mul" and meta.get(s.act).role == "mlp.act"  # the chain's last multiply
    assert ir.users_through(s.act, frozenset()) == [s.down]
    assert ir.mlp_sites(_trace(lambda: TanhGELUMLP(kappa=0.05), refuse_export)) == []


class _GPT2MLP(torch.nn.Module):
    """Hugging Face's GPT-2 MLP: Conv1D projections (weight [in, out], ``addmm``) around ``gelu_new``;
    `strided` feeds it the first 32 features of a wider tensor (a view, not contiguous)."""

    def __init__(self, strided=False):
        super().__init__()
        from transformers.activations import NewGELUActivation
        from transformers.pytorch_utils import Conv1D

        self.strided = strided
        self.c_fc, self.act, self.c_proj = Conv1D(64, 32), NewGELUActivation(), Conv1D(32, 64)
        torch.nn.init.normal_(self.c_fc.bias), torch.nn.init.normal_(self.c_proj.bias)

    def forward(self, x):
        x = x[..., :32] if self.strided else x
        return self.c_proj(self.act(self.c_fc(x)))


def _gpt2_mlp(strided):
    pytest.importorskip("transformers")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Wrapped(_GPT2MLP(strided)).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gm = sg.trace(model, (torch.randn(2, 5, 40 if strided else 32),))
    assert model.state_dict().keys() == state.keys()  # the user's model is not changed
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    for shape in ((2, 5), (3, 9)):
        x = torch.randn(*shape, 40 if strided else 32)
        with torch.no_grad():
            torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)  # exactly, bit for bit
    return model.block, gm


def test_conv1d_becomes_a_linear_on_a_view_of_its_weight():
    block, gm = _gpt2_mlp(strided=False)
    assert not [n for n in gm.graph.nodes if n.target is torch.ops.aten.addmm.default]
    (s,) = ir.mlp_sites(gm)
    assert (s.id, s.activation, s.hidden, s.intermediate) == ("mlp:block", "gelu", 32, 64)
    for node, conv in ((s.up, block.c_fc), (s.down, block.c_proj)):
        parts = ir.linear_parts(node)
        assert len(ir.shape(parts.x)) == 3  # the input itself, not flattened to 2-D
        assert torch.equal(parts.weight, conv.weight.t()) and parts.bias is conv.bias
        assert parts.weight.data_ptr() == conv.weight.data_ptr()  # a view: shared, not copied
    assert [_path(n) for n in (s.up, s.down)] == ["block.c_fc", "block.c_proj"]


def test_conv1d_on_a_strided_input_stays_addmm():
    """``linear`` on a non-contiguous input would not be the same addmm: the Conv1D is left as it is."""
    _, gm = _gpt2_mlp(strided=True)
    assert len([n for n in gm.graph.nodes if n.target is torch.ops.aten.addmm.default]) == 1
    assert ir.mlp_sites(gm) == []  # c_fc is not a linear, so no site


@pytest.mark.parametrize("refuse_export", [False, True], ids=["export", "fx"])
def test_causal_gqa_attention_found_in_both_dialects(refuse_export):
    gm = _trace(CausalGQA, refuse_export)
    assert ir.mlp_sites(gm) == []
    (s,) = ir.attention_sites(gm)
    assert (s.id, s.form, s.heads, s.kv_heads, s.head_dim, s.causal, s.gqa) == (
        "attn:block", "sdpa", 4, 2, 8, True, True)
    assert [_path(n) for n in (s.q_proj, s.k_proj, s.v_proj, s.o_proj)] == [
        f"block.{p}_proj" for p in "qkvo"]


class _ScoredSDPA(torch.nn.Module):
    def forward(self, q, k, v, mask):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.1,
                                                                scale=0.3)


class _ScoredChain(torch.nn.Module):
    """Scores divided by 4, a padding mask added and a causal one masked_fill-ed, then softmax."""

    def forward(self, q, k, v, pad):
        causal = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).triu(1)
        s = (q @ k.transpose(-1, -2) / 4 + pad).masked_fill(causal, float("-inf"))
        return torch.softmax(s, -1) @ v


class _Unreadable(torch.nn.Module):
    """Scores multiplied by a tensor: not a scale, not a mask."""

    def forward(self, q, k, v, w):
        return torch.softmax((q @ k.transpose(-1, -2)) * w, -1) @ v


def test_how_the_scores_are_made_is_read_once_into_the_site():
    q = k = v = torch.randn(1, 2, 8, 4)
    (sdpa,) = ir.attention_sites(sg.trace(_ScoredSDPA(), (q, k, v, torch.zeros(1, 1, 1, 8))))
    assert (sdpa.scale, sdpa.dropout, sdpa.is_causal, sdpa.readable) == (0.3, 0.1, False, True)
    assert [how for _, how in sdpa.masks] == ["sdpa"] and sdpa.masks[0][0] is sdpa.mask
    (chain,) = ir.attention_sites(sg.trace(_ScoredChain(), (q, k, v, torch.zeros(1, 1, 1, 8))))
    assert chain.key_transposed and chain.causal and chain.scale == 0.25 and chain.dropout == 0.0
    assert sorted(how for _, how in chain.masks) == ["add", "masked_fill"]
    (odd,) = ir.attention_sites(sg.trace(_Unreadable(), (q, k, v, torch.rand(1, 2, 8, 8))))
    assert not odd.readable and odd.scale is None and odd.masks == ()


# -- kinds of sites in diffusion transformers: cross-attention, and conditioning MLPs that are no sites ------


class CrossAttention(torch.nn.Module):
    """Queries from the tokens x, keys and values from a prompt (another sequence), as a DiT's attn2."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (torch.nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, prompt):
        def split(t):
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(prompt)), split(self.v(prompt)))
        return self.o(out.transpose(1, 2).flatten(2))


class AdaLNBlock(torch.nn.Module):
    """A timestep MLP and an AdaLN modulation (SiLU → linear, one row per sample, broadcast over the tokens)
    before a token MLP: only the token MLP is a site."""

    def __init__(self, dim=32):
        super().__init__()
        self.time = torch.nn.Sequential(torch.nn.Linear(16, dim), torch.nn.SiLU(), torch.nn.Linear(dim, dim))
        self.ada = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(dim, 2 * dim))
        self.norm = torch.nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 64), torch.nn.GELU(), torch.nn.Linear(64, dim))

    def forward(self, x, t):
        shift, scale = self.ada(self.time(t)).chunk(2, dim=-1)
        return x + self.mlp(self.norm(x) * (1 + scale[:, None]) + shift[:, None])


class Tabular(torch.nn.Module):
    """An MLP on [batch, features]: one row per sample, but nothing is broadcast: a site."""

    def __init__(self):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(16, 48), torch.nn.ReLU(), torch.nn.Linear(48, 16))

    def forward(self, x, t):
        return self.mlp(t)


def _trace_two(model, second, refuse_export):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        inner = model()

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = inner

        def forward(self, x, y):
            if refuse_export and torch.compiler.is_exporting():
                raise RuntimeError("refuses export, so capture falls back to torch.fx")
            return self.block(x, y)

    return sg.trace(Two().eval(), (torch.randn(2, 5, 32), torch.randn(2, *second)))


@pytest.mark.parametrize("refuse_export", [False, True], ids=["export", "fx"])
def test_cross_attention_is_its_own_kind_of_site(refuse_export):
    gm = _trace_two(CrossAttention, (7, 32), refuse_export)
    assert ir.attention_sites(gm) == []  # not a target of attention patterns or token pruning
    (s,) = ir.cross_attention_sites(gm)
    assert (s.id, s.layer, s.cross, s.kind, s.heads) == ("xattn:block", 0, True, "cross_attention", 4)
    assert [_path(n) for n in (s.q_proj, s.k_proj, s.v_proj, s.o_proj)] == [f"block.{p}" for p in "qkvo"]
    assert meta.get(s.q_proj).site == "xattn:block"
    assert [d["kind"] for d in sg.plan.describe_sites(gm)] == ["cross_attention"]


@pytest.mark.parametrize("refuse_export", [False, True], ids=["export", "fx"])
def test_conditioning_mlps_are_no_sites_but_a_tabular_mlp_is(refuse_export):
    gm = _trace_two(AdaLNBlock, (16,), refuse_export)
    assert [s.id for s in ir.mlp_sites(gm)] == ["mlp:block.mlp"]
    (tabular,) = ir.mlp_sites(_trace_two(Tabular, (16,), refuse_export))
    assert (tabular.id, tabular.hidden, tabular.intermediate) == ("mlp:block.mlp", 16, 48)
