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
* HSDP (a 2-D (replicate, shard) mesh, placements (Replicate(), Shard(0))): gradients are
  reduce-scattered within a replica group and all-reduced across replicas, so the replicas
  hold identical shards while every rank sees its own data. ``dp_group`` is then every rank of
  the mesh (per-sample sums: d, token counts, losses), and only the first replica group counts
  its parameter-shaped partials (``counts_param_sums``): the one all-reduce over all ranks
  then sums each shard once, exactly (adding zeros rounds nothing, unlike dividing by R).
"""
from __future__ import annotations

import warnings
from typing import List, Optional

import torch
import torch.distributed as dist
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

    # --- the data-parallel group: every rank of the mesh the parameters live on ---------------
    def _mesh(self):
        """(device mesh, placements) of the first DTensor parameter; None before there is one.
        Accepts plain FSDP2 (1-D, Shard(0)) and HSDP (2-D, (Replicate(), Shard(0)))."""
        if self.optimizer is None:
            return None
        from torch.distributed.tensor import Replicate, Shard

        for group in self.optimizer.param_groups:
            for p in group["params"]:
                mesh = getattr(p, "device_mesh", None)
                if mesh is None:
                    continue
                placements = tuple(p.placements)
                hsdp = (mesh.ndim == 2 and type(placements[0]) is Replicate
                        and type(placements[1]) is Shard)
                if mesh.ndim != 1 and not hsdp:
                    raise NotImplementedError(
                        f"FSDP2Engine supports a 1-D mesh (fully_shard) and HSDP's 2-D (replicate, shard) "
                        f"mesh; got placements {placements} on {mesh} (FSDP + TP: the tensor-parallel "
                        f"ranks see the same data, so d and the norm would need other groups)")
                return mesh, placements
        return None

    @property
    def dp_group(self):
        if self._group is None:
            found = self._mesh()
            if found is not None:
                mesh = found[0]
                if mesh.ndim == 1:
                    self._group = mesh.get_group()
                else:
                    # HSDP: every rank of the mesh sees different data, so per-sample sums run over
                    # all of them (the replicas' double count of parameter sums is undone by
                    # counts_param_sums). The group of all mesh ranks is WORLD when the mesh is.
                    if mesh.size() != dist.get_world_size():
                        raise NotImplementedError(
                            f"FSDP2Engine: HSDP on a mesh of {mesh.size()} of {dist.get_world_size()} ranks; "
                            f"set engine.dp_group to a process group of the mesh's ranks")
                    self._group = dist.group.WORLD
        return self._group

    @dp_group.setter
    def dp_group(self, value):
        self._group = value

    @property
    def counts_param_sums(self) -> bool:
        # The ranks at coordinate 0 on every Replicate mesh dimension count their parameter-shaped
        # partials; the other replicas hold the same shards and add zeros (a sum over all ranks
        # would count each shard R times). Plain FSDP2 (Shard(0) only): every rank counts.
        from torch.distributed.tensor import Replicate

        found = self._mesh()
        if found is None:
            return True
        mesh, placements = found
        coordinate = mesh.get_coordinate()
        return all(coordinate[i] == 0 for i, pl in enumerate(placements) if isinstance(pl, Replicate))

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
