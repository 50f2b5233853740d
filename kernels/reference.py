"""Plain-torch reference ops: the test oracle and the CPU path (see the package docstring)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


def _weight(theta: Optional[Tensor], g32: Tensor, rule: str, eta: float) -> Tensor:
    if rule == "identity":
        return torch.ones_like(g32)
    if rule == "adaptive":
        t = theta.float().abs() + eta
        return t * t
    if rule == "fisher":
        return 1.0 / (1.0 + eta * g32 * g32)
    raise ValueError(f"unknown perturbation rule {rule!r}; expected identity, adaptive or fisher")


@torch.no_grad()
def sum_sq(thetas: Sequence[Tensor], grads: Sequence[Tensor], *, rule: str, eta: float = 0.0,
           device=None) -> Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    total = torch.zeros((), dtype=torch.float32, device=grads[0].device)
    for theta, g in zip(thetas, grads):
        g32 = g.float()
        total += (_weight(theta, g32, rule, eta) * g32 * g32).sum()
    return total


@torch.no_grad()
def perturb_(params: Sequence[Tensor], grads: Sequence[Tensor], *, scale: float, rule: str,
             eta: float = 0.0, backups: Optional[Sequence[Tensor]] = None,
             sources: Optional[Sequence[Tensor]] = None) -> None:
    for i, (p, g) in enumerate(zip(params, grads)):
        theta = sources[i] if sources is not None else p
        g32 = g.float()
        new = theta.float() + scale * _weight(theta, g32, rule, eta) * g32
        if backups is not None:
            backups[i].copy_(p)
        p.copy_(new)


@torch.no_grad()
def restore_(params: Sequence[Tensor], backups: Sequence[Tensor]) -> None:
    for p, b in zip(params, backups):
        p.copy_(b)


@torch.no_grad()
def swap_in_(params: Sequence[Tensor], targets: Sequence[Tensor], backups: Sequence[Tensor]) -> None:
    for p, t, b in zip(params, targets, backups):
        b.copy_(p)
        p.copy_(t)
