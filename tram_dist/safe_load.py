"""Loading checkpoint files without ever executing them.

A ``.pt`` file is a pickle, and unpickling can run arbitrary code: a crafted ``rng_rank0.pt``
in a checkpoint folder would run on ``--resume``. Every load in tram_dist therefore goes
through ``torch.load(weights_only=True)``, which rebuilds tensors, plain containers, numbers
and strings only, and refuses anything else with one line. Non-tensor state that other code
would pickle (the client state of FSDP2 checkpoints, TRAM's counters) is written as JSON.

DeepSpeed's own ZeRO files hold three of its plain data classes (the loss scaler's settings,
the ZeRO stage enum, a fragment address); its loader (``ds_engine.checkpoint_engine.load``,
through which every DeepSpeed checkpoint read passes) is replaced on our engines by a
``weights_only=True`` load that allowlists exactly those three classes, which carry
attributes and no callables.
"""
from __future__ import annotations

import os
from typing import Any, List

import torch


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds something other than tensors and plain data; it was not loaded."""


def load_tensors(path, map_location="cpu", extra_safe_globals: List[Any] = ()) -> Any:
    """``torch.load(path, weights_only=True)``; a file holding other objects (a pickle that
    would construct arbitrary objects or run code) raises ``UnsafeCheckpointError``."""
    try:
        with torch.serialization.safe_globals(list(extra_safe_globals)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        if type(e).__name__ == "UnpicklingError" or "Weights only load failed" in str(e):
            raise UnsafeCheckpointError(
                f"{os.fspath(path)} holds objects other than tensors and plain data, so it was not "
                f"loaded (it would have to be unpickled, which can run code); it was not written by "
                f"tram_dist or has been altered: delete it, or resume from another checkpoint") from None
        raise


def deepspeed_safe_globals() -> List[Any]:
    """The DeepSpeed classes its ZeRO checkpoint files contain (data only)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    out = [LossScaler, ZeroStageEnum, fragment_address]
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
        out.append(DynamicLossScaler)
    except ImportError:  # pragma: no cover - older/newer DeepSpeed
        pass
    return out


def make_deepspeed_loads_safe(ds_engine) -> None:
    """Point ``ds_engine``'s checkpoint reads at ``load_tensors`` (weights_only=True)."""
    ckpt = getattr(ds_engine, "checkpoint_engine", None)
    if ckpt is None:
        raise RuntimeError("this DeepSpeed engine has no checkpoint_engine to make safe; "
                           "tram_dist supports DeepSpeed >= 0.15")
    allowed = deepspeed_safe_globals()

    def load(path, map_location=None):
        return load_tensors(path, map_location=map_location, extra_safe_globals=allowed)

    ckpt.load = load


__all__ = ["UnsafeCheckpointError", "load_tensors", "deepspeed_safe_globals", "make_deepspeed_loads_safe"]
