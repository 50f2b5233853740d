"""One engine's part of a run: a Hugging Face model, its optimizer and a ``TrainStep`` under one
engine, with that engine's checkpoint layout and a consolidated ``save_pretrained`` export.
``tram_dist.Run`` builds one; the engine tests build them directly.

    run = build_run(kind, module, dist=d, args=args, method_kwargs={...}, ds_config=cfg)
    metrics = run.step(micro_batches)              # one optimizer step
    run.save_checkpoint(folder, client_state)      # every rank calls
    client_state = run.load_checkpoint(folder)
    run.save_final(folder, tokenizer)              # every rank calls; rank 0 writes

==========  ==================  ===============================================================
kind        class               engine
==========  ==================  ===============================================================
single      ``LocalRun``        one process, whole parameters
ddp         ``LocalRun``        ``DistributedDataParallel``; rank 0 writes ``state.pt``
fsdp        ``FSDP2Run``        ``fully_shard`` on every transformer block, then the root; bf16
                                (``--bf16``): ``MixedPrecisionPolicy(param_dtype=bf16,
                                reduce_dtype=fp32)`` with fp32 sharded masters
deepspeed   ``DeepSpeedRun``    ZeRO-1/2/3 (``tram_dist.engines.deepspeed.initialize``)
==========  ==================  ===============================================================

Interface (what a launcher uses):

* ``model``: called for the training forward (DDP / FSDP2 module / DeepSpeed engine);
  ``eval_model``: called for no-grad evaluation forwards; ``module``: the Hugging Face model.
* ``optimizer``: the torch optimizer whose ``param_groups`` carry the learning rate, i.e. what
  an LR scheduler wraps (under DeepSpeed: the base optimizer ZeRO steps; see ``DeepSpeedRun``).
* ``step``: the ``TrainStep``; ``step.optimizer`` is the optimizer it drives.
* ``save_checkpoint(dir, client_state)`` / ``load_checkpoint(dir) -> client_state``: every rank
  calls; single/DDP write ``dir/state.pt``, FSDP2 and DeepSpeed go through
  ``tram_dist.checkpoint`` (``dir/dcp``: torch.distributed.checkpoint; ``dir/zero``: DeepSpeed's
  folder plus per-rank TRAM files).
* ``save_final(dir, tokenizer)``: every rank calls; rank 0 writes ``save_pretrained`` (safetensors)
  with full fp32 weights under every engine (FSDP2: the full state dict gathered to rank 0;
  ZeRO-1/2/3: the fp32 master weights, gathered parameter by parameter).

Gradient clipping (``--max-grad-norm``) is done by ``TrainStep`` under every engine (the same
norm and formula, reported as ``clip_norm``); DeepSpeed's own ``gradient_clipping`` is set to 0
so that the gradients are not clipped twice. The LR schedule is the launcher's: no scheduler is
given to DeepSpeed, so ``ds_engine.step()`` never steps one.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from .ds_config import DsConfigError, zero_stage
from .methods import build_method
from .safe_load import load_tensors
from .optim import PerturbedOptimizer
from .step import TrainStep

KINDS = ("single", "ddp", "fsdp", "deepspeed")


class RunError(ValueError):
    """A model or setting the chosen engine cannot run; one line with the fix."""


def _split_method_kwargs(method_kwargs: dict) -> tuple[dict, str]:
    kwargs = dict(method_kwargs)
    divergence = kwargs.pop("divergence", "kl")  # a TrainStep option, the rest build_method's
    return kwargs, divergence


def _autocast(args):
    return torch.bfloat16 if args.bf16 else None


def _step_options(args, divergence, overrides=None) -> dict:
    """The ``TrainStep`` options every engine's run takes from the config (``overrides``: a
    caller's own, e.g. a test's)."""
    out = dict(divergence=divergence, autocast_dtype=_autocast(args), max_grad_norm=args.max_grad_norm,
               seed=args.seed, target_dropout=getattr(args, "target_dropout", "shared"),
               divergence_fraction=getattr(args, "divergence_fraction", 1.0),
               skip_nonfinite=getattr(args, "nonfinite", "stop") == "skip")
    out.update(overrides or {})
    return out


def _optimizer(module, args, method_kwargs: dict, spec):
    """``(optimizer, trust_region, divergence)`` of the method: from ``build_method`` by name,
    or from ``spec = (optimizer class or None, its hyperparameters, trust region)``, a method
    given by its parts (as ``method_spec`` returns them; e.g. a variant build_method lacks)."""
    kwargs, divergence = _split_method_kwargs(method_kwargs)
    if spec is None:
        optimizer, trust_region = build_method(args.method, module, lr=args.lr, betas=tuple(args.betas),
                                               weight_decay=args.weight_decay, sigma=args.sigma, **kwargs)
        return optimizer, trust_region, divergence
    cls, hyper, trust_region = spec
    params = [p for p in module.parameters() if p.requires_grad]
    base = dict(lr=args.lr, betas=tuple(args.betas), eps=kwargs.get("eps", 1e-8), weight_decay=args.weight_decay)
    optimizer = cls(params, torch.optim.AdamW, **base, **hyper) if cls else torch.optim.AdamW(params, **base)
    return optimizer, trust_region, divergence


def check_method_options(args, method_kwargs: dict) -> None:
    """Build the method on a placeholder parameter: a bad option (an unknown name, a value out
    of range) raises here, before any model or engine work, as build_method's own error."""
    from .divergence import get_divergence

    kwargs, divergence = _split_method_kwargs(method_kwargs)
    get_divergence(divergence)
    placeholder = [torch.nn.Parameter(torch.zeros(1))]
    build_method(args.method, placeholder, lr=args.lr, betas=tuple(args.betas), weight_decay=args.weight_decay,
                 sigma=args.sigma, **kwargs)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _persistent_buffers(module) -> dict:
    out = {}
    for prefix, m in module.named_modules():
        for name, b in m.named_buffers(recurse=False):
            if b is not None and name not in m._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = b
    return out


