"""Save and resume TRAM runs in each engine's own sharded form.

``save_checkpoint(directory, model, optimizer)`` / ``load_checkpoint(directory, model, optimizer)``
with the model and optimizer that ``TrainStep`` runs; every rank calls both.

=====================  ======================================================================
engine                 layout under ``directory/tag``
=====================  ======================================================================
single process / DDP   ``state.pt`` (rank 0 writes; every rank reads): model, base optimizer,
                       TRAM state (``PerturbedOptimizer.state_dict``)
FSDP2                  ``torch.distributed.checkpoint``: model and base optimizer through
                       ``get_model_state_dict`` / ``get_optimizer_state_dict``, and TRAM's
                       target buffers as DTensors sharded like their parameters (so a run can
                       resume on another world size); the client state and TRAM's counters
                       as JSON (``client.json``, ``tram_meta.json``)
DeepSpeed ZeRO         DeepSpeed's own checkpoint (``ds_engine.save_checkpoint``: model,
                       per-rank ZeRO optimizer partitions, LR scheduler) and beside its
                       per-rank files ``tram_rank{r:05d}.pt``: this rank's TRAM state
                       (targets of its partition, counters); resume on the same world size
FSDP1                  model and optimizer through ``torch.distributed.checkpoint``; TRAM state
                       per rank in ``tram_rank{r:05d}.pt`` (same world size)
=====================  ======================================================================

The backup is transient (only alive between the ascent and the descent) and never saved;
``PreviousParams`` / ``PretrainedParams`` / ``EMAParams`` targets are. A resumed run continues
exactly like an uninterrupted one (tests/engines/test_engines_checkpoint.py). Nothing is
unpickled on load: ``torch.load(weights_only=True)`` and JSON only, DeepSpeed's reads included
(``tram_dist.safe_load``).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from .engines import default_engine
from .engines.fsdp1 import FSDP1Engine
from .engines.fsdp2 import FSDP2Engine
from .safe_load import load_tensors, make_deepspeed_loads_safe
from .trust_region import TARGET

_TRAM_FILE = "tram_rank{:05d}.pt"


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _engine_of(optimizer):
    from .optim import PerturbedOptimizer
    if isinstance(optimizer, PerturbedOptimizer):
        return optimizer.engine
    return default_engine(optimizer)


def _perturbed(optimizer) -> bool:
    from .optim import PerturbedOptimizer
    return isinstance(optimizer, PerturbedOptimizer)


def _is_zero(engine) -> bool:
    return type(engine).__name__ == "ZeroEngine"


def _inner(model):
    from torch.nn.parallel import DistributedDataParallel
    return model.module if isinstance(model, DistributedDataParallel) else model


def save_checkpoint(directory: str, model, optimizer, *, tag: Optional[str] = None,
                    client_state: Optional[Dict[str, Any]] = None) -> str:
    """Save model, base optimizer and TRAM state; returns the checkpoint's folder."""
    engine = _engine_of(optimizer)
    if _is_zero(engine):
        ds = engine.ds
        tag = tag or f"global_step{ds.global_steps}"
        ds.save_checkpoint(directory, tag=tag, client_state=client_state or {})
        path = os.path.join(directory, tag)
        if _perturbed(optimizer):
            torch.save({"world_size": _world(), "tram": optimizer.tram_state_dict()},
                       os.path.join(path, _TRAM_FILE.format(_rank())))
        _barrier()
        return path
    tag = tag or "latest"
    path = os.path.join(directory, tag)
    if isinstance(engine, FSDP2Engine):
        _save_dcp(path, model, optimizer, client_state, with_tram_dtensors=True)
    elif isinstance(engine, FSDP1Engine):
        _save_dcp(path, model, optimizer, client_state, with_tram_dtensors=False)
        if _perturbed(optimizer):
            torch.save({"world_size": _world(), "tram": optimizer.tram_state_dict()},
                       os.path.join(path, _TRAM_FILE.format(_rank())))
        _barrier()
    else:
        if _rank() == 0:
            os.makedirs(path, exist_ok=True)
            torch.save({"model": _inner(model).state_dict(), "optimizer": optimizer.state_dict(),
                        "client": client_state or {}}, os.path.join(path, "state.pt"))
        _barrier()
    return path


