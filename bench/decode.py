"""``python -m bench decode``: whole-model token-by-token generation, Hugging Face ``generate`` against our
dense and sparse decode, same run.

Model: a Llama config shaped like TinyLlama (hidden 2048, intermediate 5632, 32 query heads, 4 KV heads,
vocabulary 32000), ``--layers`` layers (default 8), random weights, fp32, batch 1. The prompt is
``--prompt`` random tokens; each candidate generates ``--new`` tokens greedily.

Candidates, interleaved, same inputs and threads:

- **HF generate**: ``model.generate`` with its own KV cache (``DynamicCache``), eager;
- **ours, dense**: ``sparsegraph.compile(model, "dense").generate``: the prefill and decode-step graphs
  over our static cache (`sparsegraph.generation`);
- **ours, sparse**: the ``llm-activation-sparsity`` pipeline (TEAL-style: ``--sparsity`` of the inputs of
  q/k/v, o, gate/up and down skipped, thresholds calibrated on random-token prompts), same graphs.

A second table times one decode step's attention alone at long caches (``--cache-lengths``, default
4k and 16k slots, all holding tokens; TinyLlama's 32 query heads and 4 KV heads of 64): dense as the
traced step does it (Hugging Face's ``repeat_kv`` copy of the cache, then masked SDPA), dense SDPA with
``enable_gqa`` (no copy: the fastest dense form here), and ``sparsegraph::decode_attention`` reading 10%
of the 64-slot blocks, static (a sink block and a local window) and dynamic (blocks of highest
block-mean q·k per kv head, chosen every step), and onnxruntime's own CPU ``com.microsoft::SparseAttention``
with the static layout (its cache bound in place by IO binding, which the op demands; see
`ort_sparse_attention`).

Time per generated token: the decode steps only (every token after the first), measured as the mean
interval between consecutive tokens; for HF by a logits processor that stamps the clock when each token
is chosen, for ours by the decode loop itself (`Decoder.last`). The median over ``--repeats`` rounds is
reported. Random weights say nothing about quality; the greedy-token agreement with dense is reported
for what it is (see ``python -m bench lm_quality`` for quality on a trained model).
"""

from __future__ import annotations

import statistics
import time

import torch

import sparsegraph as sg
from bench.common import machine, machine_line, parse, parser, table, write
from sparsegraph import attention_layouts, pipelines
from sparsegraph.codegen import decode_attention
from sparsegraph.codegen.block_sparse_attention import repeat_kv
from sparsegraph.measure import compare
from sparsegraph.registry import get_pass


