"""head_patterns: planted per-head patterns are recovered; evidence shape, recall, streaming, explicit
sites."""

import pytest
import torch
import torch.nn.functional as F

import sparsegraph as sg
from sparsegraph import ir
from sparsegraph.attention_layouts import pattern_mask
from sparsegraph.passes.analysis.head_patterns import choose

BLOCK = 16


class _SDPA(torch.nn.Module):
    def __init__(self, causal=False):
        super().__init__()
        self.causal = causal

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)


def _planted(kinds, L=128, E=32, batch=2, seed=0, strength=20.0):
    """q, k, v whose heads attend as `kinds` says, at block granularity BLOCK.

    local: q_i, k_j share a one-hot of their block index → mass on the diagonal block;
    vertical_slash: plus a shared direction on key blocks 2 and 5 → columns 2, 5 and the diagonal;
    multi_diagonal: keys also carry the one-hots of the blocks 3 before and after → diagonals −3, 0, 3;
    dense: small random q, k → nearly uniform attention.
    """
    g = torch.Generator().manual_seed(seed)
    nb = L // BLOCK
    blocks = torch.arange(L) // BLOCK
    onehot = F.one_hot(blocks, E).float()  # E ≥ nb + 1: the last coordinate is the shared direction
    shared = torch.zeros(L, E)
    shared[:, -1] = 1.0
    column = torch.isin(blocks, torch.tensor([2, 5])).float()[:, None]
    assert nb < E
    qs, ks = [], []
    for kind in kinds:
        noise_q, noise_k = (torch.randn(batch, L, E, generator=g) * 0.05 for _ in range(2))
        if kind == "local":
            q, k = onehot * strength, onehot * strength
        elif kind == "vertical_slash":
            q = (onehot + shared) * strength
            k = (onehot + shared * column) * strength
        elif kind == "multi_diagonal":
            shifted = F.one_hot((blocks + 3).clamp(max=E - 1), E).float() * (blocks + 3 < nb)[:, None]
            shifted += F.one_hot((blocks - 3).clamp(min=0), E).float() * (blocks >= 3)[:, None]
            q, k = onehot * strength, (onehot + shifted) * strength
        else:
            q, k = torch.randn(L, E, generator=g) * 0.1, torch.randn(L, E, generator=g) * 0.1
        qs.append(q + noise_q)
        ks.append(k + noise_k)
    q, k = torch.stack(qs, 1) / E ** 0.25, torch.stack(ks, 1) / E ** 0.25  # SDPA scales by 1/√E
    return q, k, torch.randn(batch, len(kinds), L, E, generator=g)


KINDS = ["local", "vertical_slash", "multi_diagonal", "dense"] * 3


def _compile(model, example, batches, **options):
    config = {"passes": [{"head_patterns": {"block": BLOCK, **options}}]}
    return sg.compile(model, config, example_inputs=example, calibration=batches, quiet=True)


def test_planted_patterns_are_recovered():
    q, k, v = _planted(KINDS)
    batches = [_planted(KINDS, seed=s) for s in range(1, 3)]
    cm = _compile(_SDPA(), (q, k, v), batches)
    (site,) = [s for s in cm.plan.sites if "head_patterns" in cm.plan.sites[s]]
    heads = cm.plan.evidence("head_patterns", site)["heads"]
    assert len(heads) == len(KINDS)
    recovered = sum(h["pattern"] == kind for h, kind in zip(heads, KINDS))
    assert recovered / len(KINDS) >= 0.95, [h["pattern"] for h in heads]
    for h, kind in zip(heads, KINDS):
        assert h["recall"] >= 0.95
        if kind == "local":
            assert h["params"] == {"window": 1}
        if kind == "vertical_slash":
            assert h["params"]["columns"] == [2, 5] and h["params"]["diagonals"] == [0]
        if kind == "multi_diagonal":
            assert h["params"] == {"diagonals": [-3, 0, 3]}


def test_causal_planted_local_heads():
    kinds = ["local", "dense"]
    q, k, v = _planted(kinds)
    cm = _compile(_SDPA(causal=True), (q, k, v), [(q, k, v)])
    site = next(iter(cm.plan.sites))
    ev = cm.plan.evidence("head_patterns", site)
    assert ev["causal"] is True
    assert [h["pattern"] for h in ev["heads"]] == kinds
    nq = 128 // BLOCK
    # the diagonal of the triangle
    assert ev["heads"][0]["density"] == pytest.approx(nq / (nq * (nq + 1) / 2))