def _write_pretrained(module, state_dict: dict, path: Path, tokenizer) -> None:
    """``save_pretrained`` of ``module``'s class and config with ``state_dict`` (rank 0 only);
    the config's dtype is that of the saved tensors (fp32), not the working dtype."""
    floating = [t.dtype for t in state_dict.values() if torch.is_tensor(t) and t.is_floating_point()]
    module.save_pretrained(path, state_dict=state_dict)  # may empty state_dict
    if floating:
        config = json.loads((Path(path) / "config.json").read_text())
        dtype = str(floating[0]).removeprefix("torch.")
        if config.get("dtype", dtype) != dtype:
            config["dtype"] = dtype
            (Path(path) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(path)


def _tie_aliases(module, state_dict: dict) -> dict:
    """Tied parameters (GPT-2's lm_head / wte) share one tensor, as in ``module.state_dict()``,
    so that ``save_pretrained`` drops the alias."""
    first = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        primary = first.setdefault(id(p), name)
        if primary != name and primary in state_dict:
            state_dict[name] = state_dict[primary]
    return state_dict


# ---------------------------------------------------------------------------------------------
# single process / DDP
# ---------------------------------------------------------------------------------------------
class LocalRun:
    """Single process or DDP: whole parameters on every rank, rank 0 writes checkpoints."""

    def __init__(self, kind: str, module, d, args, method_kwargs: dict, spec=None, step_overrides=None):
        self.kind, self.module, self.dist = kind, module.to(d.device), d
        self.model = self.module
        if kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.module, device_ids=[d.device.index] if d.device.type == "cuda" else None)
        self.eval_model = self.module  # no-grad forwards need no DDP hooks
        self.optimizer, self.trust_region, divergence = _optimizer(self.module, args, method_kwargs, spec)
        self.step = TrainStep(self.model, self.optimizer, trust_region=self.trust_region,
                              **_step_options(args, divergence, step_overrides))

    def save_checkpoint(self, path: Path, client_state: dict) -> None:
        if self.dist.main:
            torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "client": client_state}, Path(path) / "state.pt")

    def load_checkpoint(self, path: Path) -> dict:
        state = load_tensors(Path(path) / "state.pt", map_location=self.dist.device)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        return state["client"]

    def save_final(self, path: Path, tokenizer) -> None:
        if self.dist.main:
            self.module.save_pretrained(path, safe_serialization=True)
            tokenizer.save_pretrained(path)


