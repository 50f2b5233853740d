"""swap_in_: backups <- params; params <- targets, in one pass (e.g. to evaluate a trust-region
target such as the pretrained or EMA weights in place). ``targets`` may have another dtype
(an fp32 copy for bf16 params): cast, rounding to nearest even as ``copy_`` does. ``targets``
must not alias ``backups``."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ._common import backend, check_lists, check_triton_dtypes, list_dtypes
from ._triton import _load_raw, _locate, _store, _table_ptr, device_guard, jit, plan, prepare, tl


@torch.no_grad()
def swap_in_reference(params: Sequence[Tensor], targets: Sequence[Tensor],
                      backups: Sequence[Tensor]) -> None:
    """Torch reference (test oracle and CPU path); ``copy_`` allocates no scratch."""
    for p, t, b in zip(params, targets, backups):
        b.copy_(p)
        p.copy_(t)


@jit
def _swap_in_block(p_ptr, t_ptr, b_ptr, offs, mask, EVEN: tl.constexpr):
    p = _load_raw(p_ptr, offs, mask, EVEN)
    x = _load_raw(t_ptr, offs, mask, EVEN)
    _store(b_ptr, offs, p, mask, EVEN)
    _store(p_ptr, offs, x, mask, EVEN)


@jit
def _swap_in_kernel(p_ptr, t_ptr, b_ptr, n, tab, T, MULTI: tl.constexpr, LOG_T: tl.constexpr,
                    ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    if MULTI:
        t, start, n = _locate(tab, T, 3, LOG_T, BLOCK)
        p_ptr = _table_ptr(tab, 0, T, t, p_ptr, ALIGNED)
        t_ptr = _table_ptr(tab, 1, T, t, t_ptr, ALIGNED)
        b_ptr = _table_ptr(tab, 2, T, t, b_ptr, ALIGNED)
    else:
        start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        _swap_in_block(p_ptr, t_ptr, b_ptr, offs, offs < n, True)
    else:
        _swap_in_block(p_ptr, t_ptr, b_ptr, offs, offs < n, False)


def _swap_in_triton(params, targets, backups, device: torch.device) -> None:
    prepare(device)
    with device_guard(device):
        for l in plan([params, targets, backups]):
            p, t, b = l.carriers
            _swap_in_kernel[(l.grid,)](p, t, b, l.numel, l.table_arg(), l.count, **l.meta())


@torch.no_grad()
def swap_in_(params: Sequence[Tensor], targets: Sequence[Tensor],
             backups: Sequence[Tensor]) -> None:
    """backups[i] <- params[i] (exact); params[i] <- targets[i] (cast to the params' dtype).
    Triton for CUDA tensors, the torch reference elsewhere (see ``TRAM_KERNELS``)."""
    dev = check_lists("swap_in_", params=params, targets=targets, backups=backups)
    if dev is None:
        return
    if backend(dev, list_dtypes(params, targets, backups)) == "triton":
        check_triton_dtypes("swap_in_", params=params, targets=targets, backups=backups)
        return _swap_in_triton(params, targets, backups, dev)
    swap_in_reference(params, targets, backups)
