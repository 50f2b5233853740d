"""Divergences between a target and the current predictive distribution.

All are computed under ``no_grad`` in float32, over the tokens that have labels, in chunks
of tokens so that no second full ``batch x seq x vocab`` float32 copy ever exists: only a
``chunk x vocab`` float32 block (bounded by ``chunk_bytes``) is alive at a time.

Each function returns ``(sum, count)``: the sum over valid tokens of the per-token value and
the number of valid tokens, so micro-batches and ranks combine into a token-weighted mean.

* ``kl`` (Eq. 4 and 5): per token sum_v P log(P / Q) with P the target and Q the current
  distribution (``direction="forward"``); ``"reverse"`` is KL(Q || P); ``"symmetric"`` is
  KL(P || Q) + KL(Q || P), as in R3F.
* ``l2``: per token Euclidean distance ||P - Q||_2 between the probability vectors.
* ``mmd``: squared maximum mean discrepancy between the set of target and the set of current
  probability vectors with the inverse multiquadric kernel k(a, b) = C / (C + ||a - b||^2)
  (Gretton et al. 2012; Tolstikhin et al. 2018), unbiased estimate. MMD is a statistic of
  a whole set: it is computed per micro-batch and weighted by its token count.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_CHUNK_BYTES = 64 * 2**20

KL_DIRECTIONS = ("forward", "reverse", "symmetric")


def token_mask(logits: Tensor, labels: Optional[Tensor], attention_mask: Optional[Tensor] = None,
               *, causal: bool) -> Tensor:
    """Positions of ``logits`` whose prediction has a label.

    causal LM: the logits at position i predict the label at i + 1 (HF shifts inside the
    loss), so position i counts when labels[i + 1] != -100 (and is not padding); the last
    position never counts. Sequence classification (2-D logits): every example with a label.
    """
    if logits.dim() == 2:
        if labels is None:
            return torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
        return (labels != -100).reshape(-1)
    mask = torch.zeros(logits.shape[:2], dtype=torch.bool, device=logits.device)
    if causal:
        if labels is None:
            valid = torch.ones_like(mask[:, 1:]) if attention_mask is None else attention_mask[:, 1:].bool()
        else:
            valid = labels[:, 1:] != -100
            if attention_mask is not None:
                valid = valid & attention_mask[:, 1:].bool()
        mask[:, :-1] = valid
    else:
        mask = (labels != -100) if labels is not None else torch.ones_like(mask)
        if attention_mask is not None:
            mask = mask & attention_mask.bool()
    return mask


def _rows(logits: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
    flat = logits.reshape(-1, logits.shape[-1])
    return flat, mask.reshape(-1).nonzero().squeeze(1)


def _chunks(index: Tensor, vocab: int, chunk_bytes: int):
    # a few float32 blocks of (chunk x vocab) are alive at once; keep each under chunk_bytes
    step = max(1, chunk_bytes // (4 * vocab))
    for start in range(0, index.numel(), step):
        yield index[start:start + step]


@torch.no_grad()
def kl(target_logits: Tensor, current_logits: Tensor, mask: Tensor, *, direction: str = "forward",
       chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tuple[Tensor, int]:
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"KL direction must be one of {KL_DIRECTIONS}, got {direction!r}")
    tgt, index = _rows(target_logits, mask)
    cur = current_logits.reshape(-1, current_logits.shape[-1])
    total = torch.zeros((), dtype=torch.float32, device=target_logits.device)
    for idx in _chunks(index, tgt.shape[-1], chunk_bytes):
        # three float32 (chunk x vocab) blocks at most: log P, log Q, and their difference
        p = F.log_softmax(tgt[idx].float(), dim=-1)
        q = F.log_softmax(cur[idx].float(), dim=-1)
        diff = p - q                  # log P - log Q
        p.exp_()
        q.exp_()
        if direction == "forward":    # sum P (log P - log Q)
            total += torch.dot(p.view(-1), diff.view(-1))
        elif direction == "reverse":  # sum Q (log Q - log P)
            total -= torch.dot(q.view(-1), diff.view(-1))
        else:                         # KL(P||Q) + KL(Q||P) = sum (P - Q)(log P - log Q)
            total += torch.dot(p.sub_(q).view(-1), diff.view(-1))
        del p, q, diff
    return total, int(index.numel())


@torch.no_grad()
def l2(target_logits: Tensor, current_logits: Tensor, mask: Tensor, *,
       chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tuple[Tensor, int]:
    tgt, index = _rows(target_logits, mask)
    cur = current_logits.reshape(-1, current_logits.shape[-1])
    total = torch.zeros((), dtype=torch.float32, device=target_logits.device)
    for idx in _chunks(index, tgt.shape[-1], chunk_bytes):
        p = torch.softmax(tgt[idx].float(), dim=-1)
        p -= torch.softmax(cur[idx].float(), dim=-1)
        total += torch.linalg.vector_norm(p, dim=-1).sum()
        del p
    return total, int(index.numel())


def _imq_block_sum(a: Tensor, b: Tensor, scale: float) -> Tensor:
    d2 = (a * a).sum(-1, keepdim=True) + (b * b).sum(-1) - 2.0 * a @ b.T
    return (scale / (scale + d2.clamp_min_(0.0))).sum()


@torch.no_grad()
def mmd(target_logits: Tensor, current_logits: Tensor, mask: Tensor, *, scale: Optional[float] = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tuple[Tensor, int]:
    """Unbiased MMD^2 between {softmax(target)_i} and {softmax(current)_i} over valid tokens;
    kernel scale C defaults to 2 * vocab (Tolstikhin et al.'s 2 * dim * sigma^2, sigma = 1)."""
    tgt, index = _rows(target_logits, mask)
    cur = current_logits.reshape(-1, current_logits.shape[-1])
    n, vocab = int(index.numel()), tgt.shape[-1]
    zero = torch.zeros((), dtype=torch.float32, device=target_logits.device)
    if n < 2:
        return zero, n
    c = float(scale) if scale is not None else 2.0 * vocab
    blocks = list(_chunks(index, vocab, chunk_bytes // 4))
    xx, yy, xy = zero.clone(), zero.clone(), zero.clone()
    for i in blocks:
        p_i = torch.softmax(tgt[i].float(), -1)
        q_i = torch.softmax(cur[i].float(), -1)
        for j in blocks:
            p_j = torch.softmax(tgt[j].float(), -1)
            q_j = torch.softmax(cur[j].float(), -1)
            xx += _imq_block_sum(p_i, p_j, c)
            yy += _imq_block_sum(q_i, q_j, c)
            xy += _imq_block_sum(p_i, q_j, c)
    # k(a, a) = 1: drop the diagonal from the within-set sums (unbiased U-statistic)
    value = (xx - n) / (n * (n - 1)) + (yy - n) / (n * (n - 1)) - 2.0 * xy / (n * n)
    return value * n, n


DIVERGENCES: Dict[str, Callable] = {
    "kl": kl,
    "kl-forward": lambda t, c, m, **kw: kl(t, c, m, direction="forward", **kw),
    "kl-reverse": lambda t, c, m, **kw: kl(t, c, m, direction="reverse", **kw),
    "kl-symmetric": lambda t, c, m, **kw: kl(t, c, m, direction="symmetric", **kw),
    "l2": l2,
    "mmd": mmd,
}


def get_divergence(name_or_fn) -> Callable:
    if callable(name_or_fn):
        return name_or_fn
    try:
        return DIVERGENCES[name_or_fn]
    except KeyError:
        raise ValueError(f"unknown divergence {name_or_fn!r}; choose one of {sorted(DIVERGENCES)} "
                         f"or pass a callable (target_logits, current_logits, mask) -> (sum, count)") from None


class Partial:
    """A rank's contribution to a global quantity, summed over the data-parallel group in the
    same all-reduce as the perturbation norm (so TRAM adds one collective per step)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __repr__(self) -> str:
        return f"Partial({self.value!r})"
