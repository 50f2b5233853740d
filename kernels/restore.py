"""restore_: params <- backups, bit exact (a cast if the dtypes differ, as ``copy_`` casts)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ._common import backend, check_lists, check_triton_dtypes, list_dtypes
from ._triton import _load_raw, _locate, _store, _table_ptr, device_guard, jit, plan, prepare, tl


@torch.no_grad()
def restore_reference(params: Sequence[Tensor], backups: Sequence[Tensor]) -> None:
    """Torch reference (test oracle and CPU path); ``copy_`` allocates no scratch."""
    for p, b in zip(params, backups):
        p.copy_(b)


@jit
def _restore_block(p_ptr, b_ptr, offs, mask, EVEN: tl.constexpr):
    _store(p_ptr, offs, _load_raw(b_ptr, offs, mask, EVEN), mask, EVEN)


@jit
def _restore_kernel(p_ptr, b_ptr, n, tab, T, MULTI: tl.constexpr, LOG_T: tl.constexpr,
                    ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    if MULTI:
        t, start, n = _locate(tab, T, 2, LOG_T, BLOCK)
        p_ptr = _table_ptr(tab, 0, T, t, p_ptr, ALIGNED)
        b_ptr = _table_ptr(tab, 1, T, t, b_ptr, ALIGNED)
    else:
        start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        _restore_block(p_ptr, b_ptr, offs, offs < n, True)
    else:
        _restore_block(p_ptr, b_ptr, offs, offs < n, False)


def _restore_triton(params, backups, device: torch.device) -> None:
    prepare(device)
    with device_guard(device):
        for l in plan([params, backups]):
            p, b = l.carriers
            _restore_kernel[(l.grid,)](p, b, l.numel, l.table_arg(), l.count, **l.meta())


@torch.no_grad()
def restore_(params: Sequence[Tensor], backups: Sequence[Tensor]) -> None:
    """params[i] <- backups[i], bit exact. Triton for CUDA tensors, torch elsewhere."""
    dev = check_lists("restore_", params=params, backups=backups)
    if dev is None:
        return
    if backend(dev, list_dtypes(params, backups)) == "triton":
        check_triton_dtypes("restore_", params=params, backups=backups)
        return _restore_triton(params, backups, dev)
    restore_reference(params, backups)
