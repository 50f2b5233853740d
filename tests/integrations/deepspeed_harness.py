"""TramTrainer under Trainer's DeepSpeed option: the ranks' work (importable by spawned ranks).

On a CPU host accelerate does not set up DeepSpeed's process group by itself: with
``use_cpu=False`` and no GPU, ``PartialState`` finds no backend and declares one process (so
transformers would fill ``train_batch_size: "auto"`` for a world of 1 and the ranks would read
the same batches). A GPU host needs none of this. Here each rank configures the state the way
``accelerate launch --use_deepspeed`` would: ``ACCELERATE_USE_DEEPSPEED=true`` and
``PartialState(backend="gloo")`` (DeepSpeed's comm over gloo, ``DS_ACCELERATOR=cpu``), and
``TrainingArguments(accelerator_config={"use_configured_state": True}, use_cpu=False)`` uses it.
"""
from __future__ import annotations

import os
from typing import Dict

import torch

import trainer_harness as H

STEPS = 4
# (method, ZeRO stage, per-device batch, accumulation, steps, save_at, skip_nonfinite): global batch 4 each;
# test_tram_trainer_deepspeed.py checks them
JOBS = (("tram-theta-prev", 2, 2, 1, STEPS, 2, False), ("sam", 3, 2, 1, STEPS, None, False),
        ("tram-theta-prev", 3, 1, 2, STEPS, None, True))


def ds_config(stage: int) -> dict:
    """A configs/zero*.json-style config: what the run determines says "auto"."""
    return {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
            "zero_optimization": {"stage": stage}}


def configure_state() -> None:
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    AcceleratorState._reset_state(reset_partial_state=False)  # the previous job's DeepSpeed plugin
    state = PartialState(backend="gloo")
    assert state.num_processes == int(os.environ["WORLD_SIZE"]), state


def full_params(trainer) -> Dict[str, torch.Tensor]:
    """Every parameter's full fp32 value (ZeRO-2: the master partitions gathered; ZeRO-3: the
    partitioned parameters gathered); collective: every rank calls."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).detach().cpu().clone() for n, p in trainer.model.named_parameters()}


def train_ds(method: str, out_dir: str, *, stage: int, batch: int, steps: int, accum: int = 1, resume=None,
             method_kwargs=None, **overrides):
    from tram_dist.integrations.transformers import TramTrainer

    configure_state()
    rec = H.Recorder()
    args = H.training_args(out_dir, batch=batch, steps=steps, accum=accum, use_cpu=False, deepspeed=ds_config(stage),
                           accelerator_config={"use_configured_state": True}, **overrides)
    trainer = TramTrainer(model=H.tiny_gpt2(H.SEED), args=args, train_dataset=H.dataset(), method=method,
                          method_kwargs=H.METHOD_KWARGS[method] if method_kwargs is None else method_kwargs,
                          callbacks=[rec])
    trainer.train(resume_from_checkpoint=resume)
    return trainer, rec


def ds_jobs(rank: int, world: int, jobs, out_dir: str) -> Dict:
    """Each job ``(method, stage, batch, accum, steps, save_at, skip_nonfinite)``: a TramTrainer run
    under ZeRO ``stage``; with ``save_at`` also a resume from that checkpoint. Returns, per job, the full
    parameters, the logs, the lrs the base optimizer stepped with, what ran, and the resumed
    parameters and logs."""
    from tram_dist.engines.deepspeed import ZeroEngine

    results = {"refused": refusals(out_dir)}
    for job in jobs:
        method, stage, batch, accum, steps, save_at, skip = job
        folder = os.path.join(out_dir, f"{method}-{stage}")
        save = dict(save_strategy="steps", save_steps=save_at) if save_at else {}
        if skip:
            save["method_kwargs"] = {**H.METHOD_KWARGS[method], "skip_nonfinite": True}
        trainer, rec = train_ds(method, folder, stage=stage, batch=batch, accum=accum, steps=steps, **save)
        engine = trainer.train_step.engine
        res = {"params": full_params(trainer), "logs": rec.logs, "lrs": rec.lrs,
               "ran": (type(trainer.model_wrapped).__name__, type(engine).__name__,
                       isinstance(engine, ZeroEngine) and engine.stage, engine.world_size,
                       trainer.train_step.skip_nonfinite,
                       type(trainer.tram_optimizer).__name__,
                       float(trainer.accelerator.state.deepspeed_plugin.deepspeed_config["gradient_clipping"]))}
        if save_at:
            ckpt = os.path.join(folder, f"checkpoint-{save_at}")
            res["tram_files"] = sorted(f for f in os.listdir(ckpt) if f.startswith("tram_rank"))
            resumed, rec2 = train_ds(method, folder + "-resumed", stage=stage, batch=batch, accum=accum, steps=steps,
                                     resume=ckpt, **save)
            res["resumed"] = full_params(resumed)
            res["resumed_logs"] = rec2.logs
            res["resumed_step_count"] = getattr(resumed.tram_optimizer, "step_count", None)
        results[job] = res
    return results


def refusals(out_dir: str) -> Dict[str, str]:
    """The DeepSpeed setups TramTrainer refuses at construction, with their messages."""
    from tram_dist.integrations.transformers import TramTrainer

    out = {}
    bad = {"optimizer": {**ds_config(2), "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}},
           "stage0": ds_config(0),
           "nvme": {**ds_config(3), "zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}}
    for name, cfg in bad.items():
        configure_state()
        args = H.training_args(os.path.join(out_dir, name), batch=2, steps=1, use_cpu=False, deepspeed=cfg,
                               accelerator_config={"use_configured_state": True})
        try:
            TramTrainer(model=H.tiny_gpt2(), args=args, train_dataset=H.dataset(), method="sam")
            out[name] = "accepted"
        except (ValueError, NotImplementedError) as e:
            out[name] = f"{type(e).__name__}: {e}"
    # without the configured state (as transformers sets it up by itself): accelerate counts one process
    from accelerate.state import AcceleratorState

    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    args = H.training_args(os.path.join(out_dir, "unconfigured"), batch=2, steps=1, use_cpu=False,
                           deepspeed=ds_config(2))
    try:
        TramTrainer(model=H.tiny_gpt2(), args=args, train_dataset=H.dataset(), method="sam")
        out["unconfigured"] = "accepted"
    except RuntimeError as e:
        out["unconfigured"] = f"{type(e).__name__}: {e}"
    AcceleratorState._reset_state(reset_partial_state=True)
    return out
