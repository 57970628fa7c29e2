"""Calibration over several processes with ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Analysis passes call `rank_and_world` to take their shard of the calibration batches and `merge` to
combine their per-process statistics into the same result on every rank. Without an initialised
process group both are no-ops (rank 0 of 1), so passes need no separate code path.

`launch` re-runs the current command under ``torch.distributed.run`` with N processes; `init`
is what each worker calls first.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def merge(per_key: dict, combine: Callable[[list[T]], T]) -> dict:
    """Gather every rank's ``{key: stats}`` and combine each key's list (in rank order) on every rank."""
    _, world = rank_and_world()
    gathered: list[dict] = [{} for _ in range(world)]
    dist.all_gather_object(gathered, per_key)
    keys = sorted({k for part in gathered for k in part}, key=str)
    return {k: combine([part[k] for part in gathered if k in part]) for k in keys}


def in_worker() -> bool:
    """Whether this process was started by ``torch.distributed.run`` (it sets WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init() -> None:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)


def launch(nproc: int, module: str, argv: list[str]) -> int:
    """Run ``python -m module *argv`` in `nproc` processes under torch.distributed.run; its exit code."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", module, *argv]
    return subprocess.run(command, check=False).returncode
