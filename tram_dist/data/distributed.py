"""Rank bookkeeping for the data pipeline: who does one-time work and how the others wait.

Works with or without an initialized torch.distributed process group (then rank 0 of 1).
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.distributed as dist

from .errors import DataError


def dist_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) of this process; (0, 1, 0) without a process group."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        return rank, world, local
    return 0, 1, 0


def _flag_device() -> torch.device:
    # NCCL reduces only CUDA tensors; every other backend takes CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_max(value: int) -> int:
    """Max of an int over all ranks; doubles as a barrier. Identity without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_flag_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def run_once(done: Callable[[], bool], build: Callable[[], None], what: str) -> None:
    """Make `done()` true on every rank, building at most once per file system.

    Global rank 0 builds first while the others wait (an all-reduce acts as the barrier and
    carries a failure flag, so a failure on rank 0 stops every rank instead of hanging them).
    If a rank still sees nothing afterwards, its node does not share rank 0's cache folder:
    that node's local rank 0 builds, the others wait again. `build` must write atomically
    (temporary name, then rename) so no rank ever reads a half-written file.
    """
    rank, world, local = dist_info()
    if world == 1:
        if not done():
            build()
        return
    for phase_builder in (rank == 0, local == 0):
        failed = 0
        if phase_builder and not done():
            try:
                build()
            except BaseException:
                all_max(1)  # release the waiting ranks with the failure flag set
                raise
        if all_max(failed):
            raise DataError(f"another rank failed while preparing {what}; see rank 0's error above")
        if all_max(0 if done() else 1) == 0:
            return
    raise DataError(f"{what} is still missing after preparation on every node; "
                    "check that the cache folder (cache_dir) is writable")
