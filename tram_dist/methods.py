"""The methods of the paper's tables by name: the optimizer and its trust region."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .optim import ASAM, SAM, TRAM, FisherSAM, TRAMFisher
from .trust_region import NoisyInputs, PretrainedParams, PreviousParams

METHODS = ("adamw", "sam", "asam", "fsam", "tram-x", "tram-theta-prev", "tram-theta0", "tram-fisher")


def build_method(method: str, model, *, lr: float, betas=(0.9, 0.99), weight_decay: float = 0.0,
                 eps: float = 1e-8, sigma: float = 1e-5, nu: float = 1e-5, rho: Optional[float] = None,
                 eta: Optional[float] = None, noise: str = "normal", on_nonfinite: str = "skip",
                 engine=None, base_optimizer=torch.optim.AdamW) -> Tuple[torch.optim.Optimizer, object]:
    """Return ``(optimizer, trust_region)`` for one of ``METHODS``.

    The base (inner) optimizer is AdamW by default, as in the paper (Section 4: "all training
    uses Adam as the inner optimizer"); another optimizer class gets ``lr`` and
    ``weight_decay`` only."""
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
        return (TRAMFisher(params, base_optimizer, rho=radius(0.1), eta=fisher_eta(), **wrap, **base),
                NoisyInputs(sigma, noise))
    opt = TRAM(params, base_optimizer, nu=nu, **wrap, **base)
    if method == "tram-x":
        return opt, NoisyInputs(sigma, noise)
    if method == "tram-theta-prev":
        return opt, PreviousParams()
    return opt, PretrainedParams()
