"""What test_engines_offload.py's spawned ranks run (importable by the children): the engine
tests' tiny GPT-2 under DeepSpeed ZeRO with the optimizer (and ZeRO-3's parameters) offloaded to
the CPU, and under fp16 with DeepSpeed's loss scaler, built by ``tram_dist.runs.build_run`` as
``engines_harness.Run`` builds plain ZeRO (which takes no top-level config entries)."""
from __future__ import annotations

import time
from typing import Dict, Optional

import torch
import torch.distributed as dist

import engines_harness as H
from deepspeed_cpu import allow_fp16_on_cpu

# dynamic loss scaling from 2^8 (2^16, DeepSpeed's default, overflows this model's first gradients),
# halved on the first overflow (hysteresis 1) so a skipped step shows in the scale
FP16 = {"enabled": True, "loss_scale": 0, "initial_scale_power": 8, "loss_scale_window": 1000,
        "hysteresis": 1, "min_loss_scale": 1}
OFFLOAD_OPTIMIZER = {"offload_optimizer": {"device": "cpu", "pin_memory": False}}
OFFLOAD_PARAM = {"offload_param": {"device": "cpu", "pin_memory": False}}
OFFLOAD_BOTH = {"offload_optimizer": {"device": "cpu", "pin_memory": False},
                "offload_param": {"device": "cpu", "pin_memory": False}}


