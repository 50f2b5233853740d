"""Checkpoint folders a run can trust: written atomically, verified by a manifest, pruned safely.

A checkpoint is ``checkpoint-NNNNNNNN/`` in the output folder. It is written under a hidden
temporary name, its ``manifest.json`` (the size and sha256 of every file in it) is written
last, and only then is it renamed into place; so a folder without a valid manifest was
interrupted (a crash, ``kill -9``, a full disk) or altered. ``find_resume`` takes the newest
checkpoint whose manifest verifies and says in one line which newer ones it skipped and why.
The run's settings that change what training does are saved with it (``run.json``) so that a
resume with other settings is refused rather than silently mixed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

MANIFEST = "manifest.json"
CKPT = re.compile(r"^checkpoint-(\d+)$")
_CHUNK = 8 << 20


class CheckpointError(ValueError):
    """No usable checkpoint, or one that does not match this run; one line with the fix."""


def checkpoints(out: Path) -> List[Path]:
    """The ``checkpoint-N`` folders of ``out``, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(out).glob("checkpoint-*") if (m := CKPT.match(p.name))]
    return [p for _, p in sorted(found)]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> List[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path) -> None:
    """Record every file of ``folder`` (size, sha256); written last, atomically."""
    folder = Path(folder)
    entries = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)}
               for p in _files(folder)}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": entries}, indent=1) + "\n")
    os.replace(tmp, folder / MANIFEST)


def verify_manifest(folder: Path, required: Tuple[str, ...] = ()) -> Optional[str]:
    """None if ``folder`` is complete and unaltered, else the reason (one phrase)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        return "it has no manifest.json (interrupted while being written, or not a tram_dist checkpoint)"
    try:
        entries = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return "its manifest.json is not valid"
    for name in required:
        if name not in entries:
            return f"it has no {name}"
    for name, meta in entries.items():
        file = folder / name
        if not file.resolve().is_relative_to(folder.resolve()):
            return f"its manifest names {name}, outside the checkpoint"
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != meta["size"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {meta['size']} (truncated?)"
        if _sha256(file) != meta["sha256"]:
            return f"{name} does not match its sha256 in the manifest (corrupted or altered)"
    extra = [str(p.relative_to(folder)) for p in _files(folder) if str(p.relative_to(folder)) not in entries]
    if extra:
        return f"{extra[0]} is not in the manifest"
    return None


def find_resume(out: Path, requested: str, *, required: Tuple[str, ...] = (),
                say: Callable[[str], None] = print) -> Path:
    """The checkpoint to resume: ``requested`` = "latest" (the newest that verifies, newer
    broken ones skipped with one line each) or a folder (which must verify)."""
    if requested != "latest":
        path = Path(requested)
        if not path.is_dir():
            raise CheckpointError(f"--resume {path} is not a checkpoint folder; pass checkpoint-N or "
                                  "--resume alone for the latest one in --output-dir")
        reason = verify_manifest(path, required)
        if reason:
            raise CheckpointError(f"--resume {path}: {reason}; resume from another checkpoint "
                                  "(--resume alone takes the newest complete one)")
        return path
    found = checkpoints(out)
    if not found:
        raise CheckpointError(f"--resume: no checkpoint-* folder in {out}; drop --resume to start "
                              "fresh or pass a checkpoint folder")
    for path in reversed(found):
        reason = verify_manifest(path, required)
        if reason is None:
            return path
        say(f"resume: skipping {path.name}: {reason}")
    raise CheckpointError(f"--resume: none of the {len(found)} checkpoint(s) in {out} is complete "
                          "(see the lines above); start fresh with --overwrite")


def prune(out: Path, keep: int) -> None:
    """Keep the ``keep`` newest checkpoints (0: all)."""
    if keep > 0:
        for old in checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def remove_temporaries(out: Path) -> None:
    """Hidden ``.checkpoint-*.tmp`` folders left by an interrupted save."""
    for tmp in Path(out).glob(".checkpoint-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------ the run's own settings
def check_same_run(saved: Dict, current: Dict, *, allow_change: bool) -> List[str]:
    """The fields of ``current`` that differ from ``saved`` (the settings a checkpoint was
    written with). Raises ``CheckpointError`` naming the first unless ``allow_change``."""
    changed = [k for k in current if k in saved and saved[k] != current[k]]
    if changed and not allow_change:
        k = changed[0]
        raise CheckpointError(f"{k} was {saved[k]!r} when the checkpoint was written, and is "
                              f"{current[k]!r} now; resume with the same {k}, or set "
                              "allow_config_change (--allow-config-change) to continue with the "
                              "new value (it is recorded)")
    return changed


__all__ = ["CheckpointError", "checkpoints", "write_manifest", "verify_manifest", "find_resume",
           "prune", "remove_temporaries", "check_same_run", "MANIFEST"]
