"""The process group of a run, from the torchrun / deepspeed launcher environment."""
from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist


# Variables init_distributed put into this process's environment; shutdown() takes them out, so a
# later Trainer / accelerate in the same process does not take LOCAL_RANK for a torchrun start.
_ENV_SET_HERE: list[str] = []


@dataclass
class Dist:
    """This process's place in the run: rank, world size, local rank and device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(sharded: bool = False) -> Dist:
    """nccl on CUDA, gloo on CPU (also with DS_ACCELERATOR=cpu). A plain ``python`` start is a
    world of one without a process group, except for the engines that need one (``sharded``:
    DDP, FSDP2, ZeRO), which get a process group of one on a free local port."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu"
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if (world > 1 or sharded) and not dist.is_initialized():
        kwargs = {}
        if world == 1 and "MASTER_ADDR" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                kwargs = dict(init_method=f"tcp://127.0.0.1:{s.getsockname()[1]}", rank=0, world_size=1)
            if "LOCAL_RANK" not in os.environ:  # deepspeed.initialize asserts it
                os.environ["LOCAL_RANK"] = "0"
                _ENV_SET_HERE.append("LOCAL_RANK")
        # Long timeout: rank 0 tokenizes a domain once (1B tokens: tens of minutes) while the
        # other ranks wait in a collective.
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=2), **kwargs)
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), local, device)
    return Dist(device=device)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """End the process group, if one was started (a launcher's last call), and take back the
    environment variables init_distributed set."""
    if dist.is_available() and dist.is_initialized():
        ds_comm = sys.modules.get("deepspeed.comm.comm")
        if ds_comm is not None and getattr(ds_comm, "cdb", None) is not None:
            # DeepSpeed caches groups of this process group (its world clone, data parallel): its
            # own teardown releases them, so a later run in this process starts clean
            ds_comm.destroy_process_group()
        else:
            dist.destroy_process_group()
    while _ENV_SET_HERE:
        os.environ.pop(_ENV_SET_HERE.pop(), None)


def from_rank0(value):
    """Rank 0's ``value`` on every rank (a small picklable object between our own ranks)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


__all__ = ["Dist", "init_distributed", "barrier", "from_rank0", "shutdown"]
