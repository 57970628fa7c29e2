"""Threads: a compiled model called for the first time from several threads at once (its lazy caches, the
ONNX export and session among them, built under the race) gives the sequential results; ONNX
exports from several threads all succeed and leave ``sys.stdout`` alone."""

from __future__ import annotations

import sys
import threading
import time

import pytest
import torch

import sparsegraph as sg
from sparsegraph import models, pipelines
from sparsegraph.onnx_export import OnnxModel

# heavy for the default run (kept under 6 minutes on 2 cores): CI runs these after it
pytestmark = [pytest.mark.slow, pytest.mark.ci]


THREADS, CALLS = 4, 50
# The same graph on the same inputs: bitwise equal here (2 cores); elsewhere the split of intra-op work
# may differ between threads (OpenMP's thread count is a per-thread setting), moving float32 sums by ulps.
RTOL, ATOL = 1e-6, 1e-6


def _token_batches(n: int, seed: int, seq: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, 1000, (2, seq), generator=g)
        batches.append((ids, torch.ones_like(ids)))
    return batches


def _in_threads(fn, inputs: list, calls: int = CALLS) -> tuple[dict, list]:
    """Call ``fn(*inputs[i])`` `calls` times from each of ``len(inputs)`` threads, all released at once
    by a barrier; return {(thread, call): output} and the exceptions raised."""
    barrier = threading.Barrier(len(inputs))
    outputs: dict[tuple[int, int], torch.Tensor] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        barrier.wait()
        for j in range(calls):
            try:
                outputs[i, j] = fn(*inputs[i])
            except Exception as e:  # collected, and reported below with their count
                errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outputs, errors


@pytest.fixture(scope="module")
def sparse_plan():
    """explicit_attention (seq 32) with 50% activation sparsity, profiled on two batches of random tokens."""
    model, example = models.load("explicit_attention", seq_len=32)
    cm = sg.compile(model, "activation-sparsity", example_inputs=example, calibration=_token_batches(2, 1),
                    quiet=True)
    assert cm.plan.passes["neuron_sparsity"]["stats"]["rewritten"] == 3
    return model, example, cm.plan


@pytest.mark.parametrize("backend", ["eager", "onnx"])
def test_first_calls_from_threads_match_sequential(backend, sparse_plan):
    model, example, plan = sparse_plan
    config = {**pipelines.get("activation-sparsity"), "backend": backend}
    # the plan's profile, reused
    cm = sg.compile(model, config, example_inputs=example, plan=plan, quiet=True)
    assert cm._onnx is None  # nothing exported yet: the threads race for the first call
    exports, export = [], cm.export_onnx
    cm.export_onnx = lambda *a, **k: exports.append(a) or export(*a, **k)  # counts the exports
    inputs = _token_batches(THREADS, 2)
    with torch.no_grad():
        outputs, errors = _in_threads(cm, inputs)
        assert not errors, f"{len(errors)} of {THREADS * CALLS} calls failed, the first: {errors[0]!r}"
        expected = [cm(*x) for x in inputs]
    assert len(outputs) == THREADS * CALLS
    for (i, _), out in outputs.items():
        torch.testing.assert_close(out, expected[i], rtol=RTOL, atol=ATOL)
    # one thread exported, the others waited for its session
    assert len(exports) == (1 if backend == "onnx" else 0)


def test_exports_from_threads_leave_stdout_alone(tmp_path, capsys):
    """Exports from two threads at once both succeed; what another thread prints meanwhile, and after,
    reaches the (captured) stdout, which is the same object as before."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16)).eval()
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(0))
    cm = sg.compile(model, "dense", example_inputs=(x,), quiet=True)
    stdout = sys.stdout
    exporting = 2  # each export takes seconds and they run one at a time: two threads show the race
    barrier, exported = threading.Barrier(exporting + 1), threading.Event()
    paths, errors, ticks = {}, [], []

    def export(i: int) -> None:
        barrier.wait()
        try:
            paths[i] = cm.export_onnx(tmp_path / f"m{i}.onnx")
        except Exception as e:  # collected, and reported below
            errors.append(e)

    def chatter() -> None:  # the user's program, printing while the exports run
        barrier.wait()
        while not exported.is_set():
            print(f"tick {len(ticks)}")
            ticks.append(len(ticks))
            time.sleep(0.005)

    exporters = [threading.Thread(target=export, args=(i,)) for i in range(exporting)]
    printer = threading.Thread(target=chatter)
    for t in [*exporters, printer]:
        t.start()
    for t in exporters:
        t.join()
    exported.set()
    printer.join()
    assert sys.stdout is stdout
    print("still printing")
    assert len(ticks) > 10  # the exports took long enough for the printer to print during them
    assert capsys.readouterr().out == "".join(f"tick {i}\n" for i in ticks) + "still printing\n"
    assert not errors, f"{len(errors)} of {exporting} exports failed, the first: {errors[0]!r}"
    with torch.no_grad():
        expected = model(x)
    for path in paths.values():
        torch.testing.assert_close(OnnxModel(path, cm.graph_module)(x), expected, rtol=1e-5, atol=1e-6)


def test_compiles_and_exports_from_threads_at_once(tmp_path):
    """Captures share torch.export's process-wide state: compiles and ONNX exports started together in
    several threads all succeed (one capture at a time) and give the single-thread results."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16)).eval()
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(0))
    cm = sg.compile(model, "dense", example_inputs=(x,), quiet=True)

    def work(i: int) -> torch.Tensor:
        if i % 2:
            return OnnxModel(cm.export_onnx(tmp_path / f"m{i}.onnx"), cm.graph_module)(x)
        with torch.no_grad():
            return sg.compile(model, "dense", example_inputs=(x,), quiet=True)(x)

    results, errors = _in_threads(work, [(i,) for i in range(THREADS)], calls=1)
    assert not errors, f"{len(errors)} of {THREADS} failed, the first: {errors[0]!r}"
    with torch.no_grad():
        expected = model(x)
    for out in results.values():
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