# ---------------------------------------------------------------------------------------------
# FSDP2
# ---------------------------------------------------------------------------------------------
def transformer_blocks(module) -> list:
    """The blocks to shard one by one: the classes the model lists in ``_no_split_modules``
    (GPT2Block, ...), else GPT-2's ``transformer.h``."""
    names = set(getattr(module, "_no_split_modules", None) or ())
    blocks = [m for m in module.modules() if type(m).__name__ in names and m is not module]
    if not blocks and hasattr(getattr(module, "transformer", None), "h"):
        blocks = list(module.transformer.h)
    if not blocks:
        raise RunError(f"engine fsdp2: cannot find the transformer blocks of {type(module).__name__} "
                         "(no _no_split_modules); shard it by hand or run with ddp / a zero engine")
    return blocks


def fsdp_mesh(device_type: str, world_size: int, replicas: int = 1):
    """The 1-D mesh of plain FSDP2, or HSDP's 2-D (replicate, shard) mesh: ``replicas`` groups of
    ``world_size / replicas`` consecutive ranks (a node's GPUs), each holding one full sharded copy."""
    from torch.distributed.device_mesh import init_device_mesh

    if replicas == 1:
        return init_device_mesh(device_type, (world_size,))
    if world_size % replicas:
        raise RunError(f"hsdp_replicas {replicas} does not divide the world size {world_size}; use "
                       "the number of nodes (or another divisor)")
    return init_device_mesh(device_type, (replicas, world_size // replicas),
                            mesh_dim_names=("replicate", "shard"))


class FSDP2Run:
    """``fully_shard`` each transformer block, then the root, over a 1-D mesh of every rank.

    The sharded fp32 parameters are TRAM's masters (``FSDP2Engine``, chosen by TrainStep for
    DTensor parameters). ``--bf16``: the all-gathered compute copies are bf16, gradients are
    reduce-scattered in fp32, and the passes run under bf16 autocast like the other engines."""

    kind = "fsdp"

    def __init__(self, module, d, args, method_kwargs: dict, spec=None, step_overrides=None):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not (dist.is_available() and dist.is_initialized()):
            raise RunError("FSDP2 needs an initialised process group (start with torchrun)")
        self.dist = d
        module = module.to(d.device)
        mesh = fsdp_mesh(d.device.type, dist.get_world_size(), getattr(args, "hsdp_replicas", 1))
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if args.bf16 else MixedPrecisionPolicy())
        for block in transformer_blocks(module):
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(module, mesh=mesh, mp_policy=mp)
        self.module = self.model = self.eval_model = module  # forwards are collective: every rank runs them
        self.optimizer, self.trust_region, divergence = _optimizer(module, args, method_kwargs, spec)
        self.step = TrainStep(module, self.optimizer, trust_region=self.trust_region,
                              **_step_options(args, divergence, step_overrides))

    def _reshard(self) -> None:
        # a no-grad forward (evaluation) leaves the root unit gathered: state dicts want shards
        from torch.distributed.fsdp import FSDPModule

        for m in self.module.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    def save_checkpoint(self, path: Path, client_state: dict) -> None:
        from .checkpoint import save_checkpoint

        self._reshard()
        save_checkpoint(str(path), self.module, self.optimizer, tag="dcp", client_state=client_state)

    def load_checkpoint(self, path: Path) -> dict:
        from .checkpoint import load_checkpoint

        self._reshard()
        return load_checkpoint(str(path), self.module, self.optimizer, tag="dcp")

    def save_final(self, path: Path, tokenizer) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        self._reshard()
        state = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True,
                                                                           cpu_offload=True))
        if self.dist.main:  # the other ranks receive an empty dict
            _write_pretrained(self.module, _tie_aliases(self.module, state), path, tokenizer)
        del state
        _barrier()


