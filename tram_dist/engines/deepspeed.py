"""DeepSpeed ZeRO stages 1, 2 and 3 (fp32 or bf16).

Usage::

    from tram_dist import TRAM, NoisyInputs, TrainStep
    from tram_dist.engines import deepspeed as tram_ds

    ds_engine, opt, engine = tram_ds.initialize(model, TRAM, config=ds_config, nu=1e-5, lr=2e-5)
    step = TrainStep(ds_engine, opt, trust_region=NoisyInputs(1e-5))
    for micro_batches in loader:          # gradient_accumulation_steps micro-batches per step
        metrics = step(micro_batches)

``initialize(model, None, config, lr=...)`` gives the plain base optimizer (the AdamW
baseline) on the same engine: ``TrainStep(ds_engine, opt)`` runs it.

The presets in ``configs/`` (``zero1.json`` ... ``zero3.json``) say "auto" for what the run
determines; ``initialize`` fills those fields (``tram_dist.ds_config.resolve_autos``), with the
batch sizes given as keyword arguments::

    ds_engine, opt, engine = tram_ds.initialize(model, TRAM, "configs/zero2.json", nu=1e-5, lr=2e-5,
                                                train_micro_batch_size_per_gpu=4,
                                                gradient_accumulation_steps=1)

Where things live (DeepSpeed 0.19; README.md, "Sharded training: DDP, FSDP2, DeepSpeed
ZeRO-1/2/3, FSDP1", has the user API, the slice table, the collectives and the per-rank
memory):

* ZeRO-1/2: each parameter's part of this rank's partition is given by ``p._hp_mapping``
  (DeepSpeed's own lp/hp link): the working-precision slice is a view of this rank's partition
  of the flat bit16 buffer, the master the same range of the fp32 partition, the gradient
  ``get_lp_grad_fragment`` (the reduced partition gradient, between backward and step).
  Written slices reach the other ranks' forward through one all-gather of the bit16
  partitions (``publish``), the same all-gather DeepSpeed's own step ends with.
* ZeRO-3: the working shard is ``p.ds_tensor`` (a view of the flat bit16 partition), the
  master the same range of the fp32 partition, the gradient the matching range of
  DeepSpeed's flat gradient-partition buffer. The last rank's padding is cut off every
  slice. The next forward all-gathers from ``ds_tensor``; persistent (never partitioned)
  parameters are re-gathered by ``publish``.

Restore: the perturbation (and a swapped-in target) is written into the working-precision
slice only; ``ds_engine.step()`` copies the untouched fp32 master back into it (and
all-gathers), so no backup is kept (``needs_backup = False``). Where the master *is* the
working partition (ZeRO-3 in fp32 keeps one copy) the engine keeps a backup instead.

Pass-1 gradients are discarded from DeepSpeed's partition buffers (``averaged_gradients``,
``all_grad_tensors``, the ZeRO-3 flat gradient buffer, the micro-step counter) so that pass 2
starts from zero. The accumulation boundary is set explicitly on every backward (the last
micro-batch of each pass), and DeepSpeed's 1/gradient_accumulation_steps loss scaling is
off because ``TrainStep`` weights micro-batches by their token share.
"""
from __future__ import annotations

import json
import os
from typing import List

import torch
import torch.distributed as dist
from torch import Tensor

from .base import Engine, Slice, SliceGroup

_INITIAL_MICRO_STEP_ID = -1  # stage_1_and_2.INITIAL_MICRO_STEP_ID


