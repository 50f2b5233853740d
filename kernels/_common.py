"""Dispatch, argument checks and the memory-lean helpers of the torch reference.

Dispatch: ``TRAM_KERNELS`` = ``auto`` (default) | ``triton`` | ``torch``, read at every call.
``auto`` runs Triton for CUDA tensors (when triton imports, the dtypes are ones the kernels
store, and the interpreter is off) and the torch reference elsewhere; ``triton`` forces the
kernels (CPU tensors then need ``TRITON_INTERPRET=1``); ``torch`` forces the reference.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import Tensor

from . import _triton

ENV_VAR = "TRAM_KERNELS"
BACKENDS = ("auto", "triton", "torch")
RULES = ("identity", "adaptive", "fisher")

# The torch reference walks big tensors CHUNK elements at a time so its float32 scratch is
# bounded: at most two CHUNK-sized float32 buffers live at once (grad upcast + work buffer).
CHUNK = 1 << 20
TORCH_SCRATCH_BYTES_MAX = 2 * 4 * CHUNK  # 8 MiB per call, whatever the model size


def requested_backend() -> str:
    """The value of TRAM_KERNELS (default auto); ValueError naming the allowed values."""
    raw = os.environ.get(ENV_VAR, "")
    value = raw.strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={raw!r} is not one of {', '.join(BACKENDS)}")
    return value


def backend(device: Union[torch.device, str, None] = None,
            dtypes: Iterable[torch.dtype] = ()) -> str:
    """The path ("triton" or "torch") an op over tensors on ``device`` takes right now."""
    choice = requested_backend()
    if choice != "auto":
        return choice
    device = torch.device(device) if device is not None else torch.device("cpu")
    if (device.type == "cuda" and _triton.HAS_TRITON and not _triton.interpret_enabled()
            and all(dt in _triton.SUPPORTED_DTYPES for dt in dtypes)):
        return "triton"
    return "torch"


def check_rule(rule: str) -> int:
    if rule not in _triton.RULE_IDS:
        raise ValueError(f"unknown perturbation rule {rule!r}; expected identity, adaptive or fisher")
    return _triton.RULE_IDS[rule]


def _is_dtensor(t: Tensor) -> bool:
    if type(t) in (Tensor, torch.nn.Parameter):
        return False
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def check_lists(op: str, **lists: Optional[Sequence[Tensor]]) -> Optional[torch.device]:
    """Validate the op's equal-length tensor lists; return their common device (None if empty).

    Every path (Triton and torch) enforces the same rules, so code tested on CPU does not first
    fail on GPU: equal lengths, equal numel per index, one device, contiguous, plain tensors
    (pass DTensor.to_local(), not the DTensor).
    """
    given = {k: v for k, v in lists.items() if v is not None}
    lengths = {k: len(v) for k, v in given.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{op}: the tensor lists must have equal lengths, got {lengths}")
    names = list(given)
    device = None
    for i in range(len(given[names[0]])):
        numel = None
        for k in names:
            t = given[k][i]
            if not isinstance(t, Tensor):
                raise TypeError(f"{op}: {k}[{i}] is a {type(t).__name__}, not a tensor")
            if _is_dtensor(t):
                raise TypeError(f"{op}: {k}[{i}] is a DTensor; pass its local shard (to_local())")
            if device is None:
                device = t.device
            elif t.device != device:
                raise ValueError(f"{op}: {k}[{i}] is on {t.device}, expected {device}")
            if numel is None:
                numel = t.numel()
            elif t.numel() != numel:
                raise ValueError(f"{op}: {k}[{i}] has {t.numel()} elements, expected {numel} "
                                 f"(as {names[0]}[{i}])")
            if not t.is_contiguous():
                raise ValueError(f"{op}: {k}[{i}] is not contiguous (shape {tuple(t.shape)}, "
                                 f"stride {t.stride()}); pass .contiguous() tensors")
    return device


def check_triton_dtypes(op: str, **lists: Optional[Sequence[Tensor]]) -> None:
    for k, v in lists.items():
        for i, t in enumerate(v or ()):
            if t.dtype not in _triton.SUPPORTED_DTYPES:
                raise ValueError(f"{op}: the Triton kernels store float32, bfloat16 or float16; "
                                 f"{k}[{i}] is {t.dtype} (TRAM_KERNELS=torch handles any dtype)")


def list_dtypes(*lists: Optional[Sequence[Tensor]]) -> set:
    return {t.dtype for v in lists if v is not None for t in v}


def scratch_bytes(numel: Union[int, Iterable[int]] = CHUNK, *, backend: str = "torch") -> int:
    """Upper bound on the temporary bytes one op call allocates besides its outputs.

    ``numel``: the largest tensor's element count, or the element counts of all tensors.
    torch path: at most two float32 buffers of min(CHUNK, largest numel) elements (the second
    holds a float32 copy of the grads; unused when they are float32, except by
    ``sum_sq(with_eps_sq=True)``): TORCH_SCRATCH_BYTES_MAX = 8 MiB at most.
    triton path: sum_sq's float32 per-program partials (4 bytes per DEFAULT_BLOCK elements,
    twice with ``with_eps_sq``) and a multi-tensor launch's table (8 bytes x 5 rows x tensors,
    kept in a cache of the last 64 tables); the other ops allocate nothing.
    """
    sizes = [int(numel)] if isinstance(numel, int) else [int(n) for n in numel]
    if backend == "torch":
        return 2 * 4 * min(CHUNK, max(sizes, default=0))
    if backend == "triton":
        blocks = sum(-(-n // _triton.DEFAULT_BLOCK) for n in sizes)
        table = 8 * 5 * len(sizes) if len(sizes) > 1 else 0
        return 2 * 4 * blocks + table
    raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")


# ---------------------------------------------------------------------------------------------
# Torch reference helpers: float32 work over CHUNK-element windows of contiguous tensors
# ---------------------------------------------------------------------------------------------
class Scratch:
    """The reference's two float32 buffers (work, grad upcast), allocated on first use with
    min(CHUNK, largest numel) elements and reused for every window of the call."""

    def __init__(self, tensors: Sequence[Optional[Tensor]], device) -> None:
        self._size = min(CHUNK, max((t.numel() for t in tensors if t is not None), default=0))
        self._device = device
        self._bufs = [None, None]

    def _get(self, k: int, like: Tensor) -> Tensor:
        n = like.numel()
        if n > self._size:  # only the unchunked fallback for non-contiguous tensors
            return torch.empty(like.shape, dtype=torch.float32, device=like.device)
        if self._bufs[k] is None:
            self._bufs[k] = torch.empty(self._size, dtype=torch.float32, device=self._device)
        return self._bufs[k][:n].view(like.shape)

    def work(self, like: Tensor) -> Tensor:
        """An uninitialized float32 buffer shaped like ``like``."""
        return self._get(0, like)

    def as_f32(self, x: Tensor) -> Tensor:
        """``x`` as float32: ``x`` itself if it already is, else a copy into the second buffer."""
        if x.dtype == torch.float32:
            return x
        return self._get(1, x).copy_(x)

    def copy_f32(self, x: Tensor) -> Tensor:
        """A float32 copy of ``x`` in the second buffer, free to overwrite."""
        return self._get(1, x).copy_(x)


def windows(*tensors: Optional[Tensor]):
    """Matching windows of at most CHUNK elements over same-numel tensors (None passes through).

    Contiguous tensors are walked as flat views; if any is not contiguous the tensors are yielded
    whole, as the unchunked reference did (the ops reject such tensors; the oracle accepts them).
    """
    present = [t for t in tensors if t is not None]
    if not all(t.is_contiguous() for t in present):
        yield tensors
        return
    flats = [t.view(-1) if t is not None else None for t in tensors]
    numel = present[0].numel()
    for start in range(0, numel, CHUNK):
        stop = min(start + CHUNK, numel)
        yield tuple(f[start:stop] if f is not None else None for f in flats)


def weight_into(out: Tensor, theta: Optional[Tensor], g32: Tensor, rule: str, eta: float) -> bool:
    """out <- w(theta, g) in float32, rounding like ``w`` in the contract; False for identity
    (w = 1: the caller skips the multiply, which is exact)."""
    if rule == "identity":
        return False
    if rule == "adaptive":
        out.copy_(theta)            # theta.float()
        out.abs_().add_(eta)        # |theta| + eta
        out.mul_(out)               # t * t
        return True
    if rule == "fisher":
        torch.mul(g32, eta, out=out)  # eta * g
        out.mul_(g32).add_(1.0)       # (eta * g) * g + 1
        out.reciprocal_()             # 1 / (...), as torch evaluates 1.0 / tensor
        return True
    raise ValueError(f"unknown perturbation rule {rule!r}; expected identity, adaptive or fisher")