class _Clock:
    """A logits processor that notes when each token is chosen (it runs once per generated token)."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores

    def per_token(self) -> float:
        return (self.stamps[-1] - self.stamps[0]) / (len(self.stamps) - 1)


def llama(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                         max_position_embeddings=4096)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


def sparse_config(sparsity: float) -> dict:
    """``llm-activation-sparsity`` at `sparsity`, which the profile records a threshold for (a target it
    did not record is refused site by site, and the model would run dense)."""
    config = pipelines.get("llm-activation-sparsity")
    for p in config["passes"]:
        if isinstance(p, dict) and "neuron_sparsity" in p:
            p["neuron_sparsity"]["target"] = sparsity
        if isinstance(p, dict) and "activation_profile" in p:  # its targets and this one
            defaults = get_pass("activation_profile").default_options()["targets"]
            p["activation_profile"]["targets"] = sorted({*defaults, sparsity})
    return config


def main(argv: list[str] | None = None) -> int:
    ap = parser("decode", __doc__, name="decode-cpu")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache-lengths", default="4096,16384")
    ap.add_argument("--read", type=float, default=0.1, help="share of cache blocks decode attention reads")
    args = parse(ap, argv)
    model = llama(args.layers)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, args.prompt), generator=g)
    calibration = [torch.randint(0, vocab, (1, args.prompt), generator=g) for _ in range(4)]
    started = time.perf_counter()
    dense = sg.compile(model, "dense", example_inputs=(prompt,), quiet=True)
    sparse = sg.compile(model, sparse_config(args.sparsity), example_inputs=(prompt,),
                        calibration=calibration, quiet=True)
    dense.decoder(), sparse.decoder()
    compile_s = time.perf_counter() - started

    def hf():
        clock = _Clock()
        with torch.inference_mode():
            out = model.generate(prompt, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                                 pad_token_id=0, logits_processor=[clock])
        return clock.per_token(), out

    def ours(cm):
        def run():
            out = cm.generate(prompt, max_new_tokens=args.new, eos_token_id=[])
            return cm.decoder().last.decode_s / (args.new - 1), out
        return run

    candidates = {"HF generate (dense, its KV cache)": hf, "ours, dense": ours(dense),
                  f"ours, sparse {args.sparsity:.0%}": ours(sparse)}
    per_token: dict[str, list[float]] = {k: [] for k in candidates}
    outputs = {}
    for _ in range(args.repeats):
        for name, run in candidates.items():
            seconds, outputs[name] = run()
            per_token[name].append(seconds)
    ms = {k: 1e3 * statistics.median(v) for k, v in per_token.items()}
    base = ms["HF generate (dense, its KV cache)"]
    reference = outputs["HF generate (dense, its KV cache)"][0, args.prompt:]
    agree = {k: (o[0, args.prompt:] == reference).float().mean().item() for k, o in outputs.items()}
    results = {"machine": machine(args.threads), "settings": vars(args), "compile_s": compile_s,
               "ms_per_token": ms, "speedup_vs_hf": {k: base / v for k, v in ms.items()},
               "tokens_per_s": {k: 1e3 / v for k, v in ms.items()},
               "greedy_agreement_with_hf": agree,
               "ops_in_sparse_step": sum("sparsegraph" in str(n.target)
                                         for n in sparse.decoder().step.graph.nodes)}
    rows = [[k, f"{v:.1f}", f"{1e3 / v:.2f}", f"{base / v:.2f}", f"{agree[k]:.2f}"] for k, v in ms.items()]
    md = "\n".join([
        machine_line(results["machine"]),
        f"Llama (TinyLlama-shaped: hidden 2048, intermediate 5632, 32 heads, 4 KV heads, vocabulary 32000), "
        f"{args.layers} layers, random weights, fp32, batch 1, prompt {args.prompt}, {args.new} new tokens "
        f"(greedy). Time per token over the decode steps, median of {args.repeats} interleaved rounds. "
        f"Sparse: TEAL-style input sparsity {args.sparsity:.0%} on q/k/v, o, gate/up and down "
        f"({results['ops_in_sparse_step']} sparse ops in the step graph). Agreement: share of the greedy "
        "tokens equal to HF's (random weights: not a quality figure).", "",
        *table(["candidate", "ms / token", "tokens / s", "speed-up vs HF generate", "token agreement"], rows),
        ""])
    attention = attention_table([int(n) for n in args.cache_lengths.split(",")], args.read)
    results["decode_attention_ms"] = attention
    md += "\n".join(["", f"One decode step's attention, batch 1, 32 query heads, 4 KV heads, head 64, "
                          f"blocks of 64 slots, {args.read:.0%} of the blocks read; median of 15 interleaved "
                          "calls.", "",
                      *table(["cache slots", *next(iter(attention.values())),
                              *(f"speed-up of {k} vs HF-style / vs GQA SDPA" for k in _LABELS.values())],
                             [[n, *(f"{v:.2f}" for v in row.values()),
                               *(f"{row[_HF] / row[k]:.1f}x / {row[_GQA] / row[k]:.2f}x" for k in _LABELS)]
                              for n, row in attention.items()]), ""])
    write(args.out, args.name, results, md)
    return 0


_HF, _GQA = "dense (repeat_kv + SDPA) ms", "dense SDPA enable_gqa ms"
_SPARSE = ("static sink + local ms", "dynamic (block-mean q·k) ms")
_ORT = "onnxruntime SparseAttention, static ms"
_LABELS = {_SPARSE[0]: "static", _SPARSE[1]: "dynamic", _ORT: "onnxruntime static"}


def attention_table(lengths: list[int], read: float) -> dict[int, dict[str, float]]:
    """ms per call of one decode step's attention at each cache length, dense and sparse, interleaved."""
    return {slots: _attention_step(slots, read) for slots in lengths}