def test_streaming_over_query_chunks_gives_the_same_mass():
    q, k, v = _planted(KINDS[:3])
    whole = _compile(_SDPA(), (q, k, v), [(q, k, v)], query_chunk=1024)
    chunks = _compile(_SDPA(), (q, k, v), [(q, k, v)], query_chunk=BLOCK)
    site = next(iter(whole.plan.sites))
    assert whole.plan.evidence("head_patterns", site) == chunks.plan.evidence("head_patterns", site)


def test_choose_takes_the_cheapest_pattern_meeting_the_recall():
    nq = 8
    mass = torch.rand(nq, nq, generator=torch.Generator().manual_seed(0)) * 1e-3
    mass[:, 0] += 1.0  # a sink column
    mass += torch.eye(nq)  # and the diagonal
    got = choose(mass, False, 0.95)
    assert got["pattern"] in ("sink_local", "vertical_slash") and got["blocks"] == 2 * nq - 1
    assert got["recall"] >= 0.95
    assert choose(mass, False, 1.0)["pattern"] == "dense"  # only dense keeps everything
    # every family's mask is within the allowed (causal) blocks
    for p, params in [("local", {"window": 2}), ("sink_local", {"sinks": 1, "window": 1}),
                      ("vertical_slash", {"columns": [3], "diagonals": [0, 1]})]:
        assert not (pattern_mask(p, params, nq, nq, True)
                    & ~torch.ones(nq, nq, dtype=torch.bool).tril()).any()


def test_recall_override_per_site_and_plan_round_trip(tmp_path):
    q, k, v = _planted(KINDS[:3])
    config = {"passes": [{"head_patterns": {"block": BLOCK, "recall": 0.95}}],
              "overrides": {"*": {"head_patterns": {"recall": 0.5}}}}
    cm = sg.compile(_SDPA(), config, example_inputs=(q, k, v), calibration=[(q, k, v)], quiet=True)
    site = next(iter(cm.plan.sites))
    ev = cm.plan.evidence("head_patterns", site)
    assert ev["recall_target"] == 0.5
    cm.plan.save(tmp_path / "plan.json")
    again = sg.compile(_SDPA(), plan=tmp_path / "plan.json", example_inputs=(q, k, v), quiet=True)
    assert again.plan.evidence("head_patterns", site) == ev


def test_explicit_attention_sites_observe_the_softmax(explicit_calibrated):
    model, example, batches = explicit_calibrated
    cm = sg.compile(model, {"passes": [{"head_patterns": {"block": 16}}]}, example_inputs=example,
                    calibration=batches, quiet=True)
    evidence = [cm.plan.evidence("head_patterns", s) for s in cm.plan.sites]
    evidence = [e for e in evidence if e is not None]
    assert len(evidence) == 3  # three layers
    for e in evidence:
        assert e["seq_len"] in (48, example[0].shape[1]) and len(e["heads"]) == 4
        assert all(h["recall"] >= 0.95 and 0 < h["density"] <= 1 for h in e["heads"])
    assert cm.plan.passes["head_patterns"]["stats"]["matched"] == 3


def test_unknown_family_is_a_config_error():
    with pytest.raises(sg.ConfigError, match="unknown pattern"):
        sg.compile(_SDPA(), {"passes": [{"head_patterns": {"patterns": ["diagonal"]}}]},
                   example_inputs=_planted(["local"])[:3], calibration=[_planted(["local"])], quiet=True)



