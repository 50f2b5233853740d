"""Shared by the TramTrainer tests: a tiny GPT-2, an in-memory dataset, TrainingArguments,
the single-process TrainStep reference, and the DDP ranks' work (importable by spawned ranks).

The reference builds what TramTrainer builds from TrainingArguments by hand: the same two
param groups (Trainer's decay / no-decay split), ``build_method`` with the same lr, betas,
eps and weight decay, a LambdaLR equal to Trainer's linear schedule without warmup, and a
``TrainStep`` fed the dataset in order (Trainer with ``train_sampling_strategy="sequential"``).
"""
from __future__ import annotations

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import contextlib  # noqa: E402
import functools  # noqa: E402
import socket  # noqa: E402
from typing import Any, Dict, List, Optional  # noqa: E402

import torch  # noqa: E402

VOCAB = 128
SEQ = 16
N_SAMPLES = 16
LR = 1e-3
WEIGHT_DECAY = 0.01
SEED = 0
# nu sizes TRAM's ascent: ||eps|| ~ 6e-3 here, so an ascent left applied or skipped shows
METHOD_KWARGS = {"tram-theta-prev": {"nu": 1e-2}, "tram-x": {"nu": 1e-2, "sigma": 0.05},
                 "sam": {"rho": 0.05}, "adamw": {}}


def tiny_gpt2(seed: int = 0, dropout: float = 0.0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=32,
                                       bos_token_id=0, eos_token_id=0, resid_pdrop=dropout,
                                       embd_pdrop=dropout, attn_pdrop=dropout))
    return model.train()


def dataset(n: int = N_SAMPLES) -> List[Dict[str, torch.Tensor]]:
    """Every third sample ends in 5 padded positions (labels -100), so micro-batches and ranks
    hold different token counts and the token weighting matters."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    out = []
    for i in range(n):
        labels, mask = ids[i].clone(), torch.ones_like(ids[i])
        if i % 3 == 2:
            labels[-5:] = -100
            mask[-5:] = 0
        out.append({"input_ids": ids[i], "attention_mask": mask, "labels": labels})
    return out


def training_args(out_dir: str, *, batch: int, steps: int, accum: int = 1, max_grad_norm: float = 1.0,
                  **overrides):
    from transformers import TrainingArguments

    kw = dict(output_dir=out_dir, per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
              max_steps=steps, learning_rate=LR, weight_decay=WEIGHT_DECAY, lr_scheduler_type="linear",
              warmup_steps=0, max_grad_norm=max_grad_norm, logging_steps=1, save_strategy="no",
              report_to="none", use_cpu=True, train_sampling_strategy="sequential", disable_tqdm=True,
              dataloader_num_workers=0, seed=SEED)
    kw.update(overrides)
    return TrainingArguments(**kw)


def expected_lr(step: int, steps: int) -> float:
    """Trainer's linear schedule without warmup at optimizer step ``step`` (0-based)."""
    return LR * max(0.0, float(steps - step) / float(max(1, steps)))


