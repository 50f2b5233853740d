"""The paper's trust-region regularizers (Table 3's TRPO, R3F and MESA rows): loss + lambda * d.

Where TRAM uses the trust-region distance d to size its ascent, these add it to the loss:

* ``trpo``  Eq. 3 with Eq. 4 (Schulman et al. 2015, as the paper applies it):
            L + lambda * KL(p_theta(t-1) || p_theta), lambda = 0.1 (Section 4).
* ``mesa``  Du et al. 2022: L + lambda * KL(p_ema || p_theta), the EMA of past parameters
            updated every step with decay 0.999 (Section 4). The paper states one lambda,
            0.1, for the regularizers it adds "to the loss"; MESA is "a variant of TRPO"
            there, so it gets the same 0.1 (MESA's own paper also uses a softmax temperature,
            which the TRAM paper does not mention: none here). Set ``lam`` to change it.
* ``r3f``   Aghajanyan et al. 2021, Eq. 5's trust region: L + lambda * (KL(p(x) || p(x + z)) +
            KL(p(x + z) || p(x))), z ~ N(0, sigma^2) or U(-sigma, sigma) on the input
            embeddings, sigma = 1e-5 and lambda = 1 (their defaults); the gradient flows
            through both forwards, as in their criterion.

Every KL is summed over the vocabulary and averaged over the labelled tokens of the global
batch, as TRAM's d is (so each micro-batch adds lambda * its KL sum / its token count, and its
token share weights the sum like the loss). R3F's own criterion divides its token sum by the
number of sequences instead; per token is the LM analogue of their per-example mean.

The target of TRPO and MESA is a ``ParamTarget`` (``PreviousParams``, ``EMAParams``) held
beside each parameter slice like TRAM's, so it shards with the parameters under every engine;
R3F's is ``NoisyInputs``. The penalty's target forward sees the same dropout masks as the
forward it is compared with (``TrainStep(target_dropout=...)``, see ``tram_dist.dropout``).
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from .trust_region import NoisyInputs, ParamTarget


class TrustRegionPenalty:
    """loss + lam * d(target, current), d a KL summed over the vocabulary per labelled token.

    target: a ``ParamTarget`` (the KL is KL(p_target || p_theta), the target forward without
        gradient) or ``NoisyInputs`` (the symmetric KL of p(x) and p(x + z), both with gradient).
    lam: the penalty's weight lambda (finite, >= 0).
    """

    def __init__(self, target, lam: float, *, name: str = "penalty"):
        if not isinstance(target, (ParamTarget, NoisyInputs)):
            raise TypeError(f"{name}: target must be a ParamTarget or NoisyInputs, got {target!r}")
        if not isinstance(lam, (int, float)) or isinstance(lam, bool) or not math.isfinite(lam) or lam < 0:
            raise ValueError(f"{name}: lambda (lam) must be a finite number >= 0, got {lam!r}")
        self.target = target
        self.lam = float(lam)
        self.name = name

    @property
    def noisy(self) -> bool:
        return isinstance(self.target, NoisyInputs)

    def __repr__(self) -> str:
        return f"TrustRegionPenalty({self.name}, target={self.target!r}, lam={self.lam})"

    def kl_sum(self, target_logits: Tensor, logits: Tensor, mask: Tensor) -> Tensor:
        """Sum over the masked tokens of the penalty's KL (differentiable)."""
        if self.noisy:
            return symmetric_kl_sum(target_logits, logits, mask)
        return kl_sum(target_logits.detach(), logits, mask)


def _masked_log_probs(logits: Tensor, mask: Tensor) -> Tensor:
    rows = logits[mask] if logits.dim() == mask.dim() + 1 else logits.reshape(-1, logits.shape[-1])[mask.reshape(-1)]
    return F.log_softmax(rows.float(), dim=-1)


def kl_sum(target_logits: Tensor, logits: Tensor, mask: Tensor) -> Tensor:
    """sum over masked tokens of KL(P || Q) = sum_v P (log P - log Q), P from ``target_logits``
    (no gradient), Q from ``logits``; float32."""
    log_p = _masked_log_probs(target_logits, mask)
    log_q = _masked_log_probs(logits, mask)
    return (log_p.exp() * (log_p - log_q)).sum()


def symmetric_kl_sum(a_logits: Tensor, b_logits: Tensor, mask: Tensor) -> Tensor:
    """sum over masked tokens of KL(A || B) + KL(B || A) = sum_v (A - B)(log A - log B)."""
    log_a = _masked_log_probs(a_logits, mask)
    log_b = _masked_log_probs(b_logits, mask)
    return ((log_a.exp() - log_b.exp()) * (log_a - log_b)).sum()


TRPO_LAMBDA = 0.1     # Section 4: "a coefficient of lambda = 0.1"
MESA_LAMBDA = 0.1     # the paper's regularizer coefficient (Section 4), MESA being TRPO's variant
MESA_DECAY = 0.999    # Section 4: "a decay factor of 0.999", updated every step
R3F_LAMBDA = 1.0      # Aghajanyan et al. 2021 (fairseq --r3f-lambda default)
R3F_SIGMA = 1e-5      # Aghajanyan et al. 2021 (fairseq --eps default)


def check_unit_interval(name: str, value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


__all__ = ["TrustRegionPenalty", "kl_sum", "symmetric_kl_sum", "TRPO_LAMBDA", "MESA_LAMBDA",
           "MESA_DECAY", "R3F_LAMBDA", "R3F_SIGMA"]