def test_a_head_with_constant_output_is_skipped_and_replaced_by_its_mean():
    """Head 1 reads constant values: whatever it attends to, its output is the same vector (share 0)."""
    def constant_head(batch):
        q, k, v = batch
        v = v.clone()
        v[:, 1] = torch.linspace(-1, 1, v.shape[-1])
        return q, k, v

    kinds = ["local", "dense", "vertical_slash"]
    example = constant_head(_planted(kinds))
    batches = [constant_head(_planted(kinds, seed=s)) for s in range(1, 3)]
    config = {"passes": [{"head_patterns": {"block": BLOCK, "skip_share": 1e-6}},
                         {"sparse_attention": {"max_density": 1.0}}]}
    cm = sg.compile(_SDPA(), config, example_inputs=example, calibration=batches, quiet=True)
    (site,) = [s for s in cm.plan.sites if "head_patterns" in cm.plan.sites[s]]
    heads = cm.plan.evidence("head_patterns", site)["heads"]
    assert [h["pattern"] for h in heads] == ["local", "skip", "vertical_slash"]
    assert heads[1]["output_share"] < 1e-6 < heads[0]["output_share"]
    torch.testing.assert_close(torch.tensor(heads[1]["params"]["mean"]), torch.linspace(-1, 1, 32), atol=1e-5,
                               rtol=0)
    adds = [n for n in cm.graph_module.graph.nodes if n.target is torch.ops.aten.add.Tensor]
    assert len(adds) == 1  # the skipped head's mean, added after the op
    q, k, v = constant_head(_planted(kinds, seed=7))
    with torch.no_grad():
        got, dense = cm(q, k, v), F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(got[:, 1], dense[:, 1], atol=1e-5, rtol=0)  # exact for the skipped head


def test_skipping_is_off_by_default():
    cm = _compile(_SDPA(), _planted(KINDS[:3]), [_planted(KINDS[:3], seed=1)])
    (site,) = [s for s in cm.plan.sites if "head_patterns" in cm.plan.sites[s]]
    assert all(h["pattern"] != "skip" and "output_share" in h
               for h in cm.plan.evidence("head_patterns", site)["heads"])


@pytest.mark.parametrize("form", ["sdpa", "explicit"])
def test_a_head_that_moves_with_the_input_gets_dynamic_topk(moving_heads, explicit_chain, form):
    """At SDPA sites and at explicit chains (q, kᵀ, scale and a masked_fill read as the rewrite does)."""
    batches = [moving_heads(2, seed) for seed in range(4)]
    model = _SDPA() if form == "sdpa" else explicit_chain(padded=4)
    cm = _compile(model, batches[0], batches)
    (site,) = cm.plan.sites
    assert [s.form for s in ir.attention_sites(cm.graph_module)] == [form]
    (head,) = cm.plan.evidence("head_patterns", site)["heads"]
    # the diagonal (always listed) and the input's own target: 2 blocks per row, nearly all the mass
    assert head["pattern"] == "dynamic_topk" and head["params"] == {"k": 2}, head
    assert head["recall"] >= 0.95 and head["density"] == pytest.approx(2 / (128 // BLOCK))
    # without the family, the static patterns must list (nearly) everything
    static = _compile(model, batches[0], batches, patterns=["dense", "local", "vertical_slash", "block_topk"])
    assert static.plan.evidence("head_patterns", site)["heads"][0]["density"] > 0.5


def test_choose_takes_dynamic_topk_only_where_it_is_cheaper():
    nq = 8
    mass = torch.eye(nq) + 1e-4
    captured = torch.full((nq,), float(mass.sum()))  # the estimate keeps everything with t = 1
    assert choose(mass, False, 0.95, captured=captured)["pattern"] == "local"  # same blocks, no overhead
    scattered = torch.rand(nq, nq, generator=torch.Generator().manual_seed(0))
    captured = scattered.sum() * torch.tensor([0.96] + [1.0] * (nq - 1))
    got = choose(scattered, False, 0.95, captured=captured)
    assert got["pattern"] == "dynamic_topk" and got["params"] == {"k": 1} and got["blocks"] == nq
    assert choose(scattered, False, 0.95)["pattern"] == "dense"  # not observed: not a candidate


def test_heads_with_the_same_layout_are_grouped_in_the_plan():
    q, k, v = _planted(KINDS)
    cm = _compile(_SDPA(), (q, k, v), [_planted(KINDS, seed=s) for s in range(1, 3)])
    ev = cm.plan.evidence("head_patterns", next(iter(cm.plan.sites)))
    groups = ev["groups"]
    assert sorted(h for g in groups for h in g["heads"]) == list(range(len(KINDS)))
    for g in groups:  # one layout per group
        assert len({str((ev["heads"][h]["pattern"], ev["heads"][h]["params"])) for h in g["heads"]}) == 1
    local = next(g for g in groups if g["pattern"] == "local")
    assert local["heads"] == [i for i, kind in enumerate(KINDS) if kind == "local"]
