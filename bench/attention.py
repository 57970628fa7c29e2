"""``python -m bench attention``: block-sparse attention microbenchmark (sparsegraph::block_sparse_attention).

One attention call, batch 1, 12 heads, head dim 64, sequence 4096, fp32 on the CPU (fp16 on a GPU),
non-causal and causal, at block sizes 64 and 128. Per head a static layout of about 10% of the blocks
(90% sparsity; causal: 10% of the lower-triangular blocks): every query block lists its diagonal block,
the previous one and the first (sink) block, then per-head vertical columns (the same key blocks for
every query block of the head) up to a fixed number of blocks per row; the exact density is measured
and reported.

Candidates, same inputs and threads, interleaved, median: dense ``scaled_dot_product_attention``
(the full attention, which the sparse ones approximate), our op on the CPU path (the compiled kernel
of ``codegen/cpu_kernels``; GPU: Triton), the same op on its torch fallback (CPU only: what runs
where the kernel could not be built), and
``torch.compile(flex_attention)`` with the same block mask (its compile + first call is timed
separately; ours has no compile step, its first call is timed too). Outputs of ours and FlexAttention
are compared (max abs difference) so the two compute the same thing. Also timed: our dynamic op with
the same number of blocks per row, chosen at every call from block-mean q·k (the estimate included).

``--minilm``: end to end instead, the real MiniLM-L6 at sequence 512 (inputs: concatenated stdlib
docstring sentences; calibration split for ``head_patterns``, held-out split for evaluation), compiled
with ``head_patterns`` (block 64, recall ``--recall``) + ``sparse_attention``: mean cosine of the
sentence embeddings to dense, density per layer, and speed vs dense eager in the same run (the
compiled model timed with the compiled CPU kernel and with its torch fallback).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from unittest import mock

import torch
import torch.nn.functional as F

from bench.common import machine, machine_line, parse, parser, table, write
from sparsegraph.attention_layouts import fixed_table
from sparsegraph.codegen import cpu_kernels, use_backend
from sparsegraph.codegen.block_sparse_attention import OP
from sparsegraph.codegen.dynamic_block_sparse_attention import OP as DYNAMIC
from sparsegraph.measure import compare


def block_mask(heads: int, nq: int, per_row: int, causal: bool, seed: int = 0) -> torch.Tensor:
    """bool [heads, nq, nq]: diagonal, previous, sink, then per-head vertical columns, ≤ per_row per row."""
    g = torch.Generator().manual_seed(seed)
    bm = torch.zeros(heads, nq, nq, dtype=torch.bool)
    for h in range(heads):
        verticals = torch.randperm(nq, generator=g).tolist()
        for i in range(nq):
            chosen: list[int] = []
            for j in [i, i - 1, 0, *verticals]:
                if len(chosen) == per_row:
                    break
                if 0 <= j < nq and j not in chosen and (not causal or j <= i):
                    chosen.append(j)
            bm[h, i, chosen] = True
    return bm


def density(bm: torch.Tensor, causal: bool) -> float:
    nq = bm.shape[-1]
    return bm.sum().item() / (bm.shape[0] * (nq * (nq + 1) / 2 if causal else nq * nq))


def torch_fallback(call):
    """`call` with the compiled CPU kernels turned off (SPARSEGRAPH_NATIVE=0): the torch path."""
    def fallback():
        with mock.patch.dict(os.environ, {"SPARSEGRAPH_NATIVE": "0"}):
            return call()
    return fallback


def flex_candidate(q, k, v, bm: torch.Tensor, block: int, causal: bool):
    """torch.compile(flex_attention) with the same block mask; returns (call, compile+first-call seconds)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    lookup = bm.to(q.device)

    def mask_mod(b, h, qi, ki):
        allowed = lookup[h, qi // block, ki // block]
        return allowed & (ki <= qi) if causal else allowed

    L = q.shape[2]
    mask = create_block_mask(mask_mod, B=None, H=bm.shape[0], Q_LEN=L, KV_LEN=L, device=q.device.type,
                             BLOCK_SIZE=block)
    compiled = torch.compile(flex_attention, dynamic=False)
    start = time.perf_counter()
    with torch.inference_mode():
        out = compiled(q, k, v, block_mask=mask)
    first = time.perf_counter() - start
    return (lambda: compiled(q, k, v, block_mask=mask)), first, out


def main(argv: list[str] | None = None) -> int:
    ap = parser("attention", __doc__, name=None)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--blocks", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-flex", action="store_true", help="leave out torch.compile(flex_attention)")
    ap.add_argument("--warm-cache", action="store_true",
                    help="let torch.compile use its on-disk cache (default: a fresh one, so compile time "
                         "is cold)")
    ap.add_argument("--minilm", action="store_true",
                    help="MiniLM-L6 at seq 512 end to end (fidelity + speed)")
    ap.add_argument("--recall", type=float, default=0.95, help="--minilm: head_patterns recall target")
    args = parse(ap, argv)
    if args.minilm:
        return minilm(args)
    if not args.warm_cache:  # a cached compile would hide FlexAttention's real first-call cost
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-attention-inductor-")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    backend = "triton" if device == "cuda" else "eager"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    H, L, E = args.heads, args.seq, args.head_dim
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, L, E, generator=g).to(device, dtype) for _ in range(3))
    scale = E ** -0.5
    results = {"machine": machine(args.threads), "settings": vars(args), "device": device,
               "dtype": str(dtype), "cpu_kernels": cpu_kernels.status(), "cases": []}
    rows = []
    for block in args.blocks:
        nq = math.ceil(L / block)
        for causal in (False, True):
            budget = (1 - args.sparsity) * ((nq + 1) / 2 if causal else nq)  # blocks per row on average
            per_row = max(1, round(budget))
            bm = block_mask(H, nq, per_row, causal)
            layout = fixed_table(bm).to(device)

            def ours(layout=layout, block=block, causal=causal):
                with use_backend(backend):
                    out = OP(q, k, v, layout, None, block, causal, scale)
                sync()
                return out

            start = time.perf_counter()
            ours_out = ours()
            ours_first = time.perf_counter() - start

            def dense(causal=causal):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                sync()
                return out

            static_none = torch.full((H, nq, 1), -1, dtype=torch.int64, device=device)
            topk = torch.full((H,), per_row, dtype=torch.int64, device=device)

            def ours_dynamic(causal=causal, block=block, static_none=static_none, topk=topk):
                with use_backend(backend):
                    out = DYNAMIC(q, k, v, static_none, topk, None, block, causal, scale)
                sync()
                return out

            candidates = {"dense SDPA": dense, f"ours ({backend})": ours}
            if device == "cpu":
                candidates["ours, torch fallback (eager)"] = torch_fallback(ours)
            candidates[f"ours, dynamic top-{per_row} ({backend})"] = ours_dynamic
            flex_first, flex_diff = None, None
            if not args.no_flex:
                flex, flex_first, flex_out = flex_candidate(q, k, v, bm, block, causal)
                flex_diff = (flex_out.float() - ours_out.float()).abs().max().item()

                def flex_call(flex=flex):
                    out = flex()
                    sync()
                    return out

                candidates["flex_attention (compiled)"] = flex_call
            times = compare(candidates, warmup=args.warmup, repeats=args.repeats)
            base = times["dense SDPA"]
            case = {"block": block, "causal": causal, "blocks_per_row": per_row,
                    "density": density(bm, causal), "ms": {n: t * 1e3 for n, t in times.items()},
                    "speedup": {n: base / t for n, t in times.items()},
                    "first_call_s": {"ours": ours_first, "flex_compile_and_first_call": flex_first},
                    "max_abs_diff_ours_vs_flex": flex_diff}
            results["cases"].append(case)
            for n, t in times.items():
                first = {f"ours ({backend})": f"{ours_first:.2f}",
                         "flex_attention (compiled)": (f"{flex_first:.1f}" if flex_first is not None
                                                       else "")}.get(n, "")
                rows.append([block, "yes" if causal else "no", f"{case['density']:.3f}", n, f"{t * 1e3:.1f}",
                             f"{base / t:.2f}", first])
            print(rows[-len(times):], flush=True)
    md = "\n".join([
        machine_line(results["machine"]),
        f"One attention call: batch 1, {H} heads, head dim {E}, seq {L}, {dtype}, {device}; per-head static "
        f"block layouts (diagonal, previous, sink, per-head vertical columns) at {args.sparsity:.0%} target "
        "sparsity (density = listed blocks / dense blocks, causal: / lower-triangular blocks). Median of "
        f"{args.repeats} interleaved rounds after {args.warmup} warm-up; speed-up vs dense SDPA in the same "
        "run. First call: seconds of the very first call (FlexAttention: torch.compile + first call). "
        f"Compiled CPU kernel: {results['cpu_kernels']}.", "",
        *table(["block", "causal", "density", "candidate", "ms", "speed-up vs dense SDPA", "first call (s)"],
               rows),
        "", "Max |ours − flex_attention| per case: " + ", ".join(
            f"block {c['block']} {'causal' if c['causal'] else 'non-causal'}: "
            + (f"{c['max_abs_diff_ours_vs_flex']:.1e}" if c["max_abs_diff_ours_vs_flex"] is not None
               else "n/a")
            for c in results["cases"]), ""])
    write(args.out, args.name or f"attention-{device}", results, md)
    return 0


