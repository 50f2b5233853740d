"""Shared by the engine tests: a tiny GPT-2, global batches, engine builders, gloo spawning.

The distributed checks run in ranks started by ``spawn`` (``torch.multiprocessing``, forked
from a preloaded forkserver: tests/spawn_ranks.py), one process group per test module; the
functions they run live here so that the ranks can import them. Everything is CPU + gloo; GPUs are hidden.
"""
from __future__ import annotations

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # gloo must not move models to a GPU
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import contextlib  # noqa: E402
import logging  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable, Dict, List, Optional  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

VOCAB = 128
SEQ = 16
N_GLOBAL = 4          # samples per global batch
LR = 1e-3
SIGMA = 0.05          # input noise of TRAM-d_x / TRAM-Fisher
SEED = 7
BASE = dict(lr=LR, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)

ENGINES_FP32 = ("ddp", "fsdp2", "zero1", "zero2", "zero3")
ENGINES_BF16 = ("fsdp2-bf16", "zero1-bf16", "zero2-bf16", "zero3-bf16")
METHODS = ("adamw", "sam", "asam", "tram-x", "tram-theta-prev", "tram-theta0", "tram-fisher")
# Table 3's trust-region regularizers (MESA's decay is 0.9 here so 3 steps move its target)
REGULARIZER_METHODS = ("trpo", "r3f", "mesa", "asam+trpo", "asam+r3f", "asam+mesa")
# the authors' released ascent (TRAMReleased) at its default logit_scale 1: ||eps|| ~ 6e-3 here
RELEASED_METHODS = ("tram-released-x", "tram-released-theta-prev")


def dropout_step_one_divergence(rank: int, world: int, engines, methods) -> Dict:
    """d of the first step with dropout 0.1 in train mode (target_dropout "shared" and
    "independent"), per (engine, method): with shared masks the target forward draws the
    pass-1 forward's masks, so d_theta(t-1) (target = theta at step 1) is 0."""
    out = {}
    for engine in engines:
        for method in methods:
            for mode in ("shared", "independent"):
                torch.manual_seed(100 + rank)  # dropout streams differ per rank
                run = Run(engine, method, world, model_overrides=dict(resid_pdrop=0.1, embd_pdrop=0.1,
                                                                      attn_pdrop=0.1),
                          step_kwargs={"target_dropout": mode})
                m = run.step(run.micro_batches(0))
                out[(engine, method, mode)] = m.divergence if m.divergence is not None else m.penalty
    return out


