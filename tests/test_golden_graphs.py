"""What each rewrite does to a graph, printed (`ir.pretty`) before and after on the smallest module that
has its site: the expected text is the documentation (TVM's ``Expected`` / xDSL's FileCheck style).
Numbers that calibration decides are kept out of the printed graph where they would make it fragile
(top-k counts, shapes and structure are exact; thresholds and kept indices live in the plan)."""

import torch
import torch.nn.functional as F

import sparsegraph as sg
from sparsegraph import ir


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


def _mlp():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return _MLP().eval()


X = torch.randn(4, 8, 16, generator=torch.Generator().manual_seed(0))

MLP_BEFORE = """\
%linear = linear(%x, %up.weight[64, 16], %up.bias[64])  mlp.up @ mlp:0
%gelu = gelu(%linear)  mlp.act @ mlp:0
%linear_1 = linear(%gelu, %down.weight[16, 64], %down.bias[16])  mlp.down @ mlp:0
return [%linear_1]"""


def _after(config) -> str:
    model = _mlp()
    assert ir.pretty(sg.trace(model, (X,))) == MLP_BEFORE
    return ir.pretty(sg.compile(model, config, example_inputs=(X,), calibration=[X], quiet=True).graph_module)


def test_neuron_sparsity_turns_the_down_projection_into_sparse_linear():
    """Its weight stored input-major ([in, out]), the centre folded into the bias, k = 50% of 64 inputs."""
    assert _after({"passes": ["activation_profile",
                              {"neuron_sparsity": {"method": "topk", "target": 0.5}}]}) == """\
%linear = linear(%x, %up.weight[64, 16], %up.bias[64])  mlp.up @ mlp:0
%gelu = gelu(%linear)  mlp.act @ mlp:0
%sparse_linear_default = sparsegraph.sparse_linear(%gelu, %sg_down_weight_t[64, 16], \
%sg_down_sparse_bias[16], %sg_down_centre[64], 0, 32)  mlp.down @ mlp:0
return [%sparse_linear_default]"""


def test_neuron_pruning_slices_both_projections():
    """Half the intermediate neurons gone: up keeps 32 output rows, down 32 input columns (new buffers)."""
    assert _after({"passes": ["activation_profile", {"neuron_pruning": {"fraction": 0.5}}]}) == """\
%linear_default = linear(%x, %sg_up_weight[32, 16], %sg_up_bias[32])  mlp.up @ mlp:0
%gelu = gelu(%linear_default)  mlp.act @ mlp:0
%linear_default_1 = linear(%gelu, %sg_down_weight[16, 32], %sg_down_bias[16])  mlp.down @ mlp:0
return [%linear_default_1]"""


def test_nm_weights_packs_every_linear_two_of_four():
    """Values and their offsets, n/m of the input width each; the original bias is shared, not copied."""
    assert _after({"passes": [{"nm_weights": {"n": 2, "m": 4}}]}) == """\
%nm_linear_default = sparsegraph.nm_linear(%x, %sg_up_nm_values[64, 8], %sg_up_nm_offsets[64, 8], \
%up.bias[64], 2, 4)  mlp.up @ mlp:0
%gelu = gelu(%nm_linear_default)  mlp.act @ mlp:0
%nm_linear_default_1 = sparsegraph.nm_linear(%gelu, %sg_down_nm_values[16, 32], %sg_down_nm_offsets[16, 32], \
%down.bias[16], 2, 4)  mlp.down @ mlp:0
return [%nm_linear_default_1]"""


def test_speed_check_puts_the_dense_form_back():
    """A site that does not pay: the sparse op's own dense form, same operands, nothing skipped."""
    assert _after({"passes": ["activation_profile", {"neuron_sparsity": {"method": "topk", "target": 0.5}},
                             {"speed_check": {"min_speedup": 1e9, "repeats": 1, "warmup": 0}}]}) == """\
%linear = linear(%x, %up.weight[64, 16], %up.bias[64])  mlp.up @ mlp:0
%gelu = gelu(%linear)  mlp.act @ mlp:0
%dense = sparse_linear.dense(%gelu, %sg_down_weight_t[64, 16], %sg_down_sparse_bias[16], \
%sg_down_centre[64], 0, 32)  mlp.down @ mlp:0
return [%dense]"""