def minilm(args) -> int:
    import statistics

    import sparsegraph as sg
    from sparsegraph import models
    from sparsegraph.data.stdlib_text import documents
    from sparsegraph.measure import cosine

    seq = 512
    model, _ = models.load("minilm", seq_len=seq)
    calibration = documents(model.tokenizer, "calibration", 16, seq)
    heldout = documents(model.tokenizer, "heldout", 8, seq)
    batches = [model.tokenize(calibration[i:i + 4], pad_to=seq) for i in range(0, 16, 4)]
    example = model.tokenize(heldout[:2], pad_to=seq)
    config = {"passes": [{"head_patterns": {"block": 64, "recall": args.recall}}, {"sparse_attention": {}}]}
    start = time.perf_counter()
    cm = sg.compile(model, config, example_inputs=example, calibration=batches, quiet=True)
    compile_s = time.perf_counter() - start
    with torch.no_grad():
        cosines = [cosine(cm(*x), model(*x)) for x in
                   (model.tokenize(heldout[i:i + 2], pad_to=seq) for i in range(0, len(heldout), 2))]
    density = {s: cm.plan.evidence("head_patterns", s)["density"] for s in cm.plan.sites
               if cm.plan.evidence("head_patterns", s)}
    patterns = {s: [h["pattern"] for h in cm.plan.evidence("head_patterns", s)["heads"]] for s in density}
    times = compare({"dense eager": lambda: model(*example), "sparse (eager)": lambda: cm(*example),
                     "sparse, torch fallback (eager)": torch_fallback(lambda: cm(*example))},
                    warmup=args.warmup, repeats=args.repeats)
    stats = cm.plan.passes["sparse_attention"]["stats"]
    results = {"machine": machine(args.threads), "settings": vars(args), "seq": seq, "compile_s": compile_s,
               "cosine_mean": statistics.mean(cosines), "cosines": cosines, "density_per_layer": density,
               "patterns": patterns, "ms": {k: v * 1e3 for k, v in times.items()},
               "speedup": times["dense eager"] / times["sparse (eager)"], "cpu_kernels": cpu_kernels.status(),
               "sites_rewritten": stats["rewritten"], "refused": stats["refused"]}
    rows = [[s.split(".")[-2] if "." in s else s, f"{d:.3f}",
             ", ".join(f"{p} ×{patterns[s].count(p)}" for p in dict.fromkeys(patterns[s]))]
            for s, d in density.items()]
    md = "\n".join([
        machine_line(results["machine"]),
        f"MiniLM-L6 (real weights), sequence {seq}, batch 2, fp32; head_patterns block 64, recall "
        f"{args.recall} on 16 calibration texts; evaluated on {len(heldout)} held-out texts. Mean cosine of "
        f"the sentence embeddings to dense: {results['cosine_mean']:.4f}. Sites rewritten: "
        f"{stats['rewritten']} of {stats['matched']}. Speed (median of {args.repeats} interleaved rounds): "
        f"dense eager {times['dense eager'] * 1e3:.1f} ms, sparse {times['sparse (eager)'] * 1e3:.1f} ms, "
        f"{results['speedup']:.2f}x (with the torch fallback instead of the compiled CPU kernel: "
        f"{times['sparse, torch fallback (eager)'] * 1e3:.1f} ms, "
        f"{times['dense eager'] / times['sparse, torch fallback (eager)']:.2f}x). "
        f"Compiled CPU kernel: {results['cpu_kernels']}.", "",
        *table(["layer", "mean head density", "patterns"], rows), ""])
    write(args.out, args.name or f"attention-minilm-{'cuda' if torch.cuda.is_available() else 'cpu'}",
          results, md)
    return 0
