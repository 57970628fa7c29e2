"""``python -m bench gemv``: one-token input-sparse GEMV on the CPU (``sparsegraph::sparse_linear``'s decode
path) against the dense GEMV and the other ways to skip inputs in torch.

``y = Σ_{j kept} (x − c)_j · weight_t[j, :] + b`` for one token, kept = ``|x − c| > threshold`` with the
threshold at the given sparsity (the fraction of inputs skipped), fp32. Candidates, same inputs and
threads, interleaved round by round, median of repeats after warm-up (`sparsegraph.measure.compare`,
in several orders of the candidates, the median of the orders' medians: a call runs slower right after
a heavy one, so no candidate always follows the same one):

- dense: ``x @ weight_t`` and ``F.linear(x, W)`` with the out-major weight; the faster is "dense";
- ``torch.sparse.mm`` with the masked input as a COO vector, and as a CSR vector (conversion included:
  a real op has to build it per token);
- embedding_bag: the op's previous CPU path (`sparse_linear.cpu_torch`: ``F.embedding_bag`` in sum mode
  over the kept rows, split over the threads);
- native: the compiled kernel (`cpu_kernels.sparse_gemv`, `codegen/cpu_kernels/sparse_gemv.cpp`),
  binding included; and the same in top-k mode with k = the kept count (a selection per call).

Each round takes the next of 16 different inputs, so the kept set changes call to call as in decoding
(each candidate another one, so none finds the rows it reads left in cache by the one before).
"hot": one weight, which stays in the caches between calls; "from memory": the big shapes again with
enough copies of the weight (cycled; each candidate another copy) that they do not fit in the
last-level cache, as a model's layers do. Last, the fixed per-call cost at a tiny shape (16 → 16),
directly and through the op (``torch.ops.sparsegraph.sparse_linear``, eager backend) with the
previous and the new CPU path.
"""

from __future__ import annotations

import itertools
import math
import warnings

import torch
import torch.nn.functional as F

from bench.common import compare_orders, machine, machine_line, parse, parser, table, write
from sparsegraph.codegen import cpu_kernels, sparse_linear, use_backend

SHAPES = ((2048, 5632), (5632, 2048), (2048, 2048), (256, 688), (688, 256))
SPARSITIES = (0.3, 0.5, 0.7, 0.9)
SPARSE = ("sparse.mm COO", "sparse.mm CSR", "embedding_bag (previous)", "native", "native top-k")


def _weights(in_f: int, out_f: int, copies: int, seed: int = 0) -> list[torch.Tensor]:
    """`copies` weight_t [in, out] at distinct addresses (clones: the same values, not the same lines)."""
    weight = torch.randn(in_f, out_f, generator=torch.Generator().manual_seed(seed)) * in_f ** -0.5
    return [weight] + [weight.clone() for _ in range(copies - 1)]


