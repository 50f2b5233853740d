"""The methods of the paper's tables by name: the optimizer and its trust region."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .optim import ASAM, SAM, TRAM, Descent, FisherSAM, TRAMFisher, TRAMReleased
from .regularizers import (MESA_DECAY, MESA_LAMBDA, R3F_LAMBDA, TRPO_LAMBDA, TrustRegionPenalty,
                           check_unit_interval)
from .trust_region import EMAParams, NoisyInputs, PretrainedParams, PreviousParams

# The trust-region regularizers (loss + lambda * d), alone (on Adam) and under ASAM's ascent.
REGULARIZERS = ("trpo", "r3f", "mesa")
# The authors' released ascent (TRAMReleased), beside the paper's Eq. 7 (TRAM).
RELEASED = ("tram-released-x", "tram-released-theta-prev")
METHODS = ("adamw", "sam", "asam", "fsam", "tram-x", "tram-theta-prev", "tram-theta0", "tram-fisher",
           *REGULARIZERS, *(f"asam+{r}" for r in REGULARIZERS), *RELEASED)


def build_method(method: str, model, *, lr: float, betas=(0.9, 0.99), weight_decay: float = 0.0,
                 eps: float = 1e-8, sigma: float = 1e-5, nu: float = 1e-5, rho: Optional[float] = None,
                 eta: Optional[float] = None, noise: str = "normal", on_nonfinite: str = "skip",
                 radius_scale: float = 1.0, lam: Optional[float] = None,
                 decay: float = MESA_DECAY, logit_scale: Optional[float] = None,
                 engine=None, base_optimizer=torch.optim.AdamW) -> Tuple[torch.optim.Optimizer, object]:
    """Return ``(optimizer, trust_region)`` for one of ``METHODS``.

    The base (inner) optimizer is AdamW by default, as in the paper (Section 4: "all training
    uses Adam as the inner optimizer"); another optimizer class gets ``lr`` and
    ``weight_decay`` only. ``radius_scale`` (lambda) multiplies d in TRAM's radius
    lambda * d + nu (and rho in TRAM-Fisher's); 1 is the paper's equation.

    The regularizer rows (``trpo``, ``r3f``, ``mesa`` and ``asam+`` each) return a
    ``TrustRegionPenalty`` as the trust region: ``lam`` is its weight (default: TRPO 0.1,
    R3F 1, MESA 0.1), ``sigma`` / ``noise`` R3F's input noise, ``decay`` MESA's EMA decay."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    params = model if isinstance(model, (list, tuple)) else [p for p in model.parameters() if p.requires_grad]
    if base_optimizer in (torch.optim.AdamW, torch.optim.Adam):
        base = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps)
    else:
        base = dict(lr=lr, weight_decay=weight_decay)
    wrap = dict(on_nonfinite=on_nonfinite, engine=engine)

    def radius(default):
        return default if rho is None else rho

    def fisher_eta():
        return 0.1 if eta is None else eta

    if logit_scale is not None and method not in RELEASED:
        raise ValueError(f"{method}: logit_scale multiplies the released code's d'; only "
                         f"{', '.join(RELEASED)} take it (the paper's TRAM: radius_scale)")
    if method in RELEASED:
        if radius_scale != 1.0:
            raise ValueError(f"{method}: the released code's ascent is sized by logit_scale, not radius_scale")
        opt = TRAMReleased(params, base_optimizer, logit_scale=1.0 if logit_scale is None else logit_scale,
                           **wrap, **base)
        return opt, (NoisyInputs(sigma, noise) if method == "tram-released-x" else PreviousParams())
    if radius_scale != 1.0 and not method.startswith("tram-"):
        raise ValueError(f"{method}: radius_scale sizes TRAM's ascent (lambda * d + nu); only the "
                         f"tram-* methods take it (SAM-style methods set rho)")
    base_name, _, regularizer = method.rpartition("+") if "+" in method else ("", "", method)
    if regularizer in REGULARIZERS:
        penalty = _penalty(regularizer, lam=lam, sigma=sigma, noise=noise, decay=decay)
        if base_name == "asam":
            return ASAM(params, base_optimizer, rho=radius(0.5), eta=0.01 if eta is None else eta,
                        **wrap, **base), penalty
        return Descent(params, base_optimizer, **wrap, **base), penalty
    if lam is not None:
        raise ValueError(f"{method}: lam is the weight of a regularizer's penalty; only "
                         f"{', '.join(m for m in METHODS if m.split('+')[-1] in REGULARIZERS)} take it")
    if method == "adamw":
        return base_optimizer(params, **base), None
    if method == "sam":
        return SAM(params, base_optimizer, rho=radius(0.05), **wrap, **base), None
    if method == "asam":
        return ASAM(params, base_optimizer, rho=radius(0.5), eta=0.01 if eta is None else eta,
                    **wrap, **base), None
    if method == "fsam":
        return FisherSAM(params, base_optimizer, rho=radius(0.1), eta=fisher_eta(), **wrap, **base), None
    if method == "tram-fisher":
        return (TRAMFisher(params, base_optimizer, rho=radius(0.1), eta=fisher_eta(),
                           radius_scale=radius_scale, **wrap, **base),
                NoisyInputs(sigma, noise))
    opt = TRAM(params, base_optimizer, nu=nu, radius_scale=radius_scale, **wrap, **base)
    if method == "tram-x":
        return opt, NoisyInputs(sigma, noise)
    if method == "tram-theta-prev":
        return opt, PreviousParams()
    return opt, PretrainedParams()


def _penalty(name: str, *, lam, sigma, noise, decay) -> TrustRegionPenalty:
    if name == "trpo":
        return TrustRegionPenalty(PreviousParams(), TRPO_LAMBDA if lam is None else lam, name="trpo")
    if name == "mesa":
        check_unit_interval("mesa: decay", decay)
        return TrustRegionPenalty(EMAParams(decay), MESA_LAMBDA if lam is None else lam, name="mesa")
    return TrustRegionPenalty(NoisyInputs(sigma, noise), R3F_LAMBDA if lam is None else lam, name="r3f")
