"""Start one launcher run as a process: ``start_launcher(cmd, log, env)``, used by
``tram_dist.compare.run_all`` to run many short runs.

``cmd`` is ``[python, launcher.py, *flags]``, the command a user would type, and is what the
run's log records. On a machine without CUDA the process is forked from one forkserver that has
imported torch, transformers' GPT-2 and tokenizer and tram_dist once: a fresh interpreter spends
~12 s of a 30 s tiny CPU run importing them (measured: launcher under ``-X importtime`` and
cProfile), which dominates a comparison of dozens of such runs. The forkserver is a fresh
interpreter that only imports, so a process forked from it starts as clean as a new one: it
gets the run's environment, argv and working directory, writes stdout and stderr to the log,
and runs the launcher file as ``__main__``. With CUDA visible, runs are fresh interpreters
(``subprocess``): a forkserver must not touch CUDA before it forks, some imports query it, and
the import time of a GPU run does not matter.
"""
from __future__ import annotations

import contextlib
import os
import runpy
import subprocess
import sys
import types
from typing import IO, Mapping, Optional, Sequence

# Imported once in the forkserver (an import that fails there is skipped; the run imports it
# itself). torch._dynamo: torch.optim imports it on the first param group (~2 s).
PRELOAD = (
    "torch", "torch._dynamo", "transformers", "transformers.modeling_utils",
    "transformers.models.gpt2.modeling_gpt2", "transformers.models.gpt2.tokenization_gpt2",
    "tokenizers", "safetensors.torch", "yaml", "tqdm",
    "tram_dist", "tram_dist.run", "tram_dist.run.run", "tram_dist.runs", "tram_dist.kernels",
    "tram_dist.data", "tram_dist.evaluate", "tram_dist.checkpoint",
)
STARTS = ("auto", "forkserver", "subprocess")


def default_start() -> str:
    """"forkserver" on a machine without CUDA, "subprocess" otherwise."""
    import torch

    return "subprocess" if torch.cuda.is_available() else "forkserver"


def _run_launcher(argv: Sequence[str], log_path: str, environ: Mapping[str, str]) -> None:
    """The forked process: the run's environment, its log as stdout and stderr, the launcher
    as __main__ (its SystemExit code is the process's exit code)."""
    os.environ.clear()
    os.environ.update(environ)
    threads = environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit() and int(threads) > 0:
        import torch  # OpenMP read the forkserver's environment when torch was loaded there

        torch.set_num_threads(int(threads))
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.argv = list(argv)
    try:
        runpy.run_path(argv[0], run_name="__main__")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


@contextlib.contextmanager
def _main_not_rerun():
    """multiprocessing re-runs the caller's ``__main__`` in every forkserver child (as under
    spawn), which would re-run a user's script or fail in one without a ``__main__`` guard. The
    child needs nothing from it (its target lives here), so it is shown a main module without a
    file while the process starts."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


class ForkedRun:
    """The ``subprocess.Popen`` calls ``run_all`` uses, over a process forked from the
    forkserver."""

    def __init__(self, process):
        self._process = process

    def poll(self) -> Optional[int]:
        return self._process.exitcode

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired("launcher", timeout)
        return self._process.exitcode

    def terminate(self) -> None:
        self._process.terminate()

    def kill(self) -> None:
        self._process.kill()


def start_launcher(cmd: Sequence[str], log: IO, env: Mapping[str, str], start: str = "auto"):
    """Start ``cmd`` (``[python, launcher.py, *flags]``) with ``env``, stdout and stderr
    appended to the open file ``log``; returns an object with Popen's poll, wait, terminate
    and kill."""
    if start not in STARTS:
        raise ValueError(f"start must be one of {', '.join(STARTS)}, got {start!r}")
    if start == "auto":
        start = default_start()
    if start == "subprocess":
        return subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=dict(env))
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    # takes effect when the forkserver starts, once per process: the first caller's list wins
    # (a module missing from it is imported by the child itself)
    ctx.set_forkserver_preload(list(PRELOAD))
    log.flush()
    process = ctx.Process(target=_run_launcher, args=(list(cmd[1:]), log.name, dict(env)), daemon=False)
    with _main_not_rerun():
        process.start()
    return ForkedRun(process)


__all__ = ["start_launcher", "default_start", "ForkedRun", "PRELOAD", "STARTS"]
