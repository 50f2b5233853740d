"""sum_sq: sum over lists of tensors of w(theta, g) * g^2, the squared norm of T g (and, on
request, of (w g)^2, the squared norm of the unscaled perturbation, in the same pass).

A float32 0-d tensor on the device, no host sync. The Triton path writes one float32 partial
per program and reduces them in a second single-program launch, in a fixed order: the result
is deterministic run to run (no atomics), for a given list structure.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ._common import (RULES, Scratch, backend, check_lists, check_rule, check_triton_dtypes,
                      list_dtypes, weight_into, windows)
from ._triton import (_load_f32, _locate, _scaled_weight, _sum, _table_ptr, block_size,
                      device_guard, jit, launch_options, plan, prepare, tl)


@torch.no_grad()
def sum_sq_reference(thetas: Sequence[Tensor], grads: Sequence[Tensor], *, rule: str,
                     eta: float = 0.0, device=None, with_eps_sq: bool = False) -> Tensor:
    """Torch reference (test oracle and CPU path), CHUNK elements at a time."""
    if rule not in RULES:
        raise ValueError(f"unknown perturbation rule {rule!r}; expected identity, adaptive or fisher")
    shape = (2,) if with_eps_sq else ()
    if not grads:
        return torch.zeros(shape, dtype=torch.float32, device=device)
    total = torch.zeros(shape, dtype=torch.float32, device=grads[0].device)
    scratch = Scratch(grads, grads[0].device)
    for theta, g in zip(thetas, grads):
        for th, gw in windows(theta if rule == "adaptive" else None, g):
            work = scratch.work(gw)
            if with_eps_sq and rule != "identity":
                g32 = scratch.copy_f32(gw)           # overwritten below: always a copy
                weight_into(work, th, g32, rule, eta)
                work.mul_(g32)                       # w * g
                total[0] += g32.mul_(work).sum()     # g * (w * g)
                total[1] += work.mul_(work).sum()    # (w g)^2: .sum(), not torch.dot, whose
                continue                             # error was 2e-5 (sum: 1e-8) at 2.5M terms
            g32 = scratch.as_f32(gw)
            if weight_into(work, th, g32, rule, eta):
                work.mul_(g32).mul_(g32)             # (w * g) * g
            else:
                torch.mul(g32, g32, out=work)        # (1 * g) * g; (w g)^2 is the same sum
            total += work.sum()  # with_eps_sq (identity): both entries, (w g)^2 = g^2
    return total


@jit
def _sum_sq_block(g_ptr, th_ptr, offs, mask, eta, RULE: tl.constexpr, WITH_EPS: tl.constexpr,
                  EVEN: tl.constexpr):
    g = _load_f32(g_ptr, offs, mask, EVEN)
    if RULE == 1:
        theta = _load_f32(th_ptr, offs, mask, EVEN)
    else:  # identity and fisher never read theta
        theta = g
    wg = _scaled_weight(theta, g, 1.0, eta, RULE) * g
    # masked lanes load g = 0 and add exactly 0
    if WITH_EPS:
        return _sum(wg * g), _sum(wg * wg)
    else:
        return _sum(wg * g), 0.0


@jit
def _sum_sq_kernel(g_ptr, th_ptr, part_ptr, part_off, part_row, n, eta, tab, T,
                   RULE: tl.constexpr, WITH_EPS: tl.constexpr, NROWS: tl.constexpr,
                   MULTI: tl.constexpr, LOG_T: tl.constexpr, ALIGNED: tl.constexpr,
                   BLOCK: tl.constexpr):
    if MULTI:
        t, start, n = _locate(tab, T, NROWS, LOG_T, BLOCK)
        g_ptr = _table_ptr(tab, 0, T, t, g_ptr, ALIGNED)
        if RULE == 1:
            th_ptr = _table_ptr(tab, 1, T, t, th_ptr, ALIGNED)
    else:
        start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        acc, eps = _sum_sq_block(g_ptr, th_ptr, offs, offs < n, eta, RULE, WITH_EPS, True)
    else:
        acc, eps = _sum_sq_block(g_ptr, th_ptr, offs, offs < n, eta, RULE, WITH_EPS, False)
    at = part_ptr + part_off + tl.program_id(0)
    tl.store(at, acc)
    if WITH_EPS:
        tl.store(at + part_row, eps)


@jit
def _sum_partials_kernel(part_ptr, out_ptr, n, BLOCK: tl.constexpr):
    # One program per row of partials, fixed order: deterministic, and tiny next to the first
    # pass (n = numel / 4096).
    row = tl.program_id(0)
    acc = tl.full([BLOCK], 0.0, tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(part_ptr + row * n + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr + row, _sum(acc))


def _sum_sq_triton(thetas: Sequence[Tensor], grads: Sequence[Tensor], rule_id: int, eta: float,
                   device: torch.device, with_eps_sq: bool) -> Tensor:
    prepare(device)
    operands = [grads, thetas] if rule_id == 1 else [grads]
    launches = plan(operands)
    total = sum(l.grid for l in launches)
    rows = 2 if with_eps_sq else 1
    out = torch.zeros((2,) if with_eps_sq else (), dtype=torch.float32, device=device)
    if total == 0:
        return out
    partials = torch.empty(rows, total, dtype=torch.float32, device=device)
    off = 0
    with device_guard(device):
        for l in launches:
            g, th = l.carriers[0], l.carriers[-1]
            _sum_sq_kernel[(l.grid,)](g, th, partials, off, total, l.numel, eta, l.table_arg(),
                                      l.count, RULE=rule_id, WITH_EPS=with_eps_sq,
                                      NROWS=len(operands), **l.meta())
            off += l.grid
        block = block_size(total)
        _sum_partials_kernel[(rows,)](partials, out, total, BLOCK=block, **launch_options(block))
    return out


@torch.no_grad()
def sum_sq(thetas: Sequence[Tensor], grads: Sequence[Tensor], *, rule: str, eta: float = 0.0,
           device=None, with_eps_sq: bool = False) -> Tensor:
    """Sum of w(theta, g) * g^2 over the lists, float32 0-d tensor on their device.

    ``with_eps_sq``: also sum (w g)^2 (the squared norm of the perturbation before its scale)
    in the same pass; the result is then a float32 tensor [sum w g^2, sum (w g)^2].
    ``thetas`` is read only by the adaptive rule. Empty lists give zeros on ``device`` (default
    CPU). Triton for CUDA tensors, the torch reference elsewhere (see ``TRAM_KERNELS``).
    """
    rule_id = check_rule(rule)
    dev = check_lists("sum_sq", thetas=thetas, grads=grads)
    if dev is None:
        return torch.zeros((2,) if with_eps_sq else (), dtype=torch.float32, device=device)
    used = [grads, thetas] if rule == "adaptive" else [grads]
    if backend(dev, list_dtypes(*used)) == "triton":
        check_triton_dtypes("sum_sq", grads=grads, thetas=used[-1] if rule == "adaptive" else None)
        return _sum_sq_triton(thetas, grads, rule_id, float(eta), dev, bool(with_eps_sq))
    return sum_sq_reference(thetas, grads, rule=rule, eta=eta, device=device,
                            with_eps_sq=with_eps_sq)