class ZeroEngine(Engine):
    """Adapter of a ``deepspeed.DeepSpeedEngine`` running ZeRO stage 1, 2 or 3."""

    grads_sharded = True

    def __init__(self, ds_engine):
        self.ds = ds_engine
        self.zero = ds_engine.optimizer
        self.optimizer = None
        self.stage = int(ds_engine.zero_optimization_stage())
        name = type(self.zero).__name__
        if self.stage not in (1, 2, 3):
            raise ValueError(f"ZeroEngine needs ZeRO stage 1, 2 or 3 (got stage {self.stage}); without "
                             f"ZeRO use DeepSpeed's DDP path through LocalEngine")
        if name == "BF16_Optimizer":
            raise NotImplementedError(
                "ZeroEngine: ZeRO-1 with bf16 and fp32 gradient accumulation runs DeepSpeed's BF16_Optimizer, "
                "which is not supported; leave data_types.grad_accum_dtype unset (bf16) or use stage 2")
        if ds_engine.fp16_enabled():
            raise NotImplementedError("ZeroEngine: fp16 with loss scaling is not supported; use bf16 or fp32")
        if getattr(self.zero, "cpu_offload", False) or getattr(self.zero, "offload_optimizer", False) \
                or getattr(self.zero, "offload_param", False):
            raise NotImplementedError("ZeroEngine: optimizer/parameter offload is not supported yet")
        if self.stage == 3:
            self.dp_group = self.zero.dp_process_group
            # ZeRO-3 keeps a single partition when the working dtype is already fp32 (the "fp32"
            # groups alias the working ones): then the master is perturbed too, and needs a backup.
            self.needs_backup = any(a is b for a, b in zip(self.zero.fp32_partitioned_groups_flat,
                                                           self.zero.fp16_partitioned_groups_flat))
        else:
            groups = self.zero.real_dp_process_group
            if any(g is not groups[0] for g in groups):
                raise NotImplementedError("ZeroEngine: parameter groups on different data-parallel groups "
                                          "(MoE expert groups) are not supported")
            self.dp_group = groups[0]
            self.needs_backup = False
        self.zero.tram_engine = self  # lets default_engine find this adapter for the baseline

    # --- state -------------------------------------------------------------------------------
    def state_keys(self) -> List[Tensor]:
        """The model parameters that have a slice on this rank (state is per rank)."""
        if self.stage == 3:
            return [p for group in self.zero.fp16_groups for p in group if self._valid3(p) > 0 and p.requires_grad]
        return [p for group in self.zero.bit16_groups for p in group if getattr(p, "_hp_mapping", None) is not None]

    def _valid3(self, p) -> int:
        n = p.partition_numel()
        return max(0, min(n, p.ds_numel - self.rank * n))

    @property
    def rank(self) -> int:
        return dist.get_rank(self.dp_group)

    # --- slices --------------------------------------------------------------------------------
    @torch.no_grad()
    def slice_groups(self, with_grad_only: bool = True) -> List[SliceGroup]:
        return self._slices3(with_grad_only) if self.stage == 3 else self._slices12(with_grad_only)

    def _slices12(self, with_grad_only: bool) -> List[SliceGroup]:
        zo, rank = self.zero, self.rank
        state = self.optimizer.state if self.optimizer is not None else {}
        out = []
        for g, params in enumerate(zo.bit16_groups):
            lp_partition = zo.parallel_partitioned_bit16_groups[g][rank]
            hp_partition = zo.single_partition_of_fp32_groups[g]
            has_grads = zo.averaged_gradients.get(g) is not None
            slices = []
            for p in params:
                mapping = getattr(p, "_hp_mapping", None)
                if mapping is None:
                    continue
                addr = mapping.hp_fragment_address
                grad = None
                if has_grads:
                    grad = mapping.get_lp_grad_fragment(p._index_in_param_group).reshape(-1)
                    if grad.numel() != addr.numel:
                        raise RuntimeError(f"ZeroEngine: gradient fragment of {tuple(p.shape)} has {grad.numel()} "
                                           f"elements, its partition range {addr.numel}; this DeepSpeed "
                                           f"layout is not supported")
                if with_grad_only and grad is None:
                    continue
                slices.append(Slice(lp_partition.narrow(0, addr.start, addr.numel), grad,
                                    state[p] if self.optimizer is not None else {},
                                    master=hp_partition.narrow(0, addr.start, addr.numel)))
            out.append(SliceGroup(zo.optimizer.param_groups[g], slices))
        return out

    def _slices3(self, with_grad_only: bool) -> List[SliceGroup]:
        zo = self.zero
        out = []
        for i, params in enumerate(zo.fp16_groups):
            fp32 = zo.fp32_partitioned_groups_flat[i]
            grads = zo.averaged_gradients.get(i)
            slices = []
            offset = 0
            for j, p in enumerate(params):
                n = p.partition_numel()
                valid = self._valid3(p)
                if valid > 0 and p.requires_grad:
                    grad = None if grads is None else grads[j].reshape(-1).narrow(0, 0, valid)
                    if not (with_grad_only and grad is None):
                        master = None if self.needs_backup else fp32.narrow(0, offset, valid)
                        slices.append(Slice(p.ds_tensor.reshape(-1).narrow(0, 0, valid), grad,
                                            self.optimizer.state[p] if self.optimizer is not None else {},
                                            master=master))
                offset += n
            out.append(SliceGroup(zo.optimizer.param_groups[zo.sub_group_to_group_id[i]], slices))
        return out

    # --- making writes visible -----------------------------------------------------------------
    @torch.no_grad()
    def publish(self) -> None:
        if self.world_size == 1 and self.stage != 3:
            return
        zo = self.zero
        if self.stage == 3:
            from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
            # A gathered parameter would shadow its written shard: release (no collective; the
            # shard is already in ds_tensor) and re-gather the persistent ones.
            gathered = [p for group in zo.fp16_groups for p in group if p.ds_status == ZeroParamStatus.AVAILABLE]
            if gathered:
                gathered[0].partition(gathered, has_been_updated=False)
            persistent = list(zo.persistent_parameters)
            if persistent:
                persistent[0].all_gather(persistent)
            return
        from deepspeed.runtime.utils import all_gather_dp_groups
        all_gather_dp_groups(groups_flat=zo.bit16_groups_flat,
                             partitioned_param_groups=zo.parallel_partitioned_bit16_groups,
                             dp_process_group=zo.real_dp_process_group,
                             start_alignment_factor=zo.nccl_start_alignment_factor,
                             allgather_bucket_size=zo.allgather_bucket_size)

    # --- gradients -----------------------------------------------------------------------------
    def discard_grads(self) -> None:
        zo = self.zero
        zo.zero_grad(set_to_none=True)  # param grads; ZeRO-3: micro-step counter and epilogue flag
        if self.stage == 3:
            zo.averaged_gradients.clear()
            zo.grad_partitions_flat_buffer.zero_()  # parameters without a pass-2 grad read zero
            return
        release = getattr(zo, "_release_preflattened_grad_buffers", None)
        if release is not None:
            release()
        for k in list(zo.averaged_gradients):  # keep the dict: _hp_mapping holds it
            zo.averaged_gradients[k] = None
        for k in list(zo.all_grad_tensors):
            zo.all_grad_tensors[k] = None
        zo.micro_step_id = _INITIAL_MICRO_STEP_ID

    def backward(self, model, loss: Tensor, *, sync: bool = True) -> None:
        # the last micro-batch of a pass is the accumulation boundary (stage 1 reduces there);
        # TrainStep already weights each micro-batch, so no 1/gradient_accumulation_steps
        self.ds.set_gradient_accumulation_boundary(bool(sync))
        self.ds.backward(loss, scale_wrt_gas=False)

    def base_step(self, scaler=None) -> None:
        if scaler is not None:
            raise NotImplementedError("ZeroEngine: a GradScaler is not supported (bf16/fp32 need none)")
        self.ds.set_gradient_accumulation_boundary(True)
        self.ds.step()
        if getattr(self.zero, "overflow", False) and not self.needs_backup:
            # DeepSpeed skipped the update (non-finite gradient norm) and returned before its
            # copy of the master into the working parameters: that copy was our restore.
            self.restore_working_from_master()

    @torch.no_grad()
    def restore_working_from_master(self) -> None:
        from .. import kernels
        for group in self.slice_groups(with_grad_only=False):
            kernels.restore_([s.param for s in group.slices], [s.theta for s in group.slices])
        self.publish()