# ------------------------------------------------------------------------------------------
# model and data
# ------------------------------------------------------------------------------------------
def tiny_gpt2(seed: int = 0, **overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=32, bos_token_id=0,
               eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg.update(overrides)
    model = GPT2LMHeadModel(GPT2Config(**cfg))
    model.train()  # dropout is 0: deterministic
    return model


def global_batch(step: int, n: int = N_GLOBAL, seq: int = SEQ) -> Dict[str, torch.Tensor]:
    """The global batch of ``step``; the last sample is partly padding (labels -100), so ranks
    hold different token counts."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(1, VOCAB, (n, seq), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    mask[-1, -5:] = 0
    labels[-1, -5:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "sample_index": torch.arange(step * n, step * n + n)}


def rank_micro_batches(batch, rank: int, world: int, accum: int = 1) -> List[Dict[str, torch.Tensor]]:
    n = batch["input_ids"].shape[0]
    per_rank = n // world
    local = {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in batch.items()}
    size = per_rank // accum
    return [{k: v[i * size:(i + 1) * size] for k, v in local.items()} for i in range(accum)]


# ------------------------------------------------------------------------------------------
# methods and engines
# ------------------------------------------------------------------------------------------
def method_spec(method: str):
    from tram_dist import ASAM, SAM, TRAM, EMAParams, NoisyInputs, PretrainedParams, PreviousParams, TRAMFisher
    from tram_dist.optim import Descent
    from tram_dist.regularizers import TrustRegionPenalty as Penalty

    penalties = {"trpo": lambda: Penalty(PreviousParams(), 0.1, name="trpo"),
                 "r3f": lambda: Penalty(NoisyInputs(SIGMA), 1.0, name="r3f"),
                 "mesa": lambda: Penalty(EMAParams(0.9), 0.1, name="mesa")}
    if method in RELEASED_METHODS:
        from tram_dist import TRAMReleased
        return (TRAMReleased, {"logit_scale": 1.0},
                (lambda: NoisyInputs(SIGMA)) if method == "tram-released-x" else PreviousParams)
    if method in REGULARIZER_METHODS:
        base, _, name = method.rpartition("+")
        return (ASAM, {"rho": 0.5, "eta": 0.01}, penalties[name]) if base else (Descent, {}, penalties[name])
    return {
        "adamw": (None, {}, None),
        "sam": (SAM, {"rho": 0.05}, None),
        "asam": (ASAM, {"rho": 0.5, "eta": 0.01}, None),
        "tram-x": (TRAM, {"nu": 1e-5}, lambda: NoisyInputs(SIGMA)),
        "tram-theta-prev": (TRAM, {"nu": 1e-5}, PreviousParams),
        "tram-theta0": (TRAM, {"nu": 1e-5}, PretrainedParams),
        "tram-fisher": (TRAMFisher, {"rho": 0.1, "eta": 0.1}, lambda: NoisyInputs(SIGMA)),
        "tram-ema": (TRAM, {"nu": 1e-5}, lambda: EMAParams(0.9)),
    }[method]


def deepspeed_logging_quiet() -> None:
    import deepspeed
    deepspeed.utils.logger.setLevel(logging.ERROR)


def zero_config(stage: int, bf16: bool, world: int, micro: int, accum: int = 1, **zero_overrides):
    zero = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True,
            "stage3_param_persistence_threshold": 0}
    zero.update(zero_overrides)
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
            "train_batch_size": micro * accum * world, "zero_optimization": zero,
            "bf16": {"enabled": bf16}, "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 unless told
            "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}


class Run:
    """One model + optimizer + TrainStep under one engine, built by the library's engine runs
    (``tram_dist.runs.build_run``, what ``tram_dist.Run`` uses) from a ``RunConfig``; the methods
    are given by their parts (``method_spec``) so that variants build_method lacks (TRAM-EMA)
    and the tests' own hyperparameters run through the same code. FSDP1 (CUDA only) is the
    one engine the library's runs do not build."""

    KIND = {"single": "single", "ddp": "ddp", "fsdp2": "fsdp", "fsdp2-bf16": "fsdp"}

    def __init__(self, engine: str, method: str, world: int, accum: int = 1, zero_overrides=None,
                 model_overrides=None, step_kwargs=None, on_nonfinite: str = "skip",
                 gradient_checkpointing: bool = False):
        from tram_dist import RunConfig
        from tram_dist.run.distributed import Dist
        from tram_dist.runs import build_run

        self.kind, self.method, self.world, self.accum = engine, method, world, accum
        cls, hp, tr = method_spec(method)
        model = tiny_gpt2(**(model_overrides or {}))
        if gradient_checkpointing:  # before any wrapping, as the library's Run does
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.inner = model
        hyper = {**hp, "on_nonfinite": on_nonfinite} if cls is not None else {}
        spec = (cls, hyper, tr() if tr else None)
        # "-bf16" engines: bf16 working weights (FSDP2 compute copies, ZeRO's bf16 partitions)
        # without autocast, so the bf16 error is the weights' alone, as the tolerances assume
        overrides = {"autocast_dtype": None, "seed": SEED, **(step_kwargs or {})}
        if engine == "fsdp1":  # CUDA only: FSDP1 refuses CPU
            from torch.distributed.fsdp import FullyShardedDataParallel
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy
            from transformers.models.gpt2.modeling_gpt2 import GPT2Block
            from tram_dist import TrainStep
            torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
            self.model = FullyShardedDataParallel(model.cuda(), use_orig_params=True,
                                                  auto_wrap_policy=ModuleWrapPolicy({GPT2Block}),
                                                  device_id=torch.cuda.current_device())
            self.inner = self.model
            opt = cls(self.model.parameters(), torch.optim.AdamW, **hyper, **BASE) if cls else \
                torch.optim.AdamW(self.model.parameters(), **BASE)
            self.optimizer = opt
            self.step = TrainStep(self.model, opt, trust_region=spec[2], **overrides)
            self.engine = self.step.engine
            return
        bf16 = engine.endswith("bf16")
        config = RunConfig(method=method, lr=LR,
                           betas=BASE["betas"], weight_decay=BASE["weight_decay"], sigma=SIGMA,
                           bf16=bf16, seed=SEED)
        rank = dist.get_rank() if dist.is_initialized() else 0
        ds_config = None
        if engine.startswith("zero"):
            deepspeed_logging_quiet()
            ds_config = zero_config(int(engine[4]), bf16, world, N_GLOBAL // world // accum, accum,
                                    **(zero_overrides or {}))
        kind = self.KIND.get(engine, "deepspeed")
        self.run = build_run(kind, model, dist=Dist(rank, world, rank), args=config, method_kwargs={},
                             ds_config=ds_config, spec=spec, step_overrides=overrides)
        self.model = self.run.model
        self.inner = self.run.module
        self.optimizer = self.run.step.optimizer
        self.step = self.run.step
        self.engine = self.step.engine

    def micro_batches(self, step: int):
        batch = global_batch(step)
        if self.kind == "single":
            return rank_micro_batches(batch, 0, 1, self.accum) if self.accum > 1 else [batch]
        mbs = rank_micro_batches(batch, dist.get_rank(), self.world, self.accum)
        if self.kind == "fsdp1":
            mbs = [{k: (v if k == "sample_index" else v.cuda()) for k, v in mb.items()} for mb in mbs]
        return mbs

    def train(self, steps: int, start: int = 0) -> List[Dict[str, Any]]:
        out = []
        for t in range(start, start + steps):
            m = self.step(self.micro_batches(t)).as_dict()
            m["loss"] = self._global_mean(m["loss"], m["tokens"])
            if m["perturbed_loss"] is not None:
                m["perturbed_loss"] = self._global_mean(m["perturbed_loss"], m["tokens"])
            out.append(m)
        return out

    def _global_mean(self, value: float, tokens: int) -> float:
        if self.kind == "single" or not dist.is_initialized():
            return value
        t = torch.tensor([value * tokens, float(tokens)], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t[0] / t[1])

    def full_params(self) -> Dict[str, torch.Tensor]:
        """Full fp32 (master) parameters by name; a collective under FSDP2 and ZeRO."""
        if self.kind in ("single", "ddp"):
            return {n: p.detach().float().clone() for n, p in self.inner.named_parameters()}
        if self.kind.startswith("fsdp2"):
            return {n: p.full_tensor().detach().float().clone() for n, p in self.inner.named_parameters()}
        if self.kind == "fsdp1":
            from torch.distributed.fsdp import FullyShardedDataParallel
            with FullyShardedDataParallel.summon_full_params(self.model, writeback=False):
                return {n.replace("_fsdp_wrapped_module.", ""): p.detach().float().cpu().clone()
                        for n, p in self.model.named_parameters()}
        from deepspeed.utils import safe_get_full_fp32_param
        return {n: safe_get_full_fp32_param(p).detach().float().clone()
                for n, p in self.model.module.named_parameters()}


# ------------------------------------------------------------------------------------------
# comparisons
# ------------------------------------------------------------------------------------------
def max_rel_diff(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    """max_i |a_i - b_i| / max_i |b_i| over every parameter (one number per run)."""
    num = max(float((a[k].double() - b[k].double()).abs().max()) for k in b)
    den = max(float(b[k].double().abs().max()) for k in b)
    return num / den


def displacement_rel_err(a, b, theta0) -> float:
    """||(a - theta0) - (b - theta0)|| / ||b - theta0|| over all parameters."""
    num = sum(float(((a[k] - b[k]).double() ** 2).sum()) for k in b) ** 0.5
    den = sum(float(((b[k] - theta0[k]).double() ** 2).sum()) for k in b) ** 0.5
    return num / den


def metric_rel_diff(ma: List[Dict], mb: List[Dict], key: str) -> Optional[float]:
    worst = None
    for x, y in zip(ma, mb):
        if x[key] is None and y[key] is None:
            continue
        d = abs(x[key] - y[key]) / max(abs(y[key]), 1e-30)
        worst = d if worst is None else max(worst, d)
    return worst


# ------------------------------------------------------------------------------------------
# spawning
# ------------------------------------------------------------------------------------------
def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, fn: Callable, args: tuple) -> Any:
    """A rank: the gloo (or nccl) process group, one intra-op thread, ``fn``'s result."""
    port, backend, args = args[0], args[1], args[2:]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import warnings
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    dist.init_process_group(backend, rank=rank, world_size=world)
    result = fn(rank, world, *args)  # an exception ends this rank; the others are stopped
    dist.barrier()
    dist.destroy_process_group()
    return result


def spawn(fn: Callable, world: int, *args, backend: str = "gloo", env: Optional[Dict[str, Optional[str]]] = None) -> Any:
    """Run ``fn(rank, world, *args)`` on ``world`` ranks (gloo unless told); returns rank 0's
    result. ``env`` is set in the ranks before anything is imported there (None: unset). The
    ranks start from a preloaded forkserver (tests/spawn_ranks.py)."""
    import spawn_ranks

    return spawn_ranks.spawn(_entry, fn, world, (free_port(), backend, *args), env=env)


# ------------------------------------------------------------------------------------------
# what the spawned ranks run
# ------------------------------------------------------------------------------------------
def run_jobs(rank: int, world: int, jobs, steps: int) -> Dict:
    """Train every ``(engine, method, accum)`` job for ``steps``; rank 0 returns, per job, the
    metrics (losses as global token means), the final full fp32 parameters and the time."""
    results = {}
    for job in jobs:
        engine, method, accum = job[:3]
        overrides = job[3] if len(job) > 3 else None  # ZeRO config overrides
        step_kwargs = job[4] if len(job) > 4 else None  # TrainStep options
        t0 = time.perf_counter()
        run = Run(engine, method, world, accum=accum, zero_overrides=overrides, step_kwargs=step_kwargs)
        metrics = run.train(steps)
        params = run.full_params()
        key = (engine, method, accum) if overrides is None else (engine, method, accum, tuple(sorted(overrides)))
        if step_kwargs:
            key = key + tuple(sorted(step_kwargs))
        results[key] = {"metrics": metrics, "params": params, "seconds": time.perf_counter() - t0}
        del run
    return results


def run_single(methods, steps: int, accum: int = 1, step_kwargs=None) -> Dict:
    """The single-process reference (no process group), in the calling process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machines are small and shared: no thread oversubscription
    try:
        results = {}
        for method in methods:
            run = Run("single", method, 1, accum=accum, step_kwargs=step_kwargs)
            results[("single", method)] = {"metrics": run.train(steps), "params": run.full_params()}
        return results
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------
# counting collectives
# ------------------------------------------------------------------------------------------
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "_all_gather_base",
               "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single", "_reduce_scatter_base",
               "all_reduce_coalesced", "broadcast", "reduce", "all_to_all", "all_to_all_single",
               "all_gather_object", "broadcast_object_list", "gather", "scatter")
# DTensor redistribution goes through the functional collectives
FUNCTIONAL_COLLECTIVES = ("all_reduce", "all_gather_tensor", "all_gather_tensor_autograd", "reduce_scatter_tensor",
                          "all_reduce_coalesced", "all_to_all_single", "broadcast")


class CollectiveCounter:
    """Counts torch.distributed collectives (also those DeepSpeed calls through function
    references it cached), attributed to the innermost active region."""

    def __init__(self):
        from collections import Counter, defaultdict
        self.counts = defaultdict(Counter)
        self.stack = ["other"]
        self.enabled = False
        for name in COLLECTIVES:
            orig = getattr(dist, name, None)
            if orig is not None:
                setattr(dist, name, self._wrap(name, orig))
        import torch.distributed._functional_collectives as funcol
        for name in FUNCTIONAL_COLLECTIVES:
            orig = getattr(funcol, name, None)
            if orig is not None:
                setattr(funcol, name, self._wrap("functional." + name, orig))
        try:
            import deepspeed.comm.comm as dscomm
            cdb = dscomm.cdb
            if cdb is not None:
                for attr, name in (("all_gather_function", "all_gather_into_tensor"),
                                   ("reduce_scatter_function", "reduce_scatter_tensor")):
                    fn = getattr(cdb, attr, None)
                    if fn is not None:
                        setattr(cdb, attr, self._wrap(name, fn))
        except ImportError:
            pass

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            if self.enabled:
                self.counts[self.stack[-1]][name] += 1
            return fn(*args, **kwargs)
        counted.__wrapped__ = fn
        return counted

    @contextlib.contextmanager
    def region(self, label):
        self.stack.append(label)
        try:
            yield
        finally:
            self.stack.pop()

    def wrap_method(self, obj, attr, label):
        original = getattr(obj, attr)

        def wrapped(*args, **kwargs):
            with self.region(label):
                return original(*args, **kwargs)
        setattr(obj, attr, wrapped)

    def reset(self):
        self.counts.clear()


def count_step_collectives(engine: str, method: str, world: int, counter: CollectiveCounter,
                           zero_overrides=None) -> Dict[str, Dict[str, int]]:
    """Collectives of the second TrainStep, by region: 'tram' (swap_in_target, first_step and
    second_step without the base step), 'base_step', 'other' (passes, token count)."""
    run = Run(engine, method, world, zero_overrides=zero_overrides)
    if run.step.perturbed:
        for attr in ("swap_in_target", "first_step", "second_step", "restore"):
            counter.wrap_method(run.optimizer, attr, "tram")
    counter.wrap_method(run.engine, "base_step", "base_step")
    run.step(run.micro_batches(0))
    counter.reset()
    counter.enabled = True
    try:
        run.step(run.micro_batches(1))
    finally:
        counter.enabled = False
    out = {k: dict(v) for k, v in counter.counts.items()}
    # undo the instance-level wraps (the run is dropped anyway)
    return out


def measure_memory(engine: str, method: str, world: int) -> Dict[str, Any]:
    from tram_dist.memory import expected_tram_bytes, tram_bytes

    run = Run(engine, method, world)
    run.step(run.micro_batches(0))
    run.step(run.micro_batches(1))
    mem = tram_bytes(run.optimizer)
    return {**mem.as_dict(), "expected": expected_tram_bytes(run.optimizer),
            "needs_backup": run.engine.needs_backup}


def working_and_master(run: "Run") -> Dict[str, torch.Tensor]:
    """This rank's working-precision slices and (where separate) masters, flattened."""
    groups = run.engine.slice_groups(with_grad_only=False)
    work = torch.cat([s.param.detach().float().reshape(-1) for g in groups for s in g.slices])
    master = torch.cat([s.theta.detach().float().reshape(-1) for g in groups for s in g.slices])
    return {"work": work.clone(), "master": master.clone()}


class _Boom(RuntimeError):
    pass


def restore_paths(engine: str, world: int) -> Dict[str, Any]:
    """(a) an exception in pass 2 leaves the working parameters exactly as before the step;
    (b) a skipped ascent (d = NaN) gives exactly the AdamW step."""
    out = {}
    # (a) exception between the passes
    run = Run(engine, "tram-theta-prev", world)
    run.step(run.micro_batches(0))
    before = working_and_master(run)
    calls = {"n": 0}

    def pre_hook(module, args, kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # pass 1, target forward, pass 2
            raise _Boom("failure in pass 2")

    handle = run.inner.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        run.step(run.micro_batches(1))
        out["raised"] = False
    except _Boom:
        out["raised"] = True
    handle.remove()
    after = working_and_master(run)
    out["exception_work_diff"] = float((after["work"] - before["work"]).abs().max())
    out["exception_master_diff"] = float((after["master"] - before["master"]).abs().max())
    out["phase"] = run.optimizer._phase
    # the run continues normally afterwards
    m = run.step(run.micro_batches(1))
    out["continues"] = not m.ascent_skipped
    del run

    # (b) skipped ascent: a NaN divergence
    def nan_divergence(target_logits, logits, mask):
        return torch.tensor(float("nan")), int(mask.sum())

    tram = Run(engine, "tram-theta-prev", world, step_kwargs={"divergence": nan_divergence})
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        metrics = tram.step(tram.micro_batches(0))
    out["skipped"] = metrics.ascent_skipped
    base = Run(engine, "adamw", world)
    base.step(base.micro_batches(0))
    a, b = tram.full_params(), base.full_params()
    out["skip_vs_adamw"] = max(float((a[k] - b[k]).abs().max()) for k in b)
    out["skip_work"] = working_and_master(tram)
    del tram, base

    # (c) non-finite pass-2 gradients: DeepSpeed skips its step (fp32 ZeRO-1/2, any ZeRO-3)
    # and returns before copying the master back; the engine restores the working params
    if engine.startswith("zero") and (engine.startswith("zero3") or not engine.endswith("bf16")):
        run = Run(engine, "sam", world)
        run.step(run.micro_batches(0))
        before = working_and_master(run)
        calls = {"n": 0}

        def nan_logits(module, args, output):
            calls["n"] += 1
            return output * float("nan") if calls["n"] == 2 else output  # pass 2

        handle = run.inner.lm_head.register_forward_hook(nan_logits)
        run.step(run.micro_batches(1))
        handle.remove()
        after = working_and_master(run)
        out["nan_overflow"] = bool(run.model.optimizer.overflow)
        out["nan_master_diff"] = float((after["master"] - before["master"]).abs().max())
        out["nan_work"] = after
    return out


def mechanics(rank: int, world: int, memory_jobs, count_jobs, restore_engines) -> Dict:
    results = {"memory": {}, "counts": {}, "restore": {}}
    per_rank = {}
    for engine, method in memory_jobs:
        per_rank[(engine, method)] = measure_memory(engine, method, world)
    # every rank's memory: gathered to rank 0
    gathered = [None] * world
    dist.all_gather_object(gathered, per_rank)
    results["memory"] = gathered
    if count_jobs:
        counter = CollectiveCounter()
        for engine, method, overrides in count_jobs:
            results["counts"][(engine, method, bool(overrides))] = count_step_collectives(
                engine, method, world, counter, zero_overrides=overrides)
    for engine in restore_engines:
        results["restore"][engine] = restore_paths(engine, world)
    return results


def checkpoint_resume(rank: int, world: int, jobs, directory: str) -> Dict:
    """Per job: 3 uninterrupted steps against 2 steps, save, a fresh run, load, 1 step."""
    from tram_dist.checkpoint import load_checkpoint, save_checkpoint

    out = {}
    for engine, method in jobs:
        full = Run(engine, method, world)
        full_metrics = full.train(3)
        full_params = full.full_params()
        del full
        first = Run(engine, method, world)
        first.train(2)
        path = os.path.join(directory, f"{engine}-{method}")
        save_checkpoint(path, first.model, first.optimizer, client_state={"data_step": 2})
        del first
        resumed = Run(engine, method, world)
        client = load_checkpoint(path, resumed.model, resumed.optimizer)
        resumed_metrics = resumed.train(1, start=int(client["data_step"]))
        params = resumed.full_params()
        out[(engine, method)] = {
            "max_abs_diff": max(float((params[k] - full_params[k]).abs().max()) for k in full_params),
            "metrics": (resumed_metrics[0], full_metrics[2]),
            "step_count": getattr(resumed.optimizer, "step_count", None),
            # an LR scheduler on the TRAM optimizer must still drive the base after a resume
            "groups_shared": (not hasattr(resumed.optimizer, "base")
                              or resumed.optimizer.param_groups is resumed.optimizer.base.param_groups),
        }
        del resumed
    return out


def checkpoint_save_after(rank: int, world: int, engine: str, method: str, path: str, steps: int) -> Dict:
    from tram_dist.checkpoint import save_checkpoint

    run = Run(engine, method, world)
    run.train(steps)
    save_checkpoint(path, run.model, run.optimizer, client_state={"data_step": steps})
    return {}


def checkpoint_load_and_train(rank: int, world: int, engine: str, method: str, path: str, steps: int) -> Dict:
    from tram_dist.checkpoint import load_checkpoint

    run = Run(engine, method, world)
    client = load_checkpoint(path, run.model, run.optimizer)
    metrics = run.train(steps, start=int(client["data_step"]))
    return {"metrics": metrics, "params": run.full_params(), "step_count": run.optimizer.step_count}
