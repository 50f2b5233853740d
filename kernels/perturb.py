"""perturb_: params <- theta + scale * w(theta, g) * g, in one pass over memory.

Two forms:
  * theta = params (the ascent from the current weights); with ``backups`` the same pass writes
    backups <- params (an exact copy of what it is about to overwrite).
  * theta = ``sources`` (an fp32 master, or the backup left by a trust-region swap); params are
    then only written, and no backup is taken (``backups`` with ``sources`` is a ValueError).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ._common import (RULES, Scratch, backend, check_lists, check_rule, check_triton_dtypes,
                      list_dtypes, weight_into, windows)
from ._triton import (_load_f32, _load_raw, _locate, _scaled_weight, _store, _table_ptr,
                      device_guard, jit, plan, prepare, tl)

Scale = Union[float, Tensor]


@torch.no_grad()
def perturb_reference(params: Sequence[Tensor], grads: Sequence[Tensor], *, scale: Scale,
                      rule: str, eta: float = 0.0, backups: Optional[Sequence[Tensor]] = None,
                      sources: Optional[Sequence[Tensor]] = None) -> None:
    """Torch reference (test oracle and CPU path), CHUNK elements at a time."""
    if rule not in RULES:
        raise ValueError(f"unknown perturbation rule {rule!r}; expected identity, adaptive or fisher")
    if not params:
        return
    scratch = Scratch(grads, params[0].device)
    for i, (p, g) in enumerate(zip(params, grads)):
        src = sources[i] if sources is not None else None
        bak = backups[i] if backups is not None else None
        for pw, gw, sw, bw in windows(p, g, src, bak):
            theta = sw if sw is not None else pw
            g32 = scratch.as_f32(gw)
            step = scratch.work(gw)
            if weight_into(step, theta, g32, rule, eta):
                step.mul_(scale).mul_(g32)      # (scale * w) * g
            else:
                torch.mul(g32, scale, out=step)  # (scale * 1) * g
            step.add_(theta)                     # theta + step, in float32
            if bw is not None:
                bw.copy_(pw)
            pw.copy_(step)


@jit
def _perturb_block(p_ptr, g_ptr, x_ptr, offs, mask, s, eta, RULE: tl.constexpr,
                   X_MODE: tl.constexpr, EVEN: tl.constexpr):
    g = _load_f32(g_ptr, offs, mask, EVEN)
    if X_MODE == 1:  # theta from sources; params only written
        theta = _load_f32(x_ptr, offs, mask, EVEN)
    else:
        p = _load_raw(p_ptr, offs, mask, EVEN)
        theta = p.to(tl.float32)
        if X_MODE == 2:  # backup <- params, the raw loaded values
            _store(x_ptr, offs, p, mask, EVEN)
    new = theta + _scaled_weight(theta, g, s, eta, RULE) * g
    _store(p_ptr, offs, new, mask, EVEN)


@jit
def _perturb_kernel(p_ptr, g_ptr, x_ptr, scale_ptr, n, scale, eta, tab, T,
                    RULE: tl.constexpr, X_MODE: tl.constexpr, SCALE_IN_MEM: tl.constexpr,
                    NROWS: tl.constexpr, MULTI: tl.constexpr, LOG_T: tl.constexpr,
                    ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    if MULTI:
        t, start, n = _locate(tab, T, NROWS, LOG_T, BLOCK)
        p_ptr = _table_ptr(tab, 0, T, t, p_ptr, ALIGNED)
        g_ptr = _table_ptr(tab, 1, T, t, g_ptr, ALIGNED)
        if X_MODE != 0:
            x_ptr = _table_ptr(tab, 2, T, t, x_ptr, ALIGNED)
    else:
        start = tl.program_id(0).to(tl.int64) * BLOCK
    if SCALE_IN_MEM:  # a device scalar (e.g. rho / norm): no host sync
        s = tl.load(scale_ptr).to(tl.float32)
    else:
        s = scale
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        _perturb_block(p_ptr, g_ptr, x_ptr, offs, offs < n, s, eta, RULE, X_MODE, True)
    else:
        _perturb_block(p_ptr, g_ptr, x_ptr, offs, offs < n, s, eta, RULE, X_MODE, False)


def _perturb_triton(params, grads, scale: Scale, rule_id: int, eta: float, backups, sources,
                    device: torch.device) -> None:
    prepare(device)
    extra = sources if sources is not None else backups
    x_mode = 1 if sources is not None else (2 if backups is not None else 0)
    operands = [params, grads] + ([extra] if extra is not None else [])
    in_mem = isinstance(scale, Tensor)
    with device_guard(device):
        for l in plan(operands):
            p, g = l.carriers[0], l.carriers[1]
            x = l.carriers[2] if x_mode else p
            _perturb_kernel[(l.grid,)](p, g, x, scale if in_mem else p, l.numel,
                                       0.0 if in_mem else scale, eta, l.table_arg(), l.count,
                                       RULE=rule_id, X_MODE=x_mode, SCALE_IN_MEM=in_mem,
                                       NROWS=len(operands), **l.meta())


@torch.no_grad()
def perturb_(params: Sequence[Tensor], grads: Sequence[Tensor], *, scale: Scale, rule: str,
             eta: float = 0.0, backups: Optional[Sequence[Tensor]] = None,
             sources: Optional[Sequence[Tensor]] = None) -> None:
    """params[i] <- theta + scale * w(theta, g) * g, theta = sources[i] or params[i].

    ``backups[i] <- params[i]`` (exact) in the same pass if given; not with ``sources``.
    ``scale``: a float, or a one-element tensor on the params' device (read on the device, no
    host sync). Triton for CUDA tensors, the torch reference elsewhere (see ``TRAM_KERNELS``).
    """
    rule_id = check_rule(rule)
    if backups is not None and sources is not None:
        raise ValueError("perturb_: pass backups (theta = params) or sources (theta = sources), "
                         "not both: with sources the params are not the weights to keep")
    dev = check_lists("perturb_", params=params, grads=grads, backups=backups, sources=sources)
    if dev is None:
        return
    if isinstance(scale, Tensor):
        if scale.numel() != 1:
            raise ValueError(f"perturb_: scale must be a float or a one-element tensor, "
                             f"got shape {tuple(scale.shape)}")
        if scale.device != dev:
            if scale.device.type != "cpu":
                raise ValueError(f"perturb_: scale is on {scale.device}, params on {dev}")
            scale = float(scale)  # a CPU scalar costs no device sync
    else:
        scale = float(scale)
    if backend(dev, list_dtypes(params, grads, backups, sources)) == "triton":
        check_triton_dtypes("perturb_", params=params, grads=grads, backups=backups,
                            sources=sources)
        s = scale.reshape(()) if isinstance(scale, Tensor) else scale
        return _perturb_triton(params, grads, s, rule_id, float(eta), backups, sources, dev)
    perturb_reference(params, grads, scale=scale, rule=rule, eta=eta, backups=backups,
                      sources=sources)
