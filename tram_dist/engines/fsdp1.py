"""FSDP1 (``FullyShardedDataParallel(use_orig_params=True)``).

With ``use_orig_params=True`` and a sharded strategy, every original parameter is, while its
unit is resharded, a 1-D view of its part of this rank's shard of the unit's ``FlatParameter``
(all, part or none of it: size 0), and after backward ``p.grad`` is the matching view of the
reduce-scattered gradient. The padding of the flat shard belongs to no parameter view.

Same contract as FSDP2: the shard is the master (``needs_backup``), norm partials are summed
over the FSDP process group, every micro-batch is reduced (no_sync would keep whole
gradients). A forward without grad leaves the root unit unsharded (FSDP1 keeps the root
gathered for the backward), and while a unit is unsharded its parameters are views of the
*unsharded* flat parameter: slices are only taken, and writes only published, after every
unit is resharded (``_reshard_all``, no collective).

FSDP1 refuses to run on CPU ("FSDP needs a non-CPU accelerator device"), so this engine is
tested only where CUDA is present.
"""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from .base import Engine, Slice, SliceGroup


class FSDP1Engine(Engine):
    needs_backup = True
    grads_sharded = True

    def __init__(self, optimizer=None, model=None):
        self.optimizer = optimizer
        self.model = model

    def bind_model(self, model) -> None:
        if self.model is None:
            self.model = model

    @property
    def dp_group(self):
        return getattr(self.model, "process_group", None)

    @dp_group.setter
    def dp_group(self, value):  # the group is the FSDP root's; kept for the base interface
        pass

    def _units(self):
        if self.model is None:
            raise RuntimeError("FSDP1Engine needs the FSDP model: FSDP1Engine(optimizer, model), or run "
                               "through TrainStep")
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        return FSDP.fsdp_modules(self.model)

    def _reshard_all(self) -> None:
        from torch.distributed.fsdp._runtime_utils import _reshard  # the reshard FSDP's hooks run
        for unit in self._units():
            handle = unit._handle
            if handle is None or not handle.uses_sharded_strategy:
                continue
            if not handle.is_sharded(handle.flat_param):
                _reshard(unit, handle, True)

    @torch.no_grad()
    def slice_groups(self, with_grad_only: bool = True) -> List[SliceGroup]:
        self._reshard_all()
        groups = []
        for group in self.optimizer.param_groups:
            slices = [Slice(p, p.grad, self.optimizer.state[p]) for p in group["params"]
                      if p.requires_grad and (p.grad is not None or not with_grad_only)]
            groups.append(SliceGroup(group, slices))
        return groups

    def publish(self) -> None:
        self._reshard_all()

    def discard_grads(self) -> None:
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        for unit in self._units():
            if unit._handle is not None:
                unit._handle.flat_param.grad = None

    def backward(self, model, loss: Tensor, *, sync: bool = True) -> None:
        loss.backward()  # reduce-scatter on every micro-batch
