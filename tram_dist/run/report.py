"""Where a run's per-step metrics and evaluations go besides ``metrics.jsonl`` / ``evals.jsonl``:
TensorBoard (``output_dir/tensorboard``) and Weights & Biases, as ``RunConfig.report_to`` says.

Rank 0 reports; the other ranks hold no writer. A backend whose package is missing is refused
when the run is built, before any data work, with the pip command in the error.
"""
from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

from .config import ConfigError

BACKENDS = ("tensorboard", "wandb")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_backends(names) -> list:
    """The backends of ``report_to`` ("none" or a list), each installed."""
    names = [n for n in names if n != "none"]
    for name in names:
        if name not in BACKENDS:
            raise ConfigError("report_to", f"{name!r} is not one of none, {', '.join(BACKENDS)}")
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise ConfigError("report_to", f"{name} needs the {PACKAGES[name]} package: pip install "
                              f"{PACKAGES[name]} (or pip install 'tram_dist[{name}]')")
    return names


class Reporter:
    """Scalars of each step (``train/...``) and of each evaluation (``eval/...``)."""

    def __init__(self, names, out: Path, config: dict, run_name: str, main: bool):
        self.writers = []
        if not main:
            return
        for name in check_backends(names):
            if name == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                self.writers.append(_TensorBoard(SummaryWriter(str(Path(out) / "tensorboard"))))
            else:
                import wandb

                # offline unless WANDB_MODE says otherwise: a run never waits on the network;
                # `wandb sync output_dir/wandb/offline-run-*` uploads it later
                run = wandb.init(name=run_name, dir=str(out), config=config, resume="allow",
                                 mode=os.environ.get("WANDB_MODE", "offline"))
                self.writers.append(_WandB(run))

    def log(self, prefix: str, record: dict, step: int) -> None:
        scalars = {f"{prefix}/{k}": float(v) for k, v in _flat(record).items()}
        for writer in self.writers:
            writer.log(scalars, step)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers = []


def _flat(record: dict, prefix: str = "") -> dict:
    """Finite numbers of ``record`` (nested dicts as ``a/b``); flags as 0/1; the rest dropped."""
    out = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "/"))
        elif isinstance(value, (bool, int, float)) and math.isfinite(float(value)) and key != "step":
            out[name] = float(value)
    return out


class _TensorBoard:
    def __init__(self, writer):
        self.writer = writer

    def log(self, scalars: dict, step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, run):
        self.run = run

    def log(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


__all__ = ["Reporter", "check_backends", "BACKENDS"]
