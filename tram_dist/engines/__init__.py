"""Engines: where each rank's slice of the parameters, gradients and TRAM state lives.

==============================  =========================================================
engine                          how to get one
==============================  =========================================================
single process / DDP            ``LocalEngine(optimizer)`` (the default)
FSDP2 (``fully_shard``)         ``FSDP2Engine(optimizer, model)``; chosen automatically
                                when the parameters are DTensors
DeepSpeed ZeRO-1/2/3            ``tram_dist.engines.deepspeed.initialize(model, TRAM, config)``
                                or ``ZeroEngine(ds_engine)`` around an existing engine
FSDP1 (``use_orig_params``)     ``FSDP1Engine(optimizer, fsdp_model)`` (needs an accelerator)
==============================  =========================================================

The DeepSpeed adapter is imported on first use (``tram_dist.engines.deepspeed``), so that
DeepSpeed stays optional.
"""
from __future__ import annotations

from .base import Engine, Slice, SliceGroup
from .fsdp1 import FSDP1Engine
from .fsdp2 import FSDP2Engine
from .local import LocalEngine


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def default_engine(optimizer) -> Engine:
    """The engine for ``optimizer``'s parameters when none is given: FSDP2 for DTensor
    parameters, FSDP1 for the original parameters of a ``use_orig_params=True`` FSDP model
    (the model is bound by ``TrainStep``), otherwise whole parameters on every rank (single
    process or DDP). An optimizer that carries its engine (``tram_engine``, set by
    ``ZeroEngine``) gets that one."""
    engine = getattr(optimizer, "tram_engine", None)
    if engine is not None:
        return engine
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if any(_is_dtensor(p) for p in params):
        if not all(_is_dtensor(p) for p in params):
            raise ValueError("the optimizer mixes DTensor (FSDP2) and plain parameters; shard the whole "
                             "model with fully_shard or give an engine explicitly")
        return FSDP2Engine(optimizer)
    if any(getattr(p, "_fsdp_flattened", False) for p in params):  # FSDP1 marks what it flattened
        return FSDP1Engine(optimizer)
    return LocalEngine(optimizer)


__all__ = ["Engine", "Slice", "SliceGroup", "LocalEngine", "FSDP2Engine", "FSDP1Engine", "default_engine"]
