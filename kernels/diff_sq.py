"""diff_sq: the squared norm of what a perturbation actually wrote (a metric, not the hot path).

    diff_sq(params, sources) -> float32 0-d tensor: sum of (params[i] - round(sources[i]))^2

``sources[i]`` is rounded to ``params[i]``'s dtype first, so the result is the change seen by
the next forward: with bf16 working parameters and an fp32 master, theta + eps rounds back to
theta wherever eps is below half a bf16 ulp, and that part of eps counts as not applied.

It runs once per step on the torch path only (two reads of the perturbed slices, chunked like
the references: at most two CHUNK float32 buffers of scratch), never on the ascent itself.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ._common import check_lists, windows


def diff_sq(params: Sequence[Tensor], sources: Sequence[Tensor], *, device=None) -> Tensor:
    dev = check_lists("diff_sq", params=params, sources=sources)
    if dev is None:
        return torch.zeros((), dtype=torch.float32, device=device)
    total = torch.zeros((), dtype=torch.float32, device=dev)
    for p, s in zip(params, sources):
        for pw, sw in windows(p, s):
            seen = sw.to(pw.dtype).float() if sw.dtype != pw.dtype else sw.float()
            delta = pw.float() - seen
            total += delta.mul_(delta).sum()
    return total
