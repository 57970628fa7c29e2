"""decode_attention: the decode step's SDPA becomes sparsegraph::decode_attention on the cache itself (the
GQA repeat gone); nothing changes in the full-sequence and prefill graphs; counts and refusals; tokens
equal to Hugging Face's when every block is read, equal to the reference op otherwise."""

import collections
import copy

import pytest
import torch

import sparsegraph as sg
from sparsegraph import ir
from sparsegraph.codegen import use_backend
from sparsegraph.codegen.decode_attention import OP

# heavy for the default run (kept under 6 minutes on 2 cores): CI runs these after it
pytestmark = [pytest.mark.slow, pytest.mark.ci]


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


def _prompt():
    ids = torch.randint(1, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    return ids, mask


CALIBRATION = [torch.randint(1, 256, (2, 32), generator=torch.Generator().manual_seed(i)) for i in range(2)]


def _dynamic(keep):
    return {"passes": [{"decode_attention": {"mode": "dynamic", "keep": keep, "block": 4}}]}


@pytest.fixture(scope="module")
def model():
    return _llama()


def _ops(gm):
    return collections.Counter(str(n.target) for n in gm.graph.nodes if "sparsegraph" in str(n.target))


def test_only_the_decode_step_is_rewritten_and_it_reads_the_cache_itself(model):
    ids, _ = _prompt()
    cm = sg.compile(model, _dynamic(0.5), example_inputs=(ids,), quiet=True)
    stats = cm.plan.passes["decode_attention"]["stats"]
    assert (stats["matched"], stats["rewritten"], stats["counters"]) == (2, 0, {"not a decode step": 2})
    decoder = cm.decoder()
    assert not _ops(decoder.prefill) and not _ops(cm.graph_module)
    assert _ops(decoder.step) == {"sparsegraph.decode_attention.default": 2}
    calls = [n for n in decoder.step.graph.nodes if n.target is OP.overload]
    assert all(ir.shape(n.args[1])[1] == ir.shape(n.args[2])[1] == 2 for n in calls)  # the 2 kv heads
    # the GQA repeat of the cache (unsqueeze → expand → reshape) is gone with the SDPA
    assert not [n for n in decoder.step.graph.nodes if ir.kind(n) == "sdpa" or "expand" in str(n.target)]


def test_reading_every_block_gives_hugging_face_tokens_and_fewer_match_the_reference(model):
    ids, mask = _prompt()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    every = sg.compile(model, _dynamic(1.0), example_inputs=(ids,), quiet=True)
    assert torch.equal(every.generate(ids, mask, max_new_tokens=8, pad_token_id=0), expected)
    some = sg.compile(model, _dynamic(0.3), example_inputs=(ids,), quiet=True)
    got = some.generate(ids, mask, max_new_tokens=8, pad_token_id=0)
    with use_backend("reference"):
        assert torch.equal(some.decoder().generate(ids, mask, max_new_tokens=8, pad_token_id=0), got)


def test_static_heads_come_from_head_patterns_and_are_refused_without_them(model):
    ids, _ = _prompt()
    alone = sg.compile(model, {"passes": ["decode_attention"]}, example_inputs=(ids,), quiet=True)
    reasons = {r["reason"] for r in alone.plan.passes["decode_attention"]["stats"]["refused"]}
    assert reasons == {"head_patterns did not measure this site: run it first, or use mode: dynamic"}

    profiled = sg.compile(model, {"passes": [{"head_patterns": {"block": 4}}]}, example_inputs=(ids,),
                          calibration=CALIBRATION, quiet=True).plan
    plan = copy.deepcopy(profiled)
    sink_local = {"pattern": "sink_local", "params": {"sinks": 1, "window": 2}, "recall": 0.9, "density": 0.5}
    for site in plan.sites.values():  # facts as head_patterns writes them for sink + local heads
        evidence = site["head_patterns"]["evidence"]
        evidence["heads"] = [dict(sink_local)] * len(evidence["heads"])
    config = {"passes": [{"head_patterns": {"block": 4}}, "decode_attention"]}
    cm = sg.compile(model, config, plan=plan, example_inputs=(ids,), quiet=True)
    decisions = [s["decode_attention"]["decision"] for s in cm.plan.sites.values() if "decode_attention" in s]
    assert len(decisions) == 2 and all(d["block"] == 4 and d["keep"] == 0.0 for d in decisions)
    assert all(h["pattern"] == "sink_local" for d in decisions for h in d["heads"])
    assert _ops(cm.decoder().step) == {"sparsegraph.decode_attention.default": 2}


@pytest.mark.slow
@pytest.mark.ci
def test_static_decode_attention_exports_and_runs_in_onnxruntime(model, tmp_path):
    ids, mask = _prompt()
    profiled = sg.compile(model, {"passes": [{"head_patterns": {"block": 4}}]}, example_inputs=(ids,),
                          calibration=CALIBRATION, quiet=True).plan
    for site in profiled.sites.values():
        evidence = site["head_patterns"]["evidence"]
        evidence["heads"] = [{"pattern": "sink_local", "params": {"sinks": 1, "window": 2}, "recall": 0.9,
                              "density": 0.5}] * len(evidence["heads"])
    config = {"passes": [{"head_patterns": {"block": 4}}, "decode_attention"]}
    eager = sg.compile(model, config, plan=profiled, example_inputs=(ids,), quiet=True)
    onnx = sg.compile(model, {**config, "backend": "onnx"}, plan=profiled, example_inputs=(ids,), quiet=True)
    expected = eager.generate(ids, mask, max_new_tokens=8)
    assert torch.equal(onnx.generate(ids, mask, max_new_tokens=8), expected)
    with pytest.raises(sg.errors.ExportError, match=r"keep > 0 .* has no ONNX translation"):
        sg.compile(model, _dynamic(0.3), example_inputs=(ids,), quiet=True).decoder().export_onnx(tmp_path)