# ---------------------------------------------------------------------------------------------
# DeepSpeed ZeRO
# ---------------------------------------------------------------------------------------------
def check_ds_config(cfg: dict, source: str = "DeepSpeed config") -> None:
    """What the TRAM ZeRO engine supports, checked before any data is tokenized: ZeRO-1/2/3 in
    fp32 or bf16, optimizer offload to the CPU (every stage), parameter offload to the CPU
    (ZeRO-3), fp16 with DeepSpeed's loss scaling (ZeRO-1/2); ``ds_config.zero_support_error``
    names what it does not run."""
    from .ds_config import zero_support_error

    stage = zero_stage(cfg)
    if stage not in (1, 2, 3):
        raise DsConfigError(f"{source}: zero_optimization.stage is {stage}; tram_dist runs ZeRO stage 1, 2 "
                            "or 3 (without ZeRO, launch with torchrun for DDP)")
    problem = zero_support_error(cfg, source)
    if problem is not None:
        raise DsConfigError(problem)


def method_spec(args, method_kwargs: dict):
    """``(optimizer class or None, its hyperparameters, trust region, divergence)`` of
    ``args.method``, from ``build_method`` on a one-element probe parameter: the names, defaults
    and checks of the methods live in ``tram_dist.methods`` only."""
    kwargs, divergence = _split_method_kwargs(method_kwargs)
    probe, trust_region = build_method(args.method, [torch.nn.Parameter(torch.zeros(1))], lr=args.lr,
                                       betas=tuple(args.betas), weight_decay=args.weight_decay,
                                       sigma=args.sigma, **kwargs)
    if not isinstance(probe, PerturbedOptimizer):
        return None, {}, trust_region, divergence
    cls = type(probe)
    hyper = {k: probe.defaults[k] for k in cls.hyperparameters}
    hyper["on_nonfinite"] = probe.on_nonfinite
    return cls, hyper, trust_region, divergence


class DeepSpeedRun:
    """DeepSpeed ZeRO-1/2/3 with the TRAM ZeRO engine (``tram_dist.engines.deepspeed``).

    ``optimizer`` is the base torch optimizer that ZeRO steps (its ``param_groups`` are the ones
    every ZeRO step reads, also after a checkpoint load rebuilt them): the LR scheduler wraps it.
    ``step.optimizer`` is the TRAM wrapper (or, for the AdamW baseline, DeepSpeed's ZeRO
    optimizer), which checkpoints go through."""

    kind = "deepspeed"

    def __init__(self, module, d, args, method_kwargs: dict, ds_config: dict, spec=None, step_overrides=None):
        import deepspeed

        from .engines import deepspeed as tram_ds

        deepspeed.utils.logger.setLevel(logging.WARNING)
        check_ds_config(ds_config)
        config = dict(ds_config)
        config["gradient_clipping"] = 0.0  # TrainStep clips (--max-grad-norm); DeepSpeed must not clip again
        self.dist = d
        if spec is None:
            cls, hyper, self.trust_region, divergence = method_spec(args, method_kwargs)
        else:
            (cls, hyper, self.trust_region), divergence = spec, _split_method_kwargs(method_kwargs)[1]
        base = dict(lr=args.lr, betas=tuple(args.betas), eps=method_kwargs.get("eps", 1e-8),
                    weight_decay=args.weight_decay)
        if not any(hasattr(p, "ds_id") for p in module.parameters()):  # zero.Init places its own
            module = module.to(d.device)
        self.ds_engine, train_optimizer, self.engine = tram_ds.initialize(
            module, cls, config, base_optimizer=torch.optim.AdamW, **base, **hyper)
        self.module = self.ds_engine.module
        self.model = self.eval_model = self.ds_engine  # ZeRO-3 forwards are collective
        self.optimizer = self.ds_engine.optimizer.optimizer  # the base AdamW: what the schedule drives
        self.step = TrainStep(self.ds_engine, train_optimizer, trust_region=self.trust_region,
                              engine=self.engine, **_step_options(args, divergence, step_overrides))

    def save_checkpoint(self, path: Path, client_state: dict) -> None:
        from .checkpoint import save_checkpoint

        save_checkpoint(str(path), self.ds_engine, self.step.optimizer, tag="zero",
                        client_state=client_state)

    def load_checkpoint(self, path: Path) -> dict:
        from .checkpoint import load_checkpoint

        return load_checkpoint(str(path), self.ds_engine, self.step.optimizer, tag="zero")

    def full_state_dict(self) -> dict:
        """Full fp32 master weights (and persistent buffers); every rank calls, each parameter is
        gathered once (rank 0 keeps them on the CPU, the others drop them)."""
        from deepspeed.utils import safe_get_full_fp32_param

        state, seen = {}, {}
        for name, p in self.module.named_parameters(remove_duplicate=False):
            if id(p) in seen:
                if self.dist.main:
                    state[name] = state[seen[id(p)]]
                continue
            seen[id(p)] = name
            full = safe_get_full_fp32_param(p)
            if self.dist.main:
                state[name] = full.detach().to("cpu", torch.float32).clone()
            del full
        if self.dist.main:
            for name, b in _persistent_buffers(self.module).items():
                state.setdefault(name, b.detach().cpu().clone())
        return state

    def save_final(self, path: Path, tokenizer) -> None:
        state = self.full_state_dict()
        if self.dist.main:
            _write_pretrained(self.module, state, path, tokenizer)
        del state
        _barrier()


