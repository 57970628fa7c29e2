"""Instruments: what watches a pipeline run from outside the passes (timing, IR dumps, progress).

An instrument has ``before_pass(p, gm, ctx)`` and ``after_pass(p, result, ctx)``; the `PassManager`
calls every instrument around every pass. `default_instruments` gives timing, a progress bar (unless
quiet), and, when the environment variable ``SPARSEGRAPH_DUMP`` names a directory, a dump of the graph
after capture and after each pass (``00_captured.py``, ``01_<pass>.py``, … plus a ``.txt`` node table).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from sparsegraph import ir, meta


class Instrument:
    def before_pass(self, p, gm, ctx) -> None:
        pass

    def after_pass(self, p, result, ctx) -> None:
        pass


class Timing(Instrument):
    """Seconds per pass, into ``ctx.timings``."""

    def before_pass(self, p, gm, ctx):
        self._start = time.perf_counter()

    def after_pass(self, p, result, ctx):
        ctx.timings[p.name] = time.perf_counter() - self._start


class Progress(Instrument):
    """One progress bar over the pipeline's passes."""

    def __init__(self, total: int):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="sparsegraph", leave=False)

    def before_pass(self, p, gm, ctx):
        self.bar.set_postfix_str(p.name)

    def after_pass(self, p, result, ctx):
        self.bar.update(1)
        if self.bar.n >= self.bar.total:
            self.bar.close()


class Dump(Instrument):
    """The graph's code and a node table after each pass, into `directory`."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.index = 0

    def write(self, label: str, gm) -> None:
        stem = self.dir / f"{self.index:02d}_{label}"
        stem.with_suffix(".py").write_text(gm.code)
        rows = []
        for n in gm.graph.nodes:
            info = meta.get(n)
            rows.append(f"{n.name}\t{n.op}\t{n.target}\t{ir.kind(n)}\t{ir.shape(n)}\t"
                        f"{info.site + ' ' + info.role if info else ''}")
        stem.with_suffix(".txt").write_text("name\top\ttarget\tkind\tshape\tsite\n" + "\n".join(rows) + "\n")
        self.index += 1

    def before_pass(self, p, gm, ctx):
        if self.index == 0:
            self.write("captured", gm)

    def after_pass(self, p, result, ctx):
        self.write(p.name, result.gm)


def default_instruments(n_passes: int, quiet: bool) -> list[Instrument]:
    instruments: list[Instrument] = [Timing()]
    if not quiet and n_passes:
        instruments.append(Progress(n_passes))
    if os.environ.get("SPARSEGRAPH_DUMP"):
        instruments.append(Dump(os.environ["SPARSEGRAPH_DUMP"]))
    return instruments
