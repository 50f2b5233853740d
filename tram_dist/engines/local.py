"""Parameters held whole on every rank: a single process, or DistributedDataParallel.

Under DDP every rank holds the same all-reduced gradient, so the norm needs no collective;
only a divergence computed on each rank's own micro-batches is summed over the group.
"""
from __future__ import annotations

from typing import List

from .base import Engine, Slice, SliceGroup


class LocalEngine(Engine):
    needs_backup = True
    grads_sharded = False

    def __init__(self, optimizer, dp_group=None):
        self.optimizer = optimizer  # the wrapper whose param_groups are shared with the base
        self.dp_group = dp_group

    def slice_groups(self, with_grad_only: bool = True) -> List[SliceGroup]:
        groups = []
        for group in self.optimizer.param_groups:
            slices = [
                Slice(p, p.grad, self.optimizer.state[p])
                for p in group["params"]
                if p.requires_grad and (p.grad is not None or not with_grad_only)
            ]
            groups.append(SliceGroup(group, slices))
        return groups

    def discard_grads(self) -> None:
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
