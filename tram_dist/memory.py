"""What TRAM itself holds per rank, measured and budgeted.

TRAM's own memory is the per-slice state beside each parameter slice of this rank:

* ``backup``: theta while the parameters hold theta + eps (or the target), in the working
  precision. Absent where the engine restores from an untouched master (ZeRO with a separate
  fp32 master), so ZeRO with bf16 or fp32 working params and any variant without a parameter
  target holds no parameter-sized buffer at all.
* ``target``: the trust-region target of TRAM-d_theta (``PreviousParams``, ``PretrainedParams``:
  working precision; ``EMAParams``: the master's precision).

Everything else TRAM touches is transient and not parameter-sized: two fp32 partial sums and
the divergence, packed in one 3-element vector for the one all-reduce, and the noise of
TRAM-d_x / TRAM-Fisher (one micro-batch of embeddings). The kernels' temporaries are per
tensor and freed at once.

``tram_bytes(optimizer)`` measures the state; ``expected_tram_bytes(optimizer)`` is the budget
(the table in docs/engines.md) computed from the engine's flags and this rank's slices. A test
asserts the two are equal at world sizes 1 and 2, so the per-rank bytes halve with the world.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict

from .trust_region import TARGET


@dataclass
class TramMemory:
    backup: int        # bytes of theta backups (swap space)
    target: int        # bytes of trust-region targets
    other: int         # any other tensor TRAM keeps in its state
    slice_numel: int   # elements of this rank's trainable slices (the budget's P)

    @property
    def total(self) -> int:
        return self.backup + self.target + self.other

    def as_dict(self) -> Dict[str, int]:
        return {**asdict(self), "total": self.total}


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def tram_bytes(optimizer) -> TramMemory:
    """Bytes of parameter-shaped state TRAM holds on this rank (each storage counted once)."""
    engine = optimizer.engine
    seen = set()
    out = {"backup": 0, "target": 0, "other": 0}
    numel = 0
    import torch

    for group in engine.slice_groups(with_grad_only=False):
        for sl in group.slices:
            numel += sl.param.numel()
            for key, value in sl.state.items():
                if not isinstance(value, torch.Tensor):
                    continue
                ident = (value.untyped_storage().data_ptr(), value.storage_offset(), value.numel())
                if ident in seen:
                    continue
                seen.add(ident)
                kind = "backup" if key == "backup" else "target" if key == TARGET else None
                if kind is None:
                    # the base optimizer's own state (exp_avg, ...) when it shares the dict
                    if key in _BASE_STATE_KEYS:
                        continue
                    kind = "other"
                out[kind] += _nbytes(value)
    return TramMemory(backup=out["backup"], target=out["target"], other=out["other"], slice_numel=numel)


_BASE_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "sum")


def expected_tram_bytes(optimizer, trust_region=None) -> int:
    """The budget: per slice, a working-precision backup where the engine needs one, plus a
    target (working precision; EMA in the master's precision) for a parameter trust region.

    ``trust_region``: the attached ``ParamTarget`` (default: ``optimizer.trust_region``).
    Valid once a step has run (the backup is created lazily by the first ascent).
    """
    engine = optimizer.engine
    tr = trust_region if trust_region is not None else optimizer.trust_region
    # the backup is the ascent's restore point and a swapped-in target's swap space: Descent
    # without a parameter target (R3F) never makes one
    backup = engine.needs_backup and (optimizer.has_ascent or tr is not None)
    total = 0
    for group in engine.slice_groups(with_grad_only=False):
        for sl in group.slices:
            n = sl.param.numel()
            if backup:
                total += n * sl.param.element_size()
            if tr is not None:
                src = sl.theta if getattr(tr, "buffer_precision", "param") == "master" else sl.param
                total += n * src.element_size()
    return total


__all__ = ["TramMemory", "tram_bytes", "expected_tram_bytes"]
