"""What the TRAM math needs from a training engine, and nothing more.

The optimizer core works on *slices*: the part of each parameter that this rank owns
(the whole tensor without sharding, a shard under FSDP2, a partition fragment under ZeRO).
An engine lists those slices and their reduced gradients, owns the data-parallel group for
the one all-reduce TRAM adds per step, and knows how to make written slices visible to the
next forward pass. The math never branches on the engine; an engine never knows the variant.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class Slice:
    """This rank's part of one parameter.

    param:  the working-precision view the next forward reads; perturbed in place.
    grad:   the matching slice of the reduced gradient (same shape as ``param``); None when
            the parameter got no gradient this step.
    state:  per-slice buffers (``backup``, ``tr_target``); lives and shards with the slice.
    master: higher-precision view of the same values (ZeRO's fp32 partition), read as theta
            when present; None where ``param`` is itself the master.
    """

    param: Tensor
    grad: Optional[Tensor]
    state: Dict[str, Any]
    master: Optional[Tensor] = None

    @property
    def theta(self) -> Tensor:
        return self.master if self.master is not None else self.param


@dataclass
class SliceGroup:
    """The slices of one optimizer param group, with that group's hyperparameters."""

    options: Dict[str, Any]
    slices: List[Slice] = field(default_factory=list)


class Engine:
    """Base engine: subclasses set the flags and implement ``slice_groups``."""

    #: False where the base step itself rewrites the working params from an untouched
    #: master (ZeRO), so the perturbation needs no backup.
    needs_backup: bool = True
    #: True where each rank holds only part of the gradient, so norm partials are summed.
    grads_sharded: bool = False
    #: The data-parallel process group: every rank that sees its own data (None: the default
    #: group when initialised). Per-sample sums (d, token counts, losses) run over it.
    dp_group = None
    #: The optimizer whose ``state`` holds the per-slice buffers (set by ``bind``).
    optimizer = None

    def bind(self, optimizer) -> None:
        """Called by the ``PerturbedOptimizer`` that runs on this engine (its ``state`` keeps
        the per-slice buffers)."""
        self.optimizer = optimizer

    def bind_model(self, model) -> None:
        """Called by ``TrainStep`` with the model it runs; engines that act on modules keep it."""

    def state_keys(self) -> List[Tensor]:
        """The tensors that key per-slice state in ``optimizer.state``, in an order that is the
        same on every run of the same configuration (checkpoints index state by position)."""
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    # --- what TRAM reads and writes --------------------------------------------------------
    def slice_groups(self, with_grad_only: bool = True) -> List[SliceGroup]:
        raise NotImplementedError

    def publish(self) -> None:
        """Make slices written since the last call visible to the next forward pass."""

    def discard_grads(self) -> None:
        """Drop pass-1 gradients so that pass 2 does not accumulate onto them."""
        raise NotImplementedError

    # --- distributed helpers ----------------------------------------------------------------
    @property
    def world_size(self) -> int:
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(self.dp_group)
        return 1

    def all_reduce_sum_(self, tensor: Tensor) -> Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.dp_group)
        return tensor

    @property
    def counts_param_sums(self) -> bool:
        """True where this rank's parameter-shaped partial sums (a norm's squares) count in a sum
        over ``dp_group``. Ranks holding a copy of slices another rank also holds (DDP: whole
        parameters everywhere; HSDP: the other replica groups) contribute zeros instead, so one
        all-reduce over every data-parallel rank counts each element once and per-sample partials
        can share it. Sharded engines (FSDP2 1-D, ZeRO): every rank; DDP: rank 0."""
        if self.grads_sharded or self.world_size == 1:
            return True
        return dist.get_rank(self.dp_group) == 0

    def param_partial(self, tensor: Tensor) -> Tensor:
        """``tensor`` (this rank's parameter-shaped partial sum) as its term of a sum over
        ``dp_group``: itself, or zeros where ``counts_param_sums`` is False."""
        return tensor if self.counts_param_sums else torch.zeros_like(tensor)

    # --- the passes ---------------------------------------------------------------------------
    def backward(self, model, loss: Tensor, *, sync: bool = True) -> None:
        """Backward for one micro-batch; ``sync=False`` defers the gradient reduction."""
        ctx = model.no_sync() if (not sync and hasattr(model, "no_sync")) else contextlib.nullcontext()
        with ctx:
            loss.backward()

    def clip_grad_norm_(self, max_norm: float, grad_scale: float = 1.0) -> Tensor:
        """Clip the reduced gradients to a global L2 norm; returns the norm before clipping.
        ``grad_scale``: the gradients are still multiplied by a loss scale (DeepSpeed's fp16
        step unscales them later): the norm is measured in true units and the gradients are
        only multiplied by the clip coefficient (sharded engines)."""
        if not self.grads_sharded:  # whole gradients on every rank: torch's own clipping
            params = [s.param for g in self.slice_groups() for s in g.slices]
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        # sharded: partial sums of squares over the local slices (never padding), one all-reduce
        with torch.no_grad():
            grads = [s.grad for g in self.slice_groups() for s in g.slices if s.grad is not None]
            device = grads[0].device if grads else torch.device("cpu")
            total = torch.zeros(1, dtype=torch.float32, device=device)
            for g in grads:
                total += g.float().pow(2).sum()
            # replicated shards (HSDP) are counted once: see counts_param_sums
            norm = self.all_reduce_sum_(self.param_partial(total)).sqrt().reshape(()) / grad_scale
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for g in grads:
                g.mul_(coef.to(g.dtype))
        return norm

    def base_step(self, scaler=None) -> None:
        """The base optimizer's step on the current (pass-2) gradients; engines whose step
        lives elsewhere (DeepSpeed) override it."""
        base = getattr(self.optimizer, "base", self.optimizer)
        if scaler is not None:
            scaler.step(base)
        else:
            base.step()