def _attention_step(slots: int, read: float, heads: int = 32, kv_heads: int = 4, dim: int = 64,
                    block: int = 64) -> dict[str, float]:
    g = torch.Generator().manual_seed(slots)
    q = torch.randn(1, heads, 1, dim, generator=g)
    k, v = (torch.randn(1, kv_heads, slots, dim, generator=g) for _ in range(2))
    mask = torch.zeros(1, 1, 1, slots)
    listed = max(2, round(read * slots / block))
    static = attention_layouts.table([{"pattern": "sink_local",
                                       "params": {"sinks": 1, "window": listed - 1}}] * heads)
    sink = attention_layouts.table([{"pattern": "sink_local", "params": {"sinks": 1, "window": 1}}] * heads)
    scale = dim ** -0.5
    ort_step = ort_sparse_attention(q, k, v, static, block, scale)
    times = compare({
        _HF: lambda: torch.nn.functional.scaled_dot_product_attention(
            q, repeat_kv(k, heads), repeat_kv(v, heads), attn_mask=mask, scale=scale),
        _GQA: lambda: decode_attention.dense(q, k, v, mask, static, 0.0, block, scale),
        _SPARSE[0]: lambda: decode_attention.cpu(q, k, v, mask, static, 0.0, block, scale),
        _SPARSE[1]: lambda: decode_attention.cpu(q, k, v, mask, sink, read, block, scale),
        _ORT: ort_step,
    }, warmup=3, repeats=15)
    return {name: t * 1e3 for name, t in times.items()}


def ort_sparse_attention(q, k, v, table, block: int, scale: float):
    """onnxruntime's ``com.microsoft::SparseAttention`` (CPU) as one decode step over the cache (k, v),
    the query the last slot's, the table laid out as the op's square causal CSR layout (its row for the
    last block is what `decode_attention` reads); a call that runs it, after checking its output against
    `decode_attention.reference` (≤ 1e-5). The op appends the step's key and value to its past itself
    and refuses past and present in different buffers (``past_key->DataRaw() == present_key->DataRaw()``),
    so the cache must be a graph input and output bound to one buffer (IO binding), as here."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    _, heads, _, dim = q.shape
    kv_heads, slots = k.shape[1], k.shape[2]
    nk = -(-slots // block)
    listed = attention_layouts.block_mask(table[:1], nk, nk, True)[0]
    rows = torch.cat([torch.zeros(1, dtype=torch.long), listed.sum(-1).cumsum(0)]).int()[None]
    cols = listed.nonzero()[:, 1].int()[None]
    node = helper.make_node("SparseAttention", ["q", "k", "v", "past_k", "past_v", "rows", "cols", "total",
                                                "key_total"], ["out", "present_k", "present_v"],
                            domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads,
                            sparse_block_size=block, scale=scale)
    floats = {"q": [1, 1, heads * dim], "k": [1, 1, kv_heads * dim], "v": [1, 1, kv_heads * dim],
              "past_k": list(k.shape), "past_v": list(v.shape)}
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in floats.items()]
    ints = {"rows": [1, None], "cols": [1, None], "total": [1], "key_total": [1]}
    inputs += [helper.make_tensor_value_info(n, TensorProto.INT32, s) for n, s in ints.items()]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("out", "present_k",
                                                                                    "present_v")]
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(helper.make_graph([node], "step", inputs, outputs), opset_imports=opsets)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as our sessions (findings)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    flat = {"q": q.transpose(1, 2).reshape(1, 1, -1), "k": k[:, :, -1:].transpose(1, 2).reshape(1, 1, -1),
            "v": v[:, :, -1:].transpose(1, 2).reshape(1, 1, -1), "past_k": k.clone(), "past_v": v.clone(),
            "rows": rows, "cols": cols, "total": torch.tensor([slots], dtype=torch.int32),
            "key_total": torch.tensor([slots], dtype=torch.int32)}
    bound = {n: ort.OrtValue.ortvalue_from_numpy(t.contiguous().numpy()) for n, t in flat.items()}
    binding = session.io_binding()
    for name, value in bound.items():
        binding.bind_ortvalue_input(name, value)
    binding.bind_output("out")
    binding.bind_ortvalue_output("present_k", bound["past_k"])
    binding.bind_ortvalue_output("present_v", bound["past_v"])
    session.run_with_iobinding(binding)
    out = torch.from_numpy(binding.copy_outputs_to_cpu()[0]).view(1, 1, heads, dim).transpose(1, 2)
    expected = decode_attention.reference(q, k, v, torch.zeros(1, 1, 1, slots), table, 0.0, block, scale)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    return lambda: session.run_with_iobinding(binding)