class Recorder:
    """A TrainerCallback recording every log, and, through a step pre-hook on the base
    optimizer, the lr and the gradient norm of every base step: what was actually used."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Recorder(TrainerCallback):
            def __init__(self):
                self.logs: List[Dict[str, float]] = []
                self.lrs: List[float] = []
                self.norms: List[float] = []

            def on_train_begin(self, args, state, control, optimizer=None, **kw):
                base = getattr(optimizer.optimizer.optimizer, "base", optimizer.optimizer.optimizer)
                base.register_step_pre_hook(lambda opt, a, k: self._record(opt))

            def _record(self, opt):
                self.lrs.append(opt.param_groups[0]["lr"])
                self.norms.append(grad_norm(opt))

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    self.logs.append(dict(logs))

        return _Recorder()


def grad_norm(opt) -> float:
    grads = [p.grad.detach().double().reshape(-1) for g in opt.param_groups for p in g["params"]
             if p.grad is not None]
    return float(torch.cat(grads).norm()) if grads else 0.0


def collate(samples):
    from torch.utils.data import default_collate

    return default_collate(samples)


def reference(method: str, *, batch: int, steps: int, accum: int = 1, max_grad_norm: Optional[float] = 1.0,
              dropout: float = 0.0, method_kwargs=None) -> Dict[str, Any]:
    """The single-process TrainStep loop: optimizer step s takes samples [s*batch*accum, ...)
    as ``accum`` micro-batches of ``batch``; returns the parameters, the StepMetrics per step
    (as dicts) and, per base step, the lr and the gradient norm it stepped with."""
    from transformers import Trainer

    from tram_dist import TrainStep, build_method

    model = tiny_gpt2(SEED, dropout)
    torch.manual_seed(SEED)  # what Trainer's set_seed leaves for the dropout masks
    decay = set(Trainer.get_decay_parameter_names(None, model))  # Trainer's split (self unused)
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if n in decay], "weight_decay": WEIGHT_DECAY},
              {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
    kwargs = dict(METHOD_KWARGS[method] if method_kwargs is None else method_kwargs)
    step_kw = {k: kwargs.pop(k) for k in ("divergence_fraction", "target_dropout") if k in kwargs}
    opt, trust_region = build_method(method, groups, lr=LR, betas=(0.9, 0.999), eps=1e-8,
                                     weight_decay=WEIGHT_DECAY, **kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, float(steps - s) / float(max(1, steps))))
    base = getattr(opt, "base", opt)
    lrs, norms = [], []

    def record(o, args, kwargs):  # a step pre-hook (returns None: the step's arguments stay)
        lrs.append(o.param_groups[0]["lr"])
        norms.append(grad_norm(o))

    base.register_step_pre_hook(record)
    step = TrainStep(model, opt, trust_region=trust_region, max_grad_norm=max_grad_norm, seed=SEED, **step_kw)
    data = dataset()
    metrics = []
    for s in range(steps):
        first = s * batch * accum
        mbs = [collate(data[first + i * batch:first + (i + 1) * batch]) for i in range(accum)]
        for i, mb in enumerate(mbs):  # positions in the step's global batch, as TramTrainer numbers them
            mb["sample_index"] = torch.arange(batch) + i * batch
        metrics.append(step(mbs).as_dict())
        sched.step()
    return {"params": params_of(model), "metrics": metrics, "lrs": lrs, "norms": norms}


# the same reference for several tests (the DeepSpeed ones of TramTrainer and accelerate): compute it once
cached_reference = functools.lru_cache(maxsize=None)(reference)


def params_of(model) -> Dict[str, torch.Tensor]:
    inner = getattr(model, "module", model)
    return {n: p.detach().clone() for n, p in inner.named_parameters()}


def max_rel_diff(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    """max |a - b| over the whole model relative to max |b| (the engines tests' measure)."""
    diff = max(float((a[k] - b[k]).abs().max()) for k in b)
    return diff / max(float(v.abs().max()) for v in b.values())


def train(method: str, out_dir: str, *, batch: int, steps: int, accum: int = 1, max_grad_norm: float = 1.0,
          dropout: float = 0.0, resume: Optional[str] = None, callbacks=(), method_kwargs=None, **overrides):
    """A TramTrainer run on ``dataset()``; returns (trainer, recorder)."""
    from tram_dist.integrations.transformers import TramTrainer

    rec = Recorder()
    args = training_args(out_dir, batch=batch, steps=steps, accum=accum, max_grad_norm=max_grad_norm, **overrides)
    trainer = TramTrainer(model=tiny_gpt2(SEED, dropout), args=args, train_dataset=dataset(), method=method,
                          method_kwargs=METHOD_KWARGS[method] if method_kwargs is None else method_kwargs,
                          callbacks=[rec, *callbacks])
    trainer.train(resume_from_checkpoint=resume)
    return trainer, rec


# ------------------------------------------------------------------------------------------
# DDP: ranks spawned with torch.multiprocessing; accelerate (through TrainingArguments) sets
# up the gloo process group from the torchrun-style environment, as under torchrun.
# ------------------------------------------------------------------------------------------
def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, fn, args: tuple):
    import warnings

    port, args = args[0], args[1:]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    result = fn(rank, world, *args)
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return result


def spawn(fn, world: int, *args) -> Any:
    """Run ``fn(rank, world, *args)`` on ``world`` CPU ranks; returns rank 0's result. The ranks
    start from a preloaded forkserver (tests/spawn_ranks.py)."""
    import spawn_ranks

    return spawn_ranks.spawn(_entry, fn, world, (free_port(), *args))


def ddp_jobs(rank: int, world: int, jobs, out_dir: str) -> Dict:
    """Each job ``(method, batch, accum, steps, save_at)``: a TramTrainer run per rank; with
    ``save_at`` also a resume from that checkpoint. Returns, per job, rank 0's parameters, its
    logs and lrs, whether the ranks' parameters agree bit for bit, and the resumed parameters."""
    import torch.distributed as dist

    results = {}
    for job in jobs:
        method, batch, accum, steps, save_at = job
        folder = os.path.join(out_dir, f"{method}-{batch}-{accum}")
        save = dict(save_strategy="steps", save_steps=save_at) if save_at else {}
        trainer, rec = train(method, folder, batch=batch, steps=steps, accum=accum, ddp_backend="gloo", **save)
        assert dist.is_initialized() and dist.get_world_size() == world, "not a DDP run"
        assert type(trainer.model_wrapped).__name__ == "DistributedDataParallel", type(trainer.model_wrapped)
        params = params_of(trainer.model)
        res = {"params": params, "logs": rec.logs, "lrs": rec.lrs, "norms": rec.norms,
               "ranks_agree": ranks_agree(params)}
        if save_at:
            resumed, _ = train(method, folder, batch=batch, steps=steps, accum=accum, ddp_backend="gloo",
                               resume=os.path.join(folder, f"checkpoint-{save_at}"), **save)
            res["resumed"] = params_of(resumed.model)
        results[job] = res
    return results


def ranks_agree(params: Dict[str, torch.Tensor]) -> bool:
    import torch.distributed as dist

    flat = torch.cat([p.reshape(-1) for p in params.values()])
    lo, hi = flat.clone(), flat.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))
