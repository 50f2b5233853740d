"""FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters are ``DTensor`` shards.

Each parameter is an ``nn.Parameter(DTensor)`` sharded on dim 0 over a 1-D device mesh; its
``to_local()`` is this rank's shard, a view into the unit's padded flat buffer that the next
all-gather reads (the padding is outside every view, so no norm ever sees it). After backward
the gradients are DTensors with the same sharding (reduce-scattered, averaged over ranks).

* The sharded parameter *is* the master (also under ``MixedPrecisionPolicy(param_dtype=bf16)``,
  where only the all-gathered compute copy is bf16): the perturbation needs an in-shard backup
  (``needs_backup = True``), the norm partials are summed over the mesh (``grads_sharded``).
* A forward run without grad leaves the root unit's parameters unsharded (FSDP2 keeps the
  root gathered after forward for the backward that usually follows). Shards written after
  such a forward would not be seen by the next forward, so ``publish`` reshards every unit
  (no collective): that is why this engine wants the model (``FSDP2Engine(optimizer, model)``,
  or bound by ``TrainStep``).
* Every micro-batch is reduce-scattered (``sync`` is ignored): FSDP2's no-sync mode keeps
  whole unsharded gradients on every rank, which is what sharding is meant to avoid.
"""
from __future__ import annotations

import warnings
from typing import List, Optional

import torch
from torch import Tensor

from .base import Engine, Slice, SliceGroup


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class FSDP2Engine(Engine):
    needs_backup = True
    grads_sharded = True

    def __init__(self, optimizer=None, model=None):
        self.optimizer = optimizer
        self.model = model
        self._group = None
        self._warned_no_model = False

    def bind_model(self, model) -> None:
        if self.model is None:
            self.model = model

    # --- the data-parallel group: the (one) mesh dimension the parameters are sharded on ------
    @property
    def dp_group(self):
        if self._group is None and self.optimizer is not None:
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    mesh = getattr(p, "device_mesh", None)
                    if mesh is None:
                        continue
                    if mesh.ndim != 1:
                        raise NotImplementedError(
                            f"FSDP2Engine supports a 1-D device mesh (plain fully_shard); got a {mesh.ndim}-D "
                            f"mesh {mesh}: HSDP / FSDP+TP would sum the norm over the shard dimension "
                            f"and the divergence over every data-parallel rank")
                    self._group = mesh.get_group()
                    return self._group
        return self._group

    @dp_group.setter
    def dp_group(self, value):
        self._group = value

    # --- what TRAM reads and writes ------------------------------------------------------------
    @torch.no_grad()
    def slice_groups(self, with_grad_only: bool = True) -> List[SliceGroup]:
        groups = []
        for group in self.optimizer.param_groups:
            slices = []
            for p in group["params"]:
                if not p.requires_grad or (with_grad_only and p.grad is None):
                    continue
                grad = None if p.grad is None else _local(p.grad)
                slices.append(Slice(_local(p), grad, self.optimizer.state[p]))
            groups.append(SliceGroup(group, slices))
        return groups

    def publish(self) -> None:
        """Reshard every FSDP unit, so that the next forward all-gathers the written shards."""
        modules = self._fsdp_modules()
        if modules is None:
            if not self._warned_no_model:
                warnings.warn("FSDP2Engine has no model: a forward without grad leaves the root unit "
                              "gathered and the next forward would not see written shards. Pass "
                              "FSDP2Engine(optimizer, model) or run through TrainStep.", RuntimeWarning,
                              stacklevel=3)
                self._warned_no_model = True
            return
        for m in modules:
            m.reshard()

    def _fsdp_modules(self) -> Optional[list]:
        if self.model is None:
            return None
        from torch.distributed.fsdp import FSDPModule
        return [m for m in self.model.modules() if isinstance(m, FSDPModule)]

    def discard_grads(self) -> None:
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                p.grad = None

    def backward(self, model, loss: Tensor, *, sync: bool = True) -> None:
        loss.backward()  # reduce-scatter on every micro-batch; grads accumulate sharded
