"""Start the ranks of a multi-process test: ``fn(rank, world, *args)`` on ``world`` CPU
processes, rank 0's result returned.

The ranks are forked from one forkserver per test session that has imported torch,
transformers' GPT-2 and Trainer, accelerate, DeepSpeed (its ZeRO engine included) and tram_dist
once. A spawned rank imports them itself: ~10 s of CPU per rank, for every multi-process test
module (measured on the 2-core test machine), which is most of the suite's start-up cost. The
forkserver is a fresh interpreter that only imports (no thread, no process group, no CUDA
context; checked: one thread after the imports), so a rank forked from it starts clean, as a
spawned one does.

What spawn gives a rank and a forked rank would not, is given explicitly: the caller's
environment *now* (the forkserver keeps the one it started with) is installed before the work
is unpickled, and multiprocessing sends the caller's ``sys.path`` and working directory with
every rank (as it does under spawn). A caller that changes the ranks' environment (the FSDP1
tests hand GPUs back) gets spawned ranks, so that the change holds before any import.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from typing import Any, Callable, Dict, Optional

# Imported once in the forkserver; an import that fails there is skipped (the rank then
# imports the module itself). deepspeed.runtime.zero.muon is imported by DeepSpeed's optimizer
# check on the first deepspeed.initialize (it pulls in torch.compile's inductor: ~3 s).
PRELOAD = (
    "torch", "torch.distributed", "torch.distributed.fsdp", "torch.distributed.checkpoint",
    "transformers", "transformers.models.gpt2.modeling_gpt2", "transformers.trainer", "accelerate",
    "deepspeed", "deepspeed.runtime.engine", "deepspeed.runtime.zero.stage_1_and_2",
    "deepspeed.runtime.zero.stage3", "deepspeed.runtime.zero.muon.muon_optimizer",
    "tram_dist", "tram_dist.runs", "tram_dist.engines.deepspeed", "tram_dist.engines.fsdp2",
    "tram_dist.integrations.transformers",
)


def _context():
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    # takes effect when the forkserver starts, once per process: the first caller's list wins
    # (a module missing from it is imported by the child itself)
    ctx.set_forkserver_preload(list(PRELOAD))
    return ctx


def _rank(rank: int, world: int, environ: Dict[str, str], work: bytes, out: str) -> None:
    os.environ.clear()
    os.environ.update(environ)
    entry, fn, args = pickle.loads(work)  # after the environment: unpickling may import modules
    result = entry(rank, world, fn, args)
    if rank == 0:
        import torch

        torch.save(result, out)


def spawn(entry: Callable, fn: Callable, world: int, args: tuple, *,
          env: Optional[Dict[str, Optional[str]]] = None) -> Any:
    """``entry(rank, world, fn, args)`` on ``world`` ranks; returns what rank 0's entry returned.
    ``entry`` sets up the rank (process group) and calls ``fn``. ``env`` (None: unset) changes
    the ranks' environment; given, the ranks are spawned, so that it holds before any import."""
    import torch
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        work = pickle.dumps((entry, fn, args))
        environ = dict(os.environ)
        for key, value in (env or {}).items():
            if value is None:
                environ.pop(key, None)
            else:
                environ[key] = value
        if env is None:
            _context()
        mp.start_processes(_rank, args=(world, environ, work, out), nprocs=world, join=True,
                           start_method="forkserver" if env is None else "spawn")
        return torch.load(out, weights_only=False)
