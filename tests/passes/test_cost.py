"""cost: analytic MAC counts on real architectures, per site and per node."""

import pytest
import torch

import sparsegraph as sg
from sparsegraph import ir, models
from sparsegraph.cost_model import node_cost, site_costs, total_cost


def test_minilm_seq128_matches_the_analytic_count():
    """MiniLM-L6, batch 1, sequence S = 128, d = 384, intermediate I = 1536, 6 layers:
    per layer Q, K, V, O projections 4·S·d², attention scores and weighted sum 2·S²·d, MLP 2·S·d·I.
    Total = 6 · (4·S·d² + 2·S²·d + 2·S·d·I) = 1.4345 GMACs (pooling and norms have no MACs)."""
    S, d, inter = 128, 384, 1536
    analytic = 6 * (4 * S * d * d + 2 * S * S * d + 2 * S * d * inter)
    model, example = models.load("minilm", seq_len=S, batch=1)
    gm = sg.trace(model, example)
    macs = total_cost(gm).macs
    assert abs(macs - analytic) / analytic <= 0.03, (macs, analytic)
    per_site = site_costs(gm)
    assert per_site["mlp:encoder.encoder.layer.0"].macs == 2 * S * d * inter
    assert per_site["attn:encoder.encoder.layer.0.attention"].macs == 4 * S * d * d + 2 * S * S * d


@pytest.mark.slow
@pytest.mark.ci
def test_vit_b_16_is_17_56_gmacs():
    model, example = models.load("vit_b_16")
    gm = sg.trace(model, example)
    gmacs = total_cost(gm).macs / 1e9
    assert abs(gmacs - 17.56) / 17.56 <= 0.03, gmacs


def test_cost_pass_writes_site_evidence_and_summary():
    model, example = models.load("explicit_attention")
    cm = sg.compile(model, "analyze", example_inputs=example, quiet=True)
    gm = cm.graph_module
    summary = cm.plan.summary("cost")
    assert summary["macs"] == total_cost(gm).macs
    assert set(summary["macs_by_kind"]) <= {"linear", "matmul", "bmm", "sdpa", "conv"}
    stats = cm.plan.passes["cost"]["stats"]
    assert stats["matched"] == len(ir.sites(gm)) == 6 and stats["rewritten"] == 0
    for s in ir.sites(gm):
        assert cm.plan.evidence("cost", s.id)["macs"] == site_costs(gm)[s.id].macs > 0
    assert summary["heaviest"][0]["macs"] == max(node_cost(n).macs for n in gm.graph.nodes)


def test_linear_and_matmul_rules_and_bytes():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(16, 8)

        def forward(self, x, y):
            return self.fc(x) @ y

    x, y = torch.randn(2, 5, 16), torch.randn(2, 8, 3)
    gm = sg.trace(M(), (x, y))
    costs = {ir.kind(n): node_cost(n) for n in gm.graph.nodes if node_cost(n).macs}
    assert costs["linear"].macs == 2 * 5 * 16 * 8
    assert costs["matmul"].macs == 2 * 5 * 8 * 3
    # bytes: x, W, b read, y written (fp32)
    assert costs["linear"].bytes == 4 * (2 * 5 * 16 + 16 * 8 + 8 + 2 * 5 * 8)