class _SDPA(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def test_sparse_attention_replaces_sdpa_with_a_layout_table():
    """Two heads that attend within their own block of 16 (planted): one diagonal each, laid out per call
    from a [heads, 8] table (header, one diagonal, one column slot, a 1×1 fixed grid)."""
    g = torch.Generator().manual_seed(0)
    blocks = torch.arange(64) // 16
    q = k = (F.one_hot(blocks, 32).float() * 20)[None, None].expand(2, 2, 64, 32) / 32 ** 0.25
    q = q + torch.randn(2, 2, 64, 32, generator=g) * 0.05
    v = torch.randn(2, 2, 64, 32, generator=g)
    model = _SDPA()
    assert ir.pretty(sg.trace(model, (q, k, v))) == """\
%scaled_dot_product_attention = scaled_dot_product_attention(%q, %k, %v)  attn.core @ attn:0
return [%scaled_dot_product_attention]"""
    cm = sg.compile(model, {"passes": [{"head_patterns": {"block": 16}}, "sparse_attention"]},
                    example_inputs=(q, k, v), calibration=[(q, k, v)], quiet=True)
    assert ir.pretty(cm.graph_module) == """\
%block_sparse_attention_default = sparsegraph.block_sparse_attention(%q, %k, %v, \
%sg_attn_0_attention_layout[2, 8], None, 16, False, 0.1768)  attn.core @ attn:0
return [%block_sparse_attention_default]"""


class _Block(torch.nn.Module):
    def __init__(self, d=32, heads=2):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.qkv, self.out = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.up, self.down = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, D))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class _TwoBlocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([_Block(), _Block()])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_token_pruning_selects_tokens_before_a_block_and_respecialises_what_follows():
    """The lines that change (a diff of the printed graphs): scores from block 0's q and k (its class
    token's attention), `token_select` on the stream before block 1, the stream replaced by the kept
    tokens, and the sizes block 1 reshapes with re-read from the shorter stream."""
    import difflib

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _TwoBlocks().eval()
    x = torch.randn(2, 24, 32, generator=torch.Generator().manual_seed(0))
    before = ir.pretty(sg.trace(model, (x,)))
    cm = sg.compile(model, {"passes": [{"token_pruning": {"layers": [1], "keep": 0.5}}]}, example_inputs=(x,),
                    quiet=True)
    diff = [line for line in difflib.unified_diff(before.splitlines(),
                                                  ir.pretty(cm.graph_module).splitlines(), lineterm="", n=0)
            if line[:1] in "+-" and line[:3] not in "+++---"]
    assert "\n".join(diff) == """\
+%token_scores_default = sparsegraph.token_scores(%getitem, %getitem_1, None, 0.25, 'cls', \
256)  attn.qkv @ attn:blocks.1
-%layer_norm_2 = layer_norm(%add_1, [32], %blocks.1.norm1.weight[32], %blocks.1.norm1.bias[32], 1e-05, False)
+%token_select_default = sparsegraph.token_select(%add_1, %token_scores_default, 0.5, 1, \
False)  attn.qkv @ attn:blocks.1
+%getitem_6 = getitem(%token_select_default, 0)  attn.qkv @ attn:blocks.1
+%layer_norm_2 = layer_norm(%getitem_6, [32], %blocks.1.norm1.weight[32], %blocks.1.norm1.bias[32], \
1e-05, False)
-%view_1 = view(%linear_4, [%sym_size_int_2, %sym_size_int_3, 3, 2, 16])
+%view_1 = view(%linear_4, [%sym_size_int_2, %sym_size_int, 3, 2, 16])
-%reshape_1 = reshape(%transpose_1, [%sym_size_int_2, %sym_size_int_3, 32])
+%reshape_1 = reshape(%transpose_1, [%sym_size_int_2, %sym_size_int, 32])
-%add_2 = add(%add_1, %linear_5)
+%add_2 = add(%getitem_6, %linear_5)"""
