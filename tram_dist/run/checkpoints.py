"""A run's checkpoint folders: what goes around the engine's own state (RNG, run settings,
engine and world size, manifest), rotation, free space, and which folder a resume uses.

The engine writes and reads its own state inside the folder (``tram_dist.runs``: ``state.pt``
for single/DDP, ``dcp/`` for FSDP2, ``zero/`` for DeepSpeed); everything else is written here,
by rank 0 except the per-rank RNG files, under a temporary name renamed when complete.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..checkpoint_files import (CheckpointError, checkpoints, find_resume, prune, write_manifest)
from ..safe_load import load_tensors
from .config import ConfigError, RunConfig
from .distributed import Dist, barrier, from_rank0

# The settings a resume must not change silently (the trajectory depends on them).
RUN_SETTINGS = ("model", "method", "method_args", "sigma", "target_dropout", "dropout",
                "divergence_fraction", "lr", "betas", "weight_decay", "max_grad_norm",
                "warmup_steps", "max_steps", "batch_size", "block_size", "seed", "train_domain")
FAMILY = {"single": "single/ddp", "ddp": "single/ddp", "fsdp": "fsdp", "deepspeed": "deepspeed"}


class DiskError(OSError):
    """The output folder cannot hold what the run writes; one line with the path and the fix."""


def run_settings(config: RunConfig, block_size: int) -> dict:
    out = {k: getattr(config, k) for k in RUN_SETTINGS}
    out["betas"], out["block_size"] = list(out["betas"]), block_size
    return out


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(path: Path) -> None:
    state = load_tensors(path)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def check_writable(out: Path) -> None:
    """Create ``out`` and write a probe file in it, before any work is done."""
    try:
        if out.exists() and not out.is_dir():
            raise DiskError(f"output_dir {out} is a file; pass a folder")
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"0")
        probe.unlink()
    except DiskError:
        raise
    except OSError as e:
        raise DiskError(f"output_dir {out} cannot be written ({e.strerror or e}); pass a folder you "
                        "can write to") from None


def check_room(out: Path, checkpoint: Path, keep: int, d: Dist) -> None:
    """After the first save (every rank calls; rank 0 looks): rotation holds keep + 1
    checkpoints while a new one is written, so keep more checkpoints' worth must be free."""
    error = None
    if d.main:
        size = folder_bytes(checkpoint)
        free = shutil.disk_usage(out).free
        if keep and free < keep * size:
            error = (f"output_dir {out} has {free / 2**30:.2f} GiB free, but keeping {keep} "
                     f"checkpoints of {size / 2**30:.2f} GiB needs {(keep + 1) * size / 2**30:.2f} "
                     "GiB while a new one is written; free space, lower keep_checkpoints, or save "
                     "less often")
    error = from_rank0(error)
    if error is not None:
        raise DiskError(error)


def save(engine_run, out: Path, step: int, client_state: dict, d: Dist, keep: int, settings: dict) -> Path:
    """Every rank calls. Written as ``.checkpoint-N.tmp``, manifest last, renamed, oldest pruned;
    a failed write removes the temporary folder and raises ``DiskError``."""
    final, tmp = out / f"checkpoint-{step:08d}", out / f".checkpoint-{step:08d}.tmp"
    failed = None
    try:
        if d.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            (tmp / "engine.json").write_text(json.dumps({"engine": engine_run.kind,
                                                         "world_size": d.world_size}) + "\n")
        barrier()
        engine_run.save_checkpoint(tmp, client_state)
        torch.save(rng_state(), tmp / f"rng_rank{d.rank}.pt")
    except OSError as e:
        failed = f"{e.strerror or e}"
    failed = _any_rank(failed)
    if failed is None and d.main:
        try:
            (tmp / "run.json").write_text(json.dumps(settings) + "\n")
            write_manifest(tmp)  # last: a folder without a valid manifest is incomplete
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            prune(out, keep)
        except OSError as e:
            failed = f"{e.strerror or e}"
    failed = from_rank0(failed) if failed is None else failed
    if failed is not None:
        if d.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise DiskError(f"writing checkpoint {final} failed ({failed}); nothing was kept of it. Free "
                        "space in output_dir or pass another one, then resume")
    barrier()
    return final


def _any_rank(error):
    """The first rank's error message if any rank failed (every rank calls)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return error
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e is not None), None)


def check_engine(path: Path, kind: str, d: Dist) -> None:
    """A checkpoint resumes under the engine that wrote it (ZeRO: also the same world size)."""
    saved = json.loads((path / "engine.json").read_text())
    if FAMILY.get(saved.get("engine")) != FAMILY[kind]:
        raise ConfigError("resume", f"{path} was written by the {saved.get('engine')} engine, this run "
                          f"is {kind}; resume with the same engine")
    if kind == "deepspeed" and saved.get("world_size") != d.world_size:
        raise ConfigError("resume", f"{path} holds ZeRO state of {saved.get('world_size')} ranks, this "
                          f"run has {d.world_size}; resume on the same number of ranks")


def resume_point(requested: str, out: Path, d: Dist) -> Path:
    """The checkpoint to resume from: rank 0 verifies manifests (falling back to the newest
    complete one, with one line per skipped folder) and tells the others."""
    path = None
    if d.main:
        required = ("engine.json", "run.json", *(f"rng_rank{r}.pt" for r in range(d.world_size)))
        try:
            path = str(find_resume(out, requested, required=required))
        except CheckpointError as e:
            path = "error: " + str(e)
    path = from_rank0(path)
    if path.startswith("error: "):
        raise ConfigError("resume", path.removeprefix("error: "))
    return Path(path)


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep the records of steps <= ``step`` (a resumed run redoes the ones after it)."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in kept))


__all__ = ["RUN_SETTINGS", "DiskError", "run_settings", "rng_state", "set_rng_state", "save",
           "check_engine", "check_writable", "check_room", "resume_point", "truncate_jsonl",
           "checkpoints"]