def _problem(in_f: int, out_f: int, sparsity: float, seed: int = 1):
    """16 inputs, bias, centre, the threshold that skips `sparsity` of the inputs, and k for top-k."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(16, 1, in_f, generator=g)
    b, c = torch.randn(out_f, generator=g), torch.randn(in_f, generator=g) * 0.1
    threshold = (xs - c).abs().flatten().quantile(sparsity).item()
    return xs, b, c, threshold, max(1, round((1 - sparsity) * in_f))


def _candidates(weights, xs, b, c, threshold, k, burst: int = 1) -> tuple[dict, dict]:
    """{name: `burst` calls} cycling through the inputs (and weight copies), and {name: its output for
    input 0}."""
    outs = [w.t().contiguous() for w in weights]  # out-major [out, in] for F.linear

    def masked(x):  # [1, in]
        a = x - c
        return torch.where(a.abs() > threshold, a, torch.zeros_like(a))

    fns = {
        "dense x @ weight_t": lambda x, w, wo: x @ w + b,
        "dense F.linear": lambda x, w, wo: F.linear(x, wo, b),
        "sparse.mm COO": lambda x, w, wo: torch.sparse.mm(masked(x).to_sparse(), w) + b,
        "sparse.mm CSR": lambda x, w, wo: torch.sparse.mm(masked(x).to_sparse_csr(), w) + b,
        "embedding_bag (previous)": lambda x, w, wo: sparse_linear.cpu_torch(x, w, b, c, threshold, 0),
        "native": lambda x, w, wo: cpu_kernels.sparse_gemv(x, w, b, c, threshold, 0),
        "native top-k": lambda x, w, wo: cpu_kernels.sparse_gemv(x, w, b, c, 0.0, k),
    }
    first = {name: fn(xs[0], weights[0], outs[0]) for name, fn in fns.items()}
    inputs = list(xs.unbind(0))  # views made once: indexing xs costs µs per call

    def cycling(fn, m):  # candidate m: a new input and weight copy every round, none another's in a round
        rounds = itertools.count(1)

        def call():
            for _ in range(burst):
                i = next(rounds)
                fn(inputs[(i + 5 * m) % len(inputs)], weights[(i + 3 * m) % len(weights)],
                   outs[(i + 3 * m) % len(outs)])
        return call
    return {name: cycling(fn, m) for m, (name, fn) in enumerate(fns.items())}, first


def _check(first, weights, xs, b, c, threshold, k):
    want = sparse_linear.reference(xs[0], weights[0], b, c, threshold, 0)
    dense = sparse_linear.reference(xs[0], weights[0], b, None, -1.0, 0)
    for name, got in first.items():
        if got is None:
            raise RuntimeError(f"{name}: the compiled kernel did not run ({cpu_kernels.status()})")
        ref = dense if name.startswith("dense") else (
            sparse_linear.reference(xs[0], weights[0], b, c, 0.0, k) if name == "native top-k" else want)
        torch.testing.assert_close(got.reshape(ref.shape), ref, rtol=1e-4, atol=1e-4, msg=name)


def _case(weights, sparsity, warmup, repeats, burst=1) -> dict:
    in_f, out_f = weights[0].shape
    xs, b, c, threshold, k = _problem(in_f, out_f, sparsity)
    calls, first = _candidates(weights, xs, b, c, threshold, k, burst)
    _check(first, weights, xs, b, c, threshold, k)
    times = {name: t / burst for name, t in compare_orders(calls, warmup=warmup, repeats=repeats).items()}
    dense_name = min(("dense x @ weight_t", "dense F.linear"), key=times.__getitem__)
    skipped = ((xs - c).abs() <= threshold).float().mean().item()
    return {"in": in_f, "out": out_f, "sparsity": sparsity, "skipped": skipped, "weight_copies": len(weights),
            "calls_per_sample": burst,
            "dense": dense_name, "ms": {name: t * 1e3 for name, t in times.items()},
            "speedup": {name: times[dense_name] / t for name, t in times.items()}}


def _overhead(warmup: int, repeats: int, burst: int = 10) -> dict:
    """µs per call at 16 → 16, 50% skipped, in bursts of `burst` calls: what a call costs beyond its
    arithmetic."""
    xs, b, c, threshold, _ = _problem(16, 16, 0.5)
    w, x = _weights(16, 16, 1)[0], xs[0]
    op = sparse_linear.OP

    def through_op(path):
        def call():
            op.cpu = path
            try:
                with use_backend("eager"):
                    op(x, w, b, c, threshold, 0)
            finally:
                op.cpu = sparse_linear.cpu
        return call

    def bursts(fn):
        def call():
            for _ in range(burst):
                fn()
        return call

    calls = {"dense x @ weight_t": lambda: x @ w + b,
             "embedding_bag (previous)": lambda: sparse_linear.cpu_torch(x, w, b, c, threshold, 0),
             "native": lambda: cpu_kernels.sparse_gemv(x, w, b, c, threshold, 0),
             "op, previous CPU path": through_op(sparse_linear.cpu_torch),
             "op, native CPU path": through_op(sparse_linear.cpu)}
    times = compare_orders({name: bursts(fn) for name, fn in calls.items()}, warmup=warmup, repeats=repeats)
    return {name: t / burst * 1e6 for name, t in times.items()}


def _rows(cases):
    rows = []
    for case in cases:
        ms, speedup = case["ms"], case["speedup"]
        rows.append([f"{case['in']}→{case['out']}", f"{case['sparsity']:.1f} ({case['skipped']:.2f})",
                     f"{ms[case['dense']]:.3f} ({'linear' if 'linear' in case['dense'] else 'x@W'})",
                     *(f"{speedup[name]:.2f}x" for name in SPARSE)])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = parser("gemv", __doc__, name="gemv-cpu")
    ap.add_argument("--repeats", type=int, default=40, help="rounds per case (10x for weights under 4 MB)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--cold-mb", type=int, default=640,
                    help="weight copies cycled in the 'from memory' cases: at least this many MB in all")
    ap.add_argument("--shapes", default=",".join(f"{i}x{o}" for i, o in SHAPES))
    ap.add_argument("--sparsities", default=",".join(str(s) for s in SPARSITIES))
    args = parse(ap, argv)
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    sparsities = [float(s) for s in args.sparsities.split(",")]
    if cpu_kernels.library() is None:
        print(f"compiled CPU kernels: {cpu_kernels.status()}")
        return 1
    results = {"machine": machine(args.threads), "settings": vars(args), "cpu_kernels": cpu_kernels.status(),
               "hot": [], "from_memory": [], "overhead_us": {}}
    for in_f, out_f in shapes:
        weights = _weights(in_f, out_f, 1)
        small = in_f * out_f * 4 < 4 << 20
        for sparsity in sparsities:
            case = _case(weights, sparsity, args.warmup, args.repeats * (4 if small else 1),
                         burst=10 if small else 1)
            results["hot"].append(case)
            print("hot", _rows([case])[0], flush=True)
    for in_f, out_f in shapes:
        if in_f * out_f * 4 < 4 << 20:
            continue
        weights = _weights(in_f, out_f, math.ceil(args.cold_mb * 2 ** 20 / (in_f * out_f * 4)))
        for sparsity in sparsities:
            case = _case(weights, sparsity, max(args.warmup, len(weights)), args.repeats)
            results["from_memory"].append(case)
            print("from memory", _rows([case])[0], flush=True)
        del weights
    results["overhead_us"] = _overhead(warmup=20, repeats=300)

    header = ["in→out", "sparsity (skipped)", "dense ms", *SPARSE]
    copies = {c["weight_copies"] for c in results["from_memory"]}
    md = "\n".join([
        machine_line(results["machine"]),
        f"One token, fp32, {args.threads} threads; speed-up over the faster dense GEMV (`x @ weight_t` or "
        f"`F.linear`) in the same run, candidates interleaved round by round, ~{args.repeats} rounds "
        f"({4 * args.repeats} rounds of 10 calls under 4 MB of weight) after warm-up, in 6 orders of the "
        f"candidates (median of the orders' medians); a new input of 16 every call, another for each "
        f"candidate. "
        f"Sparsity: the fraction of inputs skipped (threshold mode; top-k: k = the kept count). Compiled "
        f"CPU kernel: {results['cpu_kernels']}.", "",
        "### Hot: the weight stays in the caches between calls", "",
        *table(header, _rows(results["hot"])), "",
        f"### From memory: {'/'.join(str(c) for c in sorted(copies))} copies of the weight cycled (≥ "
        f"{args.cold_mb} MB, more than the last-level cache)", "",
        *table(header, _rows(results["from_memory"])), "",
        "### Per-call cost at 16 → 16 (µs per call, ~300 interleaved rounds of 10 calls, in 6 orders)", "",
        *table(["call", "µs"], [[name, f"{us:.1f}"] for name, us in results["overhead_us"].items()]), ""])
    write(args.out, args.name, results, md)
    return 0
