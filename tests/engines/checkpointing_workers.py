"""What the ranks of test_engines_checkpointing.py run (importable by spawned children), and
the single-process measurements of the bytes activation checkpointing saves.

Every comparison here builds its models with ``use_cache=False``: a Hugging Face causal LM in
train mode without checkpointing otherwise builds a KV cache (``config.use_cache`` is True by
default) whose ``torch.cat`` makes contiguous copies of the keys and values; the attention
matmuls then read another memory layout and round differently in the last bit. Checkpointing
forces ``use_cache=False`` inside every checkpointed block, so with the cache off on both sides
the comparison isolates the recomputation itself (test_engines_checkpointing.py shows both).
"""
from __future__ import annotations

import time
from typing import Dict, Iterable, Tuple

import torch

import engines_harness as H

NO_CACHE = {"use_cache": False}
DROPOUT = {"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}


def _kl_of(m) -> float:
    """d (TRAM) or the penalty's KL (TRPO / R3F / MESA) of a step's metrics."""
    return m.divergence if m.divergence is not None else m.penalty


def with_and_without(rank: int, world: int, jobs: Iterable[Tuple[str, str]], steps: int,
                     dropout_engines: Iterable[str], dropout_methods: Iterable[str]) -> Dict:
    """Per job ``(engine, method)`` or ``(engine, method, "dropout")`` (dropout 0.1, shared
    masks): ``steps`` steps with and without activation checkpointing (metrics as global token
    means, final full fp32 parameters), keyed ``(*job, checkpointing)``; and per dropout engine and
    method, the step-1 d / penalty with dropout 0.1 under checkpointing, shared masks (and
    independent ones for TRAM-d_theta(t-1), to show the dropout is live)."""
    runs = {}
    for job in jobs:
        engine, method = job[:2]
        dropout_on = len(job) > 2 and job[2] == "dropout"
        overrides = {**DROPOUT, **NO_CACHE} if dropout_on else NO_CACHE
        for gc in (False, True):
            t0 = time.perf_counter()
            torch.manual_seed(100 + rank)  # the dropout stream (per rank), the same both times
            run = H.Run(engine, method, world, model_overrides=overrides, gradient_checkpointing=gc)
            metrics = run.train(steps)
            runs[(*job, gc)] = {"metrics": metrics, "params": run.full_params(),
                                "seconds": time.perf_counter() - t0}
            del run
    dropout = {}
    for engine in dropout_engines:
        for method in dropout_methods:
            modes = ("shared", "independent") if method == "tram-theta-prev" else ("shared",)
            for mode in modes:
                torch.manual_seed(100 + rank)  # dropout streams differ per rank
                run = H.Run(engine, method, world, model_overrides={**DROPOUT, **NO_CACHE},
                            step_kwargs={"target_dropout": mode}, gradient_checkpointing=True)
                checkpointed = all(b.gradient_checkpointing for b in run.inner.transformer.h)
                m = run.step(run.micro_batches(0))
                dropout[(engine, method, mode)] = {"kl": _kl_of(m), "checkpointed": checkpointed}
                if mode == "shared" and method == "tram-theta-prev":
                    dropout[(engine, "modes")] = _train_and_eval_modes(run)
                del run
    return {"runs": runs, "dropout": dropout}


def _train_and_eval_modes(run) -> Dict:
    """Issue 8 under an engine: evaluation runs in eval mode (dropout 0.1 off: two evaluations
    agree bit for bit) and hands the model back in train mode; a step given a model in eval
    mode puts it in train mode."""
    from tram_dist.evaluate import evaluate_loss

    model = run.run.eval_model  # what the library's Run evaluates: DDP's module, FSDP2, ds_engine
    batches = [{k: v for k, v in mb.items() if k != "sample_index"} for mb in run.micro_batches(5)]
    first, second = evaluate_loss(model, batches), evaluate_loss(model, batches)
    back_in_train = run.inner.training
    run.inner.eval()  # arrives in eval mode, as a from_pretrained model does
    m = run.step(run.micro_batches(1))
    return {"eval_equal": first.loss_sum == second.loss_sum, "back_in_train": back_in_train,
            "trained_in_train": run.inner.training, "step_loss": m.loss}


# ------------------------------------------------------------------------------------------
# single process: every method of tram_dist.methods, and the activation bytes
# ------------------------------------------------------------------------------------------
def single_method_run(method: str, gc: bool, steps: int, model_overrides: Dict) -> Dict:
    """``steps`` steps of ``build_method(method)`` on the tiny GPT-2 in this process (σ = 0.05
    so the input noise is not lost in rounding, MESA's decay 0.9 so its EMA moves)."""
    from tram_dist import TrainStep
    from tram_dist.methods import build_method

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = H.tiny_gpt2(**model_overrides)
        if gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        opt, tr = build_method(method, model, lr=H.LR, betas=(0.9, 0.99), sigma=H.SIGMA,
                               decay=0.9)
        step = TrainStep(model, opt, trust_region=tr, seed=H.SEED)
        torch.manual_seed(123)  # the dropout stream
        metrics = [step(H.global_batch(t)).as_dict() for t in range(steps)]
        return {"metrics": metrics, "params": {n: p.detach().clone() for n, p in model.named_parameters()}}
    finally:
        torch.set_num_threads(threads)


class LiveBytes:
    """Bytes of the tensors alive in this process that were created inside the ``with``
    block (a ``TorchDispatchMode``: every aten op's outputs, each storage counted once until it
    is freed), and their peak. Ops run by autograd in backward, the recomputation of
    checkpointed blocks included, pass through the mode too. CPU has no allocator statistics
    (torch.cuda.max_memory_allocated's counterpart) and the profiler's CPU memory events are
    incomplete in this torch; this counts what the tensors hold, not the allocator's slack."""

    def __init__(self):
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        outer = self
        self.live: Dict[int, tuple] = {}
        self.current = self.peak = 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for key in [k for k, (ref, _) in outer.live.items() if ref.expired()]:
                    outer.current -= outer.live.pop(key)[1]
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                        storage = t.untyped_storage()
                        key = storage.data_ptr()
                        if key and key not in outer.live:
                            outer.live[key] = (StorageWeakRef(storage), storage.nbytes())
                            outer.current += storage.nbytes()
                outer.peak = max(outer.peak, outer.current)
                return out

        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def activation_memory(config: Dict, batch: int, seq: int, gc: bool) -> Dict[str, int]:
    """One forward + backward of a GPT-2 built from ``config`` (train mode, fp32, use_cache off,
    gradients set to None before, as TrainStep leaves them) in this process: the bytes alive at
    the end of the forward (the activations kept for backward, the logits and the loss's
    intermediates) and the peak over forward + backward (which also holds the gradients)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(**config, use_cache=False))
        model.train()
        if gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1, config["vocab_size"], (batch, seq), generator=g)
        with LiveBytes() as mem:
            out = model(input_ids=ids, labels=ids)
            after_forward = mem.current
            out.loss.backward()
        grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
        return {"after_forward": after_forward, "peak": mem.peak, "grads": grads,
                "params": sum(p.numel() * p.element_size() for p in model.parameters())}
    finally:
        torch.set_num_threads(threads)