def parameters_finite(module, device) -> bool:
    """True when every rank's part of every parameter is finite (one all-reduce): checked
    before a checkpoint or an export is written, so neither ever holds NaN."""
    bad = 0
    with torch.no_grad():
        for p in module.parameters():
            local = getattr(p, "ds_tensor", None)  # ZeRO-3: this rank's partition
            if local is None:
                local = p.to_local() if hasattr(p, "to_local") else p  # FSDP2 DTensor: the shard
            if local.numel() and not bool(torch.isfinite(local).all()):
                bad = 1
                break
    if dist.is_available() and dist.is_initialized():
        flag = torch.tensor([float(bad)], device=device)
        dist.all_reduce(flag)
        bad = int(flag.item())
    return bad == 0


def build_run(kind: str, module, *, dist, args, method_kwargs: dict, ds_config: Optional[dict] = None,
              spec=None, step_overrides: Optional[dict] = None) -> Any:
    """The run for engine ``kind`` (``single``, ``ddp``, ``fsdp`` or ``deepspeed``). ``dist`` has
    ``rank``, ``world_size``, ``device`` and ``main``; ``args`` is a ``RunConfig`` (or anything
    with its method, lr, betas, weight_decay, sigma, bf16, max_grad_norm and seed fields).
    ``spec``: the method by its parts instead of by name (see ``_optimizer``);
    ``step_overrides``: ``TrainStep`` options over the config's."""
    extra = dict(spec=spec, step_overrides=step_overrides)
    if kind in ("single", "ddp"):
        return LocalRun(kind, module, dist, args, method_kwargs, **extra)
    if kind == "fsdp":
        return FSDP2Run(module, dist, args, method_kwargs, **extra)
    if kind == "deepspeed":
        if ds_config is None:
            raise RunError("the deepspeed engine needs a DeepSpeed config (deepspeed_config)")
        return DeepSpeedRun(module, dist, args, method_kwargs, ds_config, **extra)
    raise RunError(f"unknown engine {kind!r}; one of {', '.join(KINDS)}")


__all__ = ["LocalRun", "FSDP2Run", "DeepSpeedRun", "RunError", "build_run", "check_ds_config",
           "method_spec", "transformer_blocks", "KINDS"]