_BATCH_KEYWORDS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                   "gradient_clipping")


def _world_size() -> int:
    """DeepSpeed's data-parallel world size before ``deepspeed.initialize`` (no model or
    pipeline parallelism here): the process group's, else the launcher's WORLD_SIZE."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _model_dtype(model) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def initialize(model, method=None, config=None, *, base_optimizer=torch.optim.AdamW, model_parameters=None,
               lr_scheduler=None, **kwargs):
    """``deepspeed.initialize`` with a TRAM-family optimizer on top of the ZeRO optimizer.

    Args:
        model: the ``torch.nn.Module`` (a Hugging Face model).
        method: a ``PerturbedOptimizer`` subclass (``TRAM``, ``SAM``, ``ASAM``, ``FisherSAM``,
            ``TRAMFisher``) or None for the plain base optimizer (the AdamW baseline).
        config: the DeepSpeed config (dict or path); its ``optimizer`` section is ignored
            (the base optimizer is built here as a client optimizer). Fields that say "auto"
            (as in ``configs/zero*.json``) are filled by ``tram_dist.ds_config.resolve_autos``:
            the batch fields from the keyword arguments below (one of the three may be
            derived from the other two and the world size), ``gradient_clipping`` from its
            keyword argument or 0.0 (no DeepSpeed clipping: clip with
            ``TrainStep(max_grad_norm=...)``), the optimizer section from the base
            optimizer's ``lr``, ``betas``, ``eps``, ``weight_decay``, ``bf16.enabled`` from the
            model's dtype (bfloat16 or not), the ZeRO bucket sizes from
            ``model.config.hidden_size``. An "auto" left over raises one ``ValueError``
            (``DsConfigError``) line naming the field and how to set it.
        base_optimizer: the torch optimizer class ZeRO partitions (AdamW by default).
        model_parameters: parameters or param groups (default: trainable parameters).
        lr_scheduler: passed to ``deepspeed.initialize`` (stepped by ``ds_engine.step()``).
        train_batch_size, train_micro_batch_size_per_gpu, gradient_accumulation_steps,
        gradient_clipping: keyword-only; fill the config's "auto" (or missing) fields of the
            same name; a concrete config value must agree.
        **kwargs: the method's hyperparameters (``nu``, ``rho``, ``eta``, ``on_nonfinite``) and
            the base optimizer's (``lr``, ``betas``, ``weight_decay``, ...).

    Returns ``(ds_engine, optimizer, engine)``: run ``TrainStep(ds_engine, optimizer, ...)``.
    The optimizer's ``param_groups`` are the ZeRO optimizer's (an LR scheduler may drive
    either); its base step is ``ds_engine.step()``.
    """
    import deepspeed

    from ..ds_config import resolve_autos

    own = {}
    if method is not None:
        names = set(method.hyperparameters) | {"on_nonfinite"}
        own = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
    batch = {k: kwargs.pop(k) for k in _BATCH_KEYWORDS if k in kwargs}
    source = "DeepSpeed config"
    if isinstance(config, (str, os.PathLike)):
        source = str(config)
        with open(config) as f:
            config = json.load(f)
    elif batch and not isinstance(config, dict):
        raise TypeError(f"initialize: {sorted(batch)} fill a config dict or file; got config of type "
                        f"{type(config).__name__}")
    params = model_parameters if model_parameters is not None else [p for p in model.parameters() if p.requires_grad]
    base = base_optimizer(params, **kwargs)
    if isinstance(config, dict):
        config = resolve_autos(config, world_size=_world_size(), optimizer_defaults=base.defaults,
                               bf16=_model_dtype(model) == torch.bfloat16,
                               hidden_size=getattr(getattr(model, "config", None), "hidden_size", None),
                               source=source, **batch)
        # the base optimizer is a client optimizer built here; DeepSpeed's own section would
        # compete with it
        config = {k: v for k, v in config.items() if k not in ("optimizer", "_comments")}
    ds_engine, zero_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=base, config=config,
                                                            lr_scheduler=lr_scheduler)
    engine = ZeroEngine(ds_engine)
    if method is None:
        return ds_engine, zero_optimizer, engine
    optimizer = method(None, zero_optimizer.optimizer, engine=engine, **own)
    return ds_engine, optimizer, engine


__all__ = ["ZeroEngine", "initialize"]
