"""Trust-region targets: what the divergence d compares the current model against.

* ``NoisyInputs``      d_x (Eq. 5): the same parameters on inputs x + z (R3F's trust region).
* ``PreviousParams``   d_theta(t-1) (Eq. 4, TRPO): the parameters before the last update.
* ``PretrainedParams`` d_theta(0): the parameters the run started from.
* ``EMAParams``        an exponential moving average of past parameters (MESA's target).

Parameter targets are buffers in the optimizer state beside each parameter *slice* (so they
shard with it), never a copy of the model. The target forward swaps the buffer into the
parameters in place; the backup that the perturbation needs anyway is the swap space, and
the ascent is written straight from that backup, so no swap back is ever copied.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
from typing import Iterator, Optional

import torch
from torch import Tensor

from . import kernels

TARGET = "tr_target"  # state key of the parameter-shaped target buffer


# ------------------------------------------------------------------------------------------
# d_x: noised inputs
# ------------------------------------------------------------------------------------------
def _sample_seed(seed: int, step: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{step}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class NoisyInputs:
    """z ~ N(0, sigma^2) or U(-sigma, sigma) added to the input embeddings (Eq. 5).

    Works for any Hugging Face model through ``get_input_embeddings()``: a forward hook adds
    z to the embedding output for the duration of one forward, so the caller's batch is never
    touched and sharded engines gather their parameters as usual. The noise of each sample is
    drawn from its own generator seeded by (seed, step, global sample index), so it does not
    depend on how the global batch is split over ranks and micro-batches.
    """

    def __init__(self, sigma: float, kind: str = "normal"):
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"NoisyInputs: sigma must be a positive finite number, got {sigma!r}")
        if kind not in ("normal", "uniform"):
            raise ValueError(f"NoisyInputs: kind must be 'normal' or 'uniform', got {kind!r}")
        self.sigma = float(sigma)
        self.kind = kind

    def __repr__(self) -> str:
        return f"NoisyInputs(sigma={self.sigma}, kind={self.kind!r})"

    def sample(self, shape, *, seed: int, step: int, sample_index: Tensor, device, dtype) -> Tensor:
        """Noise of shape (batch, *rest), one generator per sample."""
        out = torch.empty(shape, device=device, dtype=torch.float32)
        for row, index in enumerate(sample_index.tolist()):
            gen = torch.Generator(device=device)
            gen.manual_seed(_sample_seed(seed, step, int(index)))
            if self.kind == "normal":
                out[row].normal_(0.0, self.sigma, generator=gen)
            else:
                out[row].uniform_(-self.sigma, self.sigma, generator=gen)
        return out.to(dtype)

    @contextlib.contextmanager
    def applied(self, model, *, seed: int, step: int, sample_index: Tensor) -> Iterator[None]:
        """Within this context every forward of ``model`` sees embeddings x + z."""
        embeddings = _input_embeddings(model)

        def add_noise(module, args, output):
            z = self.sample(output.shape, seed=seed, step=step, sample_index=sample_index,
                            device=output.device, dtype=output.dtype)
            return output + z

        handle = embeddings.register_forward_hook(add_noise)
        try:
            yield
        finally:
            handle.remove()


def _input_embeddings(model):
    inner = model
    # DDP and DeepSpeed engines wrap the model in `.module`; FSDP2 and plain models do not.
    while not hasattr(inner, "get_input_embeddings") and hasattr(inner, "module"):
        inner = inner.module
    if not hasattr(inner, "get_input_embeddings"):
        raise TypeError(
            f"NoisyInputs needs a model with get_input_embeddings() (any Hugging Face model); "
            f"got {type(model).__name__}")
    return inner.get_input_embeddings()


# ------------------------------------------------------------------------------------------
# d_theta: parameter targets
# ------------------------------------------------------------------------------------------
class ParamTarget:
    """A parameter-shaped target per slice, held in the optimizer state under ``TARGET``.

    The optimizer calls: ``init_buffer`` once per slice when attached; ``after_target_forward``
    with theta_t (the backup or the master) once the target forward is done; ``end_of_step``
    after the parameters are restored and the base optimizer has stepped.
    """

    #: dtype of the buffer: "param" (working precision) or "master" (the master's precision).
    buffer_precision = "param"

    def init_buffer(self, sl) -> Tensor:
        src = sl.theta if self.buffer_precision == "master" else sl.param
        return src.detach().clone()

    def after_target_forward(self, sl, theta_t: Tensor, *, theta_is_backup: bool) -> None:
        pass

    def end_of_step(self, sl) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class PretrainedParams(ParamTarget):
    """d_theta(0): divergence from the parameters the run started from (held fixed)."""

    def __repr__(self) -> str:
        return "PretrainedParams()"


class PreviousParams(ParamTarget):
    """d_theta(t-1): divergence from the parameters before the previous update.

    After the target forward the buffer holds theta_{t-1} (now stale) and the backup holds
    theta_t. With a backup the two buffers simply trade places once the step is done (no
    copy); where the engine restores from a master instead (ZeRO), theta_t is copied in.
    """

    def __repr__(self) -> str:
        return "PreviousParams()"

    def after_target_forward(self, sl, theta_t, *, theta_is_backup):
        if theta_is_backup:
            sl.state["_tr_trade"] = True
        else:
            sl.state[TARGET].copy_(theta_t)

    def end_of_step(self, sl):
        if sl.state.pop("_tr_trade", False):
            sl.state[TARGET], sl.state["backup"] = sl.state["backup"], sl.state[TARGET]


class EMAParams(ParamTarget):
    """An exponential moving average of past parameters, updated with theta_t every step
    (after its use as the target): ema <- decay * ema + (1 - decay) * theta_t.
    EMAParams(0.0) equals PreviousParams(). Held in the master's precision because
    increments of (1 - decay) vanish in bf16."""

    buffer_precision = "master"

    def __init__(self, decay: float = 0.999):
        if not (0.0 <= decay < 1.0):
            raise ValueError(f"EMAParams: decay must be in [0, 1), got {decay!r}")
        self.decay = float(decay)

    def __repr__(self) -> str:
        return f"EMAParams(decay={self.decay})"

    def after_target_forward(self, sl, theta_t, *, theta_is_backup):
        target = sl.state[TARGET]
        target.lerp_(theta_t.to(target.dtype), 1.0 - self.decay)


def is_param_target(tr) -> bool:
    return isinstance(tr, ParamTarget)
