"""DeepSpeed ZeRO stages 1, 2 and 3 (fp32 or bf16; fp16 with DeepSpeed's loss scaler under ZeRO-1/2;
optimizer offload to the CPU under every stage, parameter offload to the CPU under ZeRO-3).

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

Offload (``offload_optimizer.device = "cpu"``): the fp32 master partition, its gradient
(DeepSpeed copies the reduced partition gradient into ``single_partition_of_fp32_groups[g].grad``,
ZeRO-3 ``fp32_partitioned_groups_flat[i].grad``; ``averaged_gradients`` stays empty) and the base
optimizer's state live in host memory; DeepSpeed steps the client optimizer as given there
(``initialize`` sets ``zero_force_ds_cpu_optimizer`` false unless the base is DeepSpeedCPUAdam).
TRAM reads theta and g there, so its arithmetic runs on the host, on a host copy of the working
partition (ZeRO-1/2: DeepSpeed's own ``param_buffer_of_bit16_for_cpu_offload_groups``, which its step
fills from the master; ZeRO-3: one of the engine's), refreshed after each backward and step and
uploaded by ``publish``. With ZeRO-3 ``offload_param`` too the working partition is already in host
memory and is written directly; with ``offload_param`` alone the copy sits on the accelerator, beside
the master. Which parameters have a gradient is DeepSpeed's record of their norms
(``norm_for_param_grads``); the host gradient partitions are zeroed between the passes.

fp16 (ZeRO-1/2): DeepSpeed scales every backward by its loss scale. After pass 1 ``TrainStep`` asks
``pass1_overflowed``: DeepSpeed's own overflow check (one all-reduce); on an overflow DeepSpeed's own
step skips (it lowers the scale, counts the skipped step, drops the gradients) before anything was
written; otherwise pass 1's gradients are unscaled in place for the ascent. Pass 2's gradients stay
scaled for DeepSpeed's step (``clip_grad_norm_`` measures them in true units); an overflow there
skips DeepSpeed's step and the engine copies the master back into the perturbed working parameters
(``step_skipped`` tells ``TrainStep``).

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

from ..ds_config import FP16_ZERO3_ERROR, OFFLOAD_WORKS
from .base import Engine, Slice, SliceGroup

_INITIAL_MICRO_STEP_ID = -1  # stage_1_and_2.INITIAL_MICRO_STEP_ID


class ZeroEngine(Engine):
    """Adapter of a ``deepspeed.DeepSpeedEngine`` running ZeRO stage 1, 2 or 3."""

    grads_sharded = True

    #: Under offload the fp32 master and the working partition the forward reads may sit on
    #: different devices: optimizer offload puts the master and its gradient in host memory while
    #: the working partition stays on the accelerator (ZeRO-1/2; ZeRO-3 without ``offload_param``),
    #: parameter offload alone does the opposite (ZeRO-3). TRAM's math then runs beside the master,
    #: on a copy of the working partition there (``staging``: DeepSpeed's own host bit16 buffer
    #: under ZeRO-1/2, one of the engine's under ZeRO-3), which ``publish`` uploads. None: stage
    #: where the two devices differ (a GPU run); True: stage whenever something is offloaded (lets
    #: a CPU test run the GPU layout).
    stage_on_host = None

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
        zo = self.zero
        self.fp16 = bool(ds_engine.fp16_enabled())
        if self.fp16 and self.stage == 3:
            raise NotImplementedError(FP16_ZERO3_ERROR)
        if self.stage == 3:
            self.offload = bool(getattr(zo, "offload_optimizer", False))
            self.offload_param = bool(getattr(zo, "offload_param", False))
            if getattr(zo, "swap_optimizer", False) or getattr(zo, "params_in_nvme_and_cpu", False):
                raise NotImplementedError("ZeroEngine: offload to NVMe is not supported (TRAM reads the fp32 master "
                                          "and the working partition every step); " + OFFLOAD_WORKS)
        else:
            self.offload = bool(getattr(zo, "cpu_offload", False))
            self.offload_param = False
        if self.stage == 3:
            self.dp_group = zo.dp_process_group
            # ZeRO-3 keeps a single partition when the working dtype is already fp32 (the "fp32"
            # groups alias the working ones): then the master is perturbed too, and needs a backup.
            self.needs_backup = any(a is b for a, b in zip(zo.fp32_partitioned_groups_flat,
                                                           zo.fp16_partitioned_groups_flat))
        else:
            groups = zo.real_dp_process_group
            if any(g is not groups[0] for g in groups):
                raise NotImplementedError("ZeroEngine: parameter groups on different data-parallel groups "
                                          "(MoE expert groups) are not supported")
            self.dp_group = groups[0]
            self.needs_backup = False
        self.step_skipped = False  # DeepSpeed skipped the last base step (fp16 overflow, non-finite norm)
        # offload: the host fp32 gradient partitions DeepSpeed copies the reduced gradients into and
        # steps on (its offload_gradient_dict and the _hp_mapping views point into them). The base
        # optimizer's zero_grad(set_to_none=True) (the TRAM wrapper's, after each step) drops them from
        # the ZeRO-1/2 master's .grad, where DeepSpeed expects them for ever: they are put back.
        self._host_grads = [m.grad for _, m in self._flats()] if self.offload else None
        self._staging = self._build_staging()
        self._staging_stale = True
        zo.tram_engine = self  # lets default_engine find this adapter for the baseline

    def _flats(self):
        """Per group: (this rank's working partition, its fp32 master), flat and aligned."""
        zo = self.zero
        if self.stage == 3:
            return list(zip(zo.fp16_partitioned_groups_flat, zo.fp32_partitioned_groups_flat))
        rank = self.rank
        return [(zo.parallel_partitioned_bit16_groups[g][rank], zo.single_partition_of_fp32_groups[g])
                for g in range(len(zo.bit16_groups))]

    def _build_staging(self):
        """Copies of the working partitions on the master's device where TRAM must compute beside
        the master (see ``stage_on_host``); None per group where it writes the working partition
        itself."""
        if not (self.offload or self.offload_param):
            return None
        out, any_staged = [], False
        for g, (work, master) in enumerate(self._flats()):
            if self.needs_backup or not (self.stage_on_host or work.device != master.device):
                out.append(None)
                continue
            buf = None
            if self.stage != 3:  # DeepSpeed's host bit16 buffer (optimizer offload), which its step fills
                buf = self.zero.param_buffer_of_bit16_for_cpu_offload_groups[g]
                if buf.numel() != work.numel() or buf.dtype != work.dtype:
                    buf = None
            if buf is None:
                buf = torch.empty(work.numel(), dtype=work.dtype, device=master.device)
            out.append(buf)
            any_staged = True
        return out if any_staged else None

    def _sync_staging(self) -> None:
        # the working partitions may have changed since the copies were taken (a step, a load)
        if self._staging is None or not self._staging_stale:
            return
        with torch.no_grad():
            for buf, (work, _) in zip(self._staging, self._flats()):
                if buf is not None:
                    buf.copy_(work.reshape(-1))
        self._staging_stale = False

    def _working(self, g: int, work: Tensor) -> Tensor:
        return work if self._staging is None or self._staging[g] is None else self._staging[g]

    def _attach_host_grads(self) -> None:
        if self._host_grads is not None:
            for (_, master), grad in zip(self._flats(), self._host_grads):
                if master.grad is None and grad is not None:
                    master.grad = grad

    def _offloaded_grad_ids(self):
        """Under offload: ids of the parameters whose reduced gradient reached the host fp32 gradient
        partition since the last step or discard (DeepSpeed records their norms there)."""
        return self.zero.norm_for_param_grads

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
        self._sync_staging()
        return self._slices3(with_grad_only) if self.stage == 3 else self._slices12(with_grad_only)

    def _slices12(self, with_grad_only: bool) -> List[SliceGroup]:
        zo = self.zero
        state = self.optimizer.state if self.optimizer is not None else {}
        out = []
        offloaded = self._offloaded_grad_ids() if self.offload else None
        for g, (params, (work, hp_partition)) in enumerate(zip(zo.bit16_groups, self._flats())):
            lp_partition = self._working(g, work)
            # offload: the reduced gradients sit in the host fp32 gradient partition (DeepSpeed's
            # offload_gradient_dict views, what get_lp_grad_fragment returns), averaged_gradients stays empty
            group_has_grads = offloaded is not None or zo.averaged_gradients.get(g) is not None
            slices = []
            for p in params:
                mapping = getattr(p, "_hp_mapping", None)
                if mapping is None:
                    continue
                addr = mapping.hp_fragment_address
                grad = None
                if group_has_grads and (offloaded is None or zo.get_param_id(p) in offloaded):
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
        offloaded = self._offloaded_grad_ids() if self.offload else None
        for i, params in enumerate(zo.fp16_groups):
            fp32 = zo.fp32_partitioned_groups_flat[i]
            staging = self._working(i, None)
            if offloaded is not None:  # the host fp32 gradient partition DeepSpeed steps on
                host_grad = self._host_grads[i]
                grads = None
            else:
                host_grad = None
                grads = zo.averaged_gradients.get(i)
            slices = []
            offset = 0
            for j, p in enumerate(params):
                n = p.partition_numel()
                valid = self._valid3(p)
                if valid > 0 and p.requires_grad:
                    if offloaded is not None:
                        has = host_grad is not None and zo.get_param_id(p) in offloaded
                        grad = host_grad.narrow(0, offset, valid) if has else None
                    else:
                        grad = None if grads is None else grads[j].reshape(-1).narrow(0, 0, valid)
                    if not (with_grad_only and grad is None):
                        master = None if self.needs_backup else fp32.narrow(0, offset, valid)
                        param = (p.ds_tensor.reshape(-1).narrow(0, 0, valid) if staging is None
                                 else staging.narrow(0, offset, valid))
                        slices.append(Slice(param, grad,
                                            self.optimizer.state[p] if self.optimizer is not None else {},
                                            master=master))
                offset += n
            out.append(SliceGroup(zo.optimizer.param_groups[zo.sub_group_to_group_id[i]], slices))
        return out

    # --- making writes visible -----------------------------------------------------------------
    @torch.no_grad()
    def publish(self) -> None:
        if self._staging is not None:  # upload the copies TRAM wrote (offload on an accelerator)
            for buf, (work, _) in zip(self._staging, self._flats()):
                if buf is not None:
                    work.reshape(-1).copy_(buf)
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
        if self.offload:
            # the reduced gradients went to the host fp32 gradient partitions, which DeepSpeed steps
            # on whole: zero them (a parameter without a pass-2 gradient must not keep pass 1's) and
            # forget which parameters had one (norm_for_param_grads; overflow flag)
            zo.reset_cpu_buffers()
            self._attach_host_grads()
            for grad in self._host_grads:
                if grad is not None:
                    grad.zero_()
        if self.stage == 3:
            zo.averaged_gradients.clear()
            zo.grad_partitions_flat_buffer.zero_()  # parameters without a pass-2 grad read zero
            if self.offload:
                zo._offload_boundary_param_ids = set()
            return
        release = getattr(zo, "_release_preflattened_grad_buffers", None)
        if release is not None:
            release()
        for k in list(zo.averaged_gradients):  # keep the dict: _hp_mapping holds it
            zo.averaged_gradients[k] = None
        for k in list(zo.all_grad_tensors):
            zo.all_grad_tensors[k] = None
        if self.offload:
            zo._offload_accumulated_param_ids = set()
        zo.micro_step_id = _INITIAL_MICRO_STEP_ID

    def backward(self, model, loss: Tensor, *, sync: bool = True) -> None:
        # the last micro-batch of a pass is the accumulation boundary (stage 1 reduces there);
        # TrainStep already weights each micro-batch, so no 1/gradient_accumulation_steps.
        # fp16: DeepSpeed scales the loss by its current loss scale here.
        self.ds.set_gradient_accumulation_boundary(bool(sync))
        self._attach_host_grads()
        self.ds.backward(loss, scale_wrt_gas=False)
        self._staging_stale = True
        if sync and self.offload:
            # the copies of the reduced gradients into host memory may still be in flight
            wait = getattr(self.zero, "_wait_for_offload_copies", None)
            if wait is not None:
                wait()
            from deepspeed.accelerator import get_accelerator
            get_accelerator().synchronize()

    def all_reduce_sum_(self, tensor: Tensor) -> Tensor:
        # offload puts the norm partials beside the host master; the data-parallel backend (nccl on
        # GPUs) reduces device tensors
        if self.world_size > 1 and self.offload and tensor.device.type == "cpu":
            from deepspeed.accelerator import get_accelerator
            device = torch.device(get_accelerator().current_device_name())
            if device.type != "cpu":
                moved = tensor.to(device)
                dist.all_reduce(moved, op=dist.ReduceOp.SUM, group=self.dp_group)
                tensor.copy_(moved)
                return tensor
        return super().all_reduce_sum_(tensor)

    # --- fp16: DeepSpeed's loss scaler (ZeRO-1/2) ----------------------------------------------
    @property
    def loss_scale(self) -> float:
        """The scale DeepSpeed multiplied the loss by (1 outside fp16)."""
        return float(self.zero.loss_scale) if self.fp16 else 1.0

    def pass1_overflowed(self) -> bool:
        """fp16, after pass 1's backward (``TrainStep`` asks): True when any rank's reduced gradient
        is non-finite (DeepSpeed's own check, one all-reduce). The step is then skipped by
        DeepSpeed's own step, which finds the same overflow: it lowers the loss scale, counts the
        skipped step and drops the gradients; nothing was written into the parameters yet.
        Otherwise pass 1's gradients are unscaled in place, so that the ascent sees true
        gradients (they are discarded before pass 2). Always False outside fp16 (no collective)."""
        self.step_skipped = False
        if not self.fp16:
            return False
        zo = self.zero
        if zo.has_overflow(zo.partition_gradients):
            self.ds.set_gradient_accumulation_boundary(True)
            self.ds.step()  # overflow: loss scale update, skipped_steps, gradients dropped, no update
            self.step_skipped = True
            self.discard_grads()
            return True
        inverse = 1.0 / self.loss_scale
        if inverse != 1.0:
            with torch.no_grad():
                for group in self.slice_groups():
                    for s in group.slices:
                        s.grad.mul_(inverse)
        return False

    def clip_grad_norm_(self, max_norm: float, grad_scale: float = 1.0) -> Tensor:
        # fp16: the pass-2 gradients are still scaled (DeepSpeed's step unscales them)
        return super().clip_grad_norm_(max_norm, grad_scale=grad_scale * self.loss_scale)

    def base_step(self, scaler=None) -> None:
        if scaler is not None:
            raise NotImplementedError("ZeroEngine: a torch GradScaler is not supported; fp16 under ZeRO-1/2 uses "
                                      "DeepSpeed's loss scaler (fp16.enabled in the DeepSpeed config)")
        self.ds.set_gradient_accumulation_boundary(True)
        self.ds.step()
        self._staging_stale = True
        self.step_skipped = bool(getattr(self.zero, "overflow", False))
        if self.step_skipped and not self.needs_backup:
            # DeepSpeed skipped the update (fp16 overflow, non-finite gradient norm) and returned
            # before its copy of the master into the working parameters: that copy was our restore.
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


def _is_ds_cpu_optimizer(optimizer) -> bool:
    """DeepSpeed's own CPU optimizers (what ``zero_force_ds_cpu_optimizer`` demands under offload)."""
    return type(optimizer).__module__.startswith("deepspeed.ops.") and "CPU" in type(optimizer).__name__


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

    from ..ds_config import DsConfigError, offloads_optimizer, resolve_autos, zero_support_error

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
        ds_cpu = _is_ds_cpu_optimizer(base)
        problem = zero_support_error(config, source, ds_cpu_optimizer=ds_cpu)
        if problem is not None:
            raise DsConfigError(problem)
        if offloads_optimizer(config) and not ds_cpu and "zero_force_ds_cpu_optimizer" not in config:
            # with the optimizer offloaded DeepSpeed insists on DeepSpeedCPUAdam unless told: the base
            # optimizer (torch AdamW by default) is stepped as given, on the host fp32 master
            config["zero_force_ds_cpu_optimizer"] = False
    ds_engine, zero_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=base, config=config,
                                                            lr_scheduler=lr_scheduler)
    engine = ZeroEngine(ds_engine)
    if method is None:
        return ds_engine, zero_optimizer, engine
    optimizer = method(None, zero_optimizer.optimizer, engine=engine, **own)
    return ds_engine, optimizer, engine


__all__ = ["ZeroEngine", "initialize"]