def load_checkpoint(directory: str, model, optimizer, *, tag: Optional[str] = None) -> Dict[str, Any]:
    """Restore what ``save_checkpoint`` wrote; returns the client state."""
    engine = _engine_of(optimizer)
    if _is_zero(engine):
        make_deepspeed_loads_safe(engine.ds)
        load_path, client = engine.ds.load_checkpoint(directory, tag=tag)
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {directory!r} (tag {tag!r})")
        if _perturbed(optimizer):
            path = os.path.dirname(load_path) if os.path.isfile(load_path) else load_path
            tram_path = os.path.join(path, _TRAM_FILE.format(_rank()))
            saved = load_tensors(tram_path)
            _check_world(saved, tram_path)
            optimizer.load_tram_state_dict(saved["tram"])
            # DeepSpeed's load rebuilds the base optimizer's group dicts: share them again, so
            # an LR scheduler on the TRAM optimizer keeps driving the base after a resume.
            optimizer.param_groups = optimizer.base.param_groups
        return client or {}
    path = os.path.join(directory, tag or "latest")
    if isinstance(engine, FSDP2Engine):
        return _load_dcp(path, model, optimizer, with_tram_dtensors=True)
    if isinstance(engine, FSDP1Engine):
        client = _load_dcp(path, model, optimizer, with_tram_dtensors=False)
        if _perturbed(optimizer):
            tram_path = os.path.join(path, _TRAM_FILE.format(_rank()))
            saved = load_tensors(tram_path)
            _check_world(saved, tram_path)
            optimizer.load_tram_state_dict(saved["tram"])
            optimizer.param_groups = optimizer.base.param_groups
        return client
    state = load_tensors(os.path.join(path, "state.pt"))
    _inner(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return state.get("client", {})


def _check_world(saved, path) -> None:
    if saved["world_size"] != _world():
        raise ValueError(f"{path} holds TRAM state of one rank of {saved['world_size']}; this run has "
                         f"{_world()} ranks. ZeRO/FSDP1 TRAM state resumes on the same world size.")


# --- torch.distributed.checkpoint (FSDP2, FSDP1) -----------------------------------------------
def _tram_meta(optimizer) -> Dict[str, Any]:
    own = optimizer.tram_state_dict()
    return {"step_count": own["step_count"], "skipped_ascents": own["skipped_ascents"],
            "clamped_divergences": own.get("clamped_divergences", 0),
            "trust_region": own["trust_region"]}


# Non-tensor state of DCP checkpoints is JSON beside the DCP files (never a pickle, which DCP
# would have to unpickle): the client state and TRAM's counters, written by rank 0.
_CLIENT_JSON, _TRAM_META_JSON = "client.json", "tram_meta.json"


def _write_json(path: str, name: str, value) -> None:
    if _rank() == 0:
        tmp = os.path.join(path, name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(value, f)
        os.replace(tmp, os.path.join(path, name))


def _read_json(path: str, name: str):
    with open(os.path.join(path, name)) as f:
        return json.load(f)


def _tram_dtensors(model, optimizer) -> Dict[str, Any]:
    """TRAM's per-parameter targets as DTensors placed like their (DTensor) parameters."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        st = optimizer.state.get(p)
        if not st or TARGET not in st:
            continue
        local = st[TARGET]
        out[name] = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                                       shape=p.shape, stride=p.stride())
    return out


def _state_for_dcp(model, optimizer, client_state, with_tram_dtensors: bool) -> Dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    base = optimizer.base if _perturbed(optimizer) else optimizer
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, base)}
    if _perturbed(optimizer) and with_tram_dtensors:
        state["tram"] = _tram_dtensors(model, optimizer)
    return state


def _save_dcp(path, model, optimizer, client_state, with_tram_dtensors: bool) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(_state_for_dcp(model, optimizer, client_state, with_tram_dtensors), checkpoint_id=path)
    _write_json(path, _CLIENT_JSON, client_state or {})
    if _perturbed(optimizer):
        _write_json(path, _TRAM_META_JSON, _tram_meta(optimizer))


def _load_dcp(path, model, optimizer, with_tram_dtensors: bool) -> Dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = _state_for_dcp(model, optimizer, {}, with_tram_dtensors)
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    base = optimizer.base if _perturbed(optimizer) else optimizer
    set_optimizer_state_dict(model, base, state["optim"])
    if _perturbed(optimizer):
        optimizer.param_groups = optimizer.base.param_groups  # torch rebuilt the group dicts
        if with_tram_dtensors:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, value in state["tram"].items():
                    local = value.to_local()
                    buf = optimizer.state[params[name]].get(TARGET)
                    if buf is None:
                        optimizer.state[params[name]][TARGET] = local.clone()
                    elif buf.data_ptr() != local.data_ptr():
                        buf.copy_(local)
        meta = _read_json(path, _TRAM_META_JSON)
        optimizer.step_count = int(meta["step_count"])
        optimizer.skipped_ascents = int(meta["skipped_ascents"])
        optimizer.clamped_divergences = int(meta.get("clamped_divergences", 0))
        if optimizer.trust_region is not None and meta.get("trust_region") is not None:
            optimizer.trust_region.load_state_dict(meta["trust_region"])
        optimizer._phase = "idle"
    return _read_json(path, _CLIENT_JSON)


__all__ = ["save_checkpoint", "load_checkpoint"]
