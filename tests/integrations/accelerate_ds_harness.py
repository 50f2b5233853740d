"""TrainStep on what an Accelerator with ``DeepSpeedPlugin`` prepared (the ranks' work, importable
by spawned ranks): the base AdamW, the model, a DataLoader and a linear schedule go through
``accelerator.prepare``, ``tram_on_deepspeed`` wraps the partitioned base in the method.

On a host without GPUs accelerate does not set up DeepSpeed's ranks by itself (see
deepspeed_harness.py): each rank sets ``ACCELERATE_USE_DEEPSPEED=true`` and creates
``PartialState(backend="gloo")`` before the ``Accelerator``, which then uses that state.
"""
from __future__ import annotations

from typing import Dict

import torch

import deepspeed_harness as D
import trainer_harness as H

BATCH = 2  # per rank and step: the global batch is BATCH * world
# (method, ZeRO stage): test_accelerate_deepspeed.py checks them
JOBS = (("tram-theta-prev", 2), ("sam", 3), ("adamw", 2))


def ds_config(stage: int) -> dict:
    """What accelerate fills ("auto": batch sizes from the DataLoader and the world size; clipping
    from DeepSpeedPlugin(gradient_clipping=0.0): TrainStep clips)."""
    return {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": 1, "gradient_clipping": "auto", "zero_optimization": {"stage": stage}}


def groups(model):
    """Trainer's decay / no-decay split, as the single-process reference (H.reference) builds it."""
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(None, model))
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if n in decay], "weight_decay": H.WEIGHT_DECAY},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]


def run(method: str, stage: int):
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin
    from torch.utils.data import DataLoader

    from tram_dist import TrainStep
    from tram_dist.integrations.accelerate import tram_on_deepspeed

    D.configure_state()  # ACCELERATE_USE_DEEPSPEED=true, PartialState(backend="gloo")
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config(stage),
                                                               gradient_clipping=0.0))
    model = H.tiny_gpt2(H.SEED)
    base = torch.optim.AdamW(groups(model), lr=H.LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=H.WEIGHT_DECAY)
    loader = DataLoader(H.dataset(), batch_size=BATCH, collate_fn=H.collate)  # in order, dealt to the ranks
    # accelerate steps a prepared schedule once per process and step: count single-process batches
    total = len(loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(base, lambda s: max(0.0, float(total - s) / float(total)))
    lrs = []
    base.register_step_pre_hook(lambda o, a, k: lrs.append(o.param_groups[0]["lr"]))
    model, prepared, loader, schedule = accelerator.prepare(model, base, loader, schedule)
    opt, trust_region, engine = tram_on_deepspeed(model, prepared, method, **H.METHOD_KWARGS[method])
    step = TrainStep(model, opt, trust_region=trust_region, engine=engine, max_grad_norm=1.0, seed=H.SEED)
    rank = accelerator.process_index
    logs = []
    for batch in loader:  # len(H.dataset()) / (BATCH * world) steps
        batch["sample_index"] = torch.arange(BATCH) + rank * BATCH  # positions in the global batch
        logs.append(step([batch]).as_dict())
        schedule.step()
    from deepspeed.utils import safe_get_full_fp32_param  # ZeRO-2: the master gathered; ZeRO-3: the partitions

    params = {n: safe_get_full_fp32_param(p).detach().cpu().clone() for n, p in model.module.named_parameters()}
    ran = (type(model).__name__, type(prepared).__name__, type(engine).__name__, engine.stage, engine.world_size,
           type(opt).__name__, opt.base is model.optimizer.optimizer if hasattr(opt, "base") else None,
           float(model.gradient_clipping()))
    return {"params": params, "logs": logs, "lrs": lrs, "ran": ran}


def jobs(rank: int, world: int, todo) -> Dict:
    """Each job ``(method, stage)``: one pass over the prepared DataLoader, a TrainStep step per
    batch; returns the full parameters, the StepMetrics, the lrs the base optimizer stepped with
    and what ran."""
    out = {job: run(*job) for job in todo}
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    return out


def all_jobs(rank: int, world: int, trainer_jobs, out_dir: str, accelerate_jobs) -> Dict:
    """Every DeepSpeed job of tests/integrations in one launch (starting DeepSpeed on 2 ranks is
    most of the cost): TramTrainer's (deepspeed_harness.ds_jobs), then accelerate's (``jobs``)."""
    return {"trainer": D.ds_jobs(rank, world, trainer_jobs, out_dir),
            "accelerate": jobs(rank, world, accelerate_jobs)}