class ZeroRun(H.Run):
    """``engines_harness.Run`` for a ZeRO engine with ``zero_overrides`` in zero_optimization,
    ``top`` at the config's top level (fp16), or a whole resolved ``ds_config`` (a preset);
    ``stage_on_host`` sets ``ZeroEngine.stage_on_host`` while the engine is built."""

    def __init__(self, engine: str, method: str, world: int, *, zero_overrides: Optional[dict] = None,
                 top: Optional[dict] = None, ds_config: Optional[dict] = None,
                 stage_on_host: Optional[bool] = None, step_kwargs: Optional[dict] = None):
        from tram_dist import RunConfig
        from tram_dist.engines.deepspeed import ZeroEngine
        from tram_dist.run.distributed import Dist
        from tram_dist.runs import build_run

        self.kind, self.method, self.world, self.accum = engine, method, world, 1
        cls, hp, tr = H.method_spec(method)
        hyper = {**hp, "on_nonfinite": "skip"} if cls is not None else {}
        spec = (cls, hyper, tr() if tr else None)
        bf16 = engine.endswith("bf16")
        config = RunConfig(method=method, lr=H.LR, betas=H.BASE["betas"], weight_decay=H.BASE["weight_decay"],
                           sigma=H.SIGMA, bf16=bf16, seed=H.SEED)
        if ds_config is None:
            ds_config = H.zero_config(int(engine[4]), bf16, world, H.N_GLOBAL // world, 1, **(zero_overrides or {}))
            ds_config.update(top or {})
        H.deepspeed_logging_quiet()
        rank = dist.get_rank()
        previous, ZeroEngine.stage_on_host = ZeroEngine.stage_on_host, stage_on_host
        try:
            self.run = build_run("deepspeed", H.tiny_gpt2(), dist=Dist(rank, world, rank), args=config,
                                 method_kwargs={}, ds_config=ds_config, spec=spec,
                                 step_overrides={"autocast_dtype": None, "seed": H.SEED, **(step_kwargs or {})})
        finally:
            ZeroEngine.stage_on_host = previous
        self.model, self.inner = self.run.model, self.run.module
        self.optimizer, self.step = self.run.step.optimizer, self.run.step
        self.engine = self.step.engine


def _layout(run: ZeroRun) -> Dict:
    """Where this rank's TRAM slices live: the working slice, its master and its gradient."""
    engine = run.engine
    zo = engine.zero
    masters = zo.fp32_partitioned_groups_flat if engine.stage == 3 else zo.single_partition_of_fp32_groups
    return {"offload": engine.offload, "offload_param": engine.offload_param,
            "staged": engine._staging is not None, "master_device": str(masters[0].device),
            "master_grad_buffer": masters[0].grad is not None,
            "client_optimizer": type(zo.optimizer).__name__}


def offload_jobs(rank: int, world: int, jobs, steps: int) -> Dict:
    """Per ``(name, engine, method, zero_overrides, stage_on_host)``: metrics (losses as global
    token means), the full fp32 parameters, where the slices live, and the time."""
    out = {}
    for name, engine, method, overrides, staged in jobs:
        t0 = time.perf_counter()
        run = ZeroRun(engine, method, world, zero_overrides=overrides, stage_on_host=staged)
        layout = _layout(run)
        metrics = run.train(steps)
        out[(name, method)] = {"metrics": metrics, "params": run.full_params(), "layout": layout,
                               "seconds": time.perf_counter() - t0}
        del run
    return out


def preset_job(rank: int, world: int, path: str, method: str, steps: int) -> Dict:
    """A preset file through the launcher's path: ``resolve_ds_config`` (its "auto"s from the run),
    ``check_ds_config``, then the run; fp32 (--bf16 off)."""
    from tram_dist.ds_config import resolve_ds_config
    from tram_dist.runs import check_ds_config

    cfg = resolve_ds_config(path, global_batch_size=H.N_GLOBAL, micro_batch_size=H.N_GLOBAL // world,
                            grad_accum=1, world_size=world, lr=H.LR, betas=H.BASE["betas"],
                            weight_decay=H.BASE["weight_decay"], max_grad_norm=None, bf16=False,
                            hidden_size=32)
    check_ds_config(cfg, path)
    run = ZeroRun("zero3", method, world, ds_config=cfg)
    layout = _layout(run)
    metrics = run.train(steps)
    return {"metrics": metrics, "params": run.full_params(), "layout": layout}


# ------------------------------------------------------------------------------------------
# fp16 with DeepSpeed's loss scaler
# ------------------------------------------------------------------------------------------
def _poison_pass(run: ZeroRun, which: int):
    """Make the ``which``-th forward with gradient (1: pass 1, 2: pass 2) of the next step
    produce non-finite logits, so its gradients overflow; returns the hook handle."""
    calls = {"n": 0}

    def hook(module, args, output):
        if not torch.is_grad_enabled():
            return output  # a target forward (TRAM-d_theta, d_x)
        calls["n"] += 1
        return output * float("inf") if calls["n"] == which else output

    return run.inner.lm_head.register_forward_hook(hook)


def _state(run: ZeroRun) -> Dict[str, torch.Tensor]:
    """This rank's working and master slices, and the full working (fp16) parameters every
    forward reads (ZeRO-1/2 hold them whole on every rank)."""
    out = H.working_and_master(run)
    out["full_working"] = torch.cat([p.detach().reshape(-1).clone() for p in run.inner.parameters()])
    return out


def _bit_identical(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def fp16_overflow(rank: int, world: int, engine: str, method: str, which: int, overrides=None) -> Dict:
    """Step 0 normally, then step 1 with an overflow forced in pass ``which``, then step 1 again
    (the same batch) normally."""
    run = ZeroRun(engine, method, world, zero_overrides=overrides, top={"fp16": FP16})
    ds = run.model
    run.step(run.micro_batches(0))
    before, skipped_before, scale_before = _state(run), ds.skipped_steps, float(ds.optimizer.loss_scale)
    count_before = getattr(run.optimizer, "step_count", None)
    handle = _poison_pass(run, which)
    m = run.step(run.micro_batches(1))
    handle.remove()
    after = _state(run)
    out = {"step_skipped": m.step_skipped, "bit_identical": _bit_identical(before, after),
           "max_diff": max(float((after[k].float() - before[k].float()).abs().max()) for k in before),
           "skipped_steps": ds.skipped_steps - skipped_before,
           "scale": (scale_before, float(ds.optimizer.loss_scale)),
           "step_count": (count_before, getattr(run.optimizer, "step_count", None)),
           "phase": getattr(run.optimizer, "_phase", "idle"), "offload": run.engine.offload}
    m2 = run.step(run.micro_batches(1))
    later = _state(run)
    out["next_step_skipped"] = m2.step_skipped
    out["next_step_moved"] = not torch.equal(later["master"], before["master"])
    out["next_working_is_master"] = bool(torch.equal(later["work"], later["master"].half().float()))
    return out


def fp16_jobs(rank: int, world: int, runs, overflow_cases, steps: int) -> Dict:
    """``runs``: ``(name, engine, method, zero_overrides, step_kwargs, fp16)``, ``steps`` steps each;
    ``overflow_cases``: ``(engine, method, pass, zero_overrides)`` (``fp16_overflow``)."""
    allow_fp16_on_cpu()
    out = {"runs": {}, "overflow": {}}
    for name, engine, method, overrides, step_kwargs, fp16 in runs:
        t0 = time.perf_counter()
        run = ZeroRun(engine, method, world, zero_overrides=overrides, step_kwargs=step_kwargs,
                      top={"fp16": FP16} if fp16 else None)
        dtype = next(run.inner.parameters()).dtype
        metrics = run.train(steps)
        out["runs"][(name, method)] = {"metrics": metrics, "params": run.full_params(), "dtype": dtype,
                                       "fp16": run.engine.fp16, "offload": run.engine.offload,
                                       "loss_scale": run.engine.loss_scale, "skipped": run.model.skipped_steps,
                                       "seconds": time.perf_counter() - t0}
        del run
    for engine, method, which, overrides in overflow_cases:
        out["overflow"][(engine, method, which, bool(overrides))] = fp16_overflow(rank, world, engine, method, which,
                                                                                  overrides)
    return out


# ------------------------------------------------------------------------------------------
# skip_nonfinite: a NaN loss on one rank skips the step on every rank
# ------------------------------------------------------------------------------------------
def skip_nonfinite(rank: int, world: int, engine: str, method: str, overrides=None) -> Dict:
    """Step 0, then step 1 with a NaN loss in pass 2 on rank 0 only (``skip_nonfinite``), then
    step 2; against a run of steps 0 and 2 alone. The skipped step restores theta from the fp32
    master (no backup under ZeRO-1/2: DeepSpeed's step would have) and drops DeepSpeed's
    gradient buffers."""
    run = ZeroRun(engine, method, world, zero_overrides=overrides, step_kwargs={"skip_nonfinite": True})
    run.step(run.micro_batches(0))
    before = H.working_and_master(run)
    handle = _poison_pass(run, 2) if rank == 0 else None
    m = run.step(run.micro_batches(1))
    if handle is not None:
        handle.remove()
    out = {"step_skipped": m.step_skipped, "counted": run.step.skipped_steps,
           "restored": _bit_identical(before, H.working_and_master(run))}
    out["next_step_skipped"] = run.step(run.micro_batches(2)).step_skipped
    params = run.full_params()
    del run
    ref = ZeroRun(engine, method, world, zero_overrides=overrides)
    ref.step(ref.micro_batches(0))
    ref.step(ref.micro_batches(2))
    expected = ref.full_params()
    out["max_diff_to_run_without_the_step"] = max(float((params[k] - expected[k]).abs().max()) for k in expected)
    every_rank = [None] * world
    dist.all_gather_object(every_rank, out)
    return every_rank


def all_jobs(rank: int, world: int, offload, preset, fp16, steps: int, skip=()) -> Dict:
    """The test module's one spawn: the offload jobs, the preset job, the fp16 jobs, the
    skip_nonfinite jobs."""
    out = {"skip": {(engine, method, bool(overrides)): skip_nonfinite(rank, world, engine, method, overrides)
                    for engine, method, overrides in skip}}
    t0 = time.perf_counter()
    out["offload"] = offload_jobs(rank, world, offload, steps)
    out["offload_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out["preset"] = preset_job(rank, world, *preset, steps) if preset else None
    out["preset_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out["fp16"] = fp16_jobs(rank, world, *fp16, steps) if fp16 else None
    out["fp16_seconds"] = time.perf_counter() - t0
    return out
