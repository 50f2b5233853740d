"""Objects prepared by Hugging Face accelerate, as ``TrainStep`` takes them.

``accelerator.prepare`` wraps the model (DDP, FSDP2) and the optimizer (``AcceleratedOptimizer``).
``TrainStep`` runs the whole step itself (both passes, the restore, the base optimizer's update),
so it steps the optimizer inside the wrapper; the prepared model and LR scheduler are used as
they are (the scheduler shares the inner optimizer's ``param_groups``).

Under accelerate's ``DeepSpeedPlugin`` the optimizer given to ``prepare`` ends up inside
DeepSpeed's ZeRO optimizer, which partitions it. Give ``prepare`` the *base* optimizer (e.g.
``torch.optim.AdamW``), then wrap the partitioned base in the method with ``tram_on_deepspeed``::

    model, opt, loader, schedule = accelerator.prepare(model, AdamW(...), loader, schedule)
    opt, trust_region, engine = tram_on_deepspeed(model, opt, "tram-theta-prev", nu=1e-5)
    step = TrainStep(model, opt, trust_region=trust_region, engine=engine, max_grad_norm=1.0)

A TRAM optimizer given to ``prepare`` itself is refused by ``TrainStep`` (DeepSpeed would partition
the wrapper, where TRAM cannot perturb and restore the partitions). ``TramTrainer`` under
``TrainingArguments(deepspeed=...)`` does the same through ``zero_method``.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

# accelerate's wrappers, by class name: tram_dist never imports accelerate
_WRAPPERS = ("AcceleratedOptimizer",)
_DEEPSPEED_WRAPPERS = ("DeepSpeedOptimizerWrapper",)
# options of build_method that the base optimizer given to accelerate already holds
_BASE_OPTIONS = ("lr", "betas", "eps", "weight_decay", "base_optimizer", "engine")


def unwrap_optimizer(optimizer):
    """The optimizer inside accelerate's wrapper (``optimizer`` itself when not wrapped)."""
    inner = optimizer
    while True:
        name = type(inner).__name__
        if name in _DEEPSPEED_WRAPPERS:
            raise TypeError(
                "this optimizer was prepared by accelerate's DeepSpeedPlugin: it sits inside DeepSpeed's ZeRO "
                "optimizer, where TRAM cannot perturb and restore the partitions. Give accelerator.prepare the "
                "base optimizer (e.g. torch.optim.AdamW), then opt, trust_region, engine = "
                "tram_dist.integrations.accelerate.tram_on_deepspeed(model, opt, method, ...) and "
                "TrainStep(model, opt, trust_region=trust_region, engine=engine)")
        if name not in _WRAPPERS or not hasattr(inner, "optimizer"):
            return inner
        inner = inner.optimizer


def zero_method(ds_engine, template) -> Tuple[Any, Any]:
    """``(optimizer, engine)`` for ``TrainStep`` on a ``DeepSpeedEngine`` whose ZeRO optimizer
    partitions a torch base optimizer: a ``ZeroEngine`` of ``ds_engine``, and ``template``'s
    method (its class, hyperparameters and ``on_nonfinite``) rebuilt around the partitioned
    base, as ``tram_dist.engines.deepspeed.initialize`` builds it. A ``template`` that is not a
    ``PerturbedOptimizer`` (the AdamW baseline) gives ZeRO's optimizer itself. The new
    optimizer shares the base's ``param_groups``, so a scheduler on the base drives it."""
    from ..engines.deepspeed import ZeroEngine
    from ..optim import PerturbedOptimizer

    engine = ZeroEngine(ds_engine)
    if not isinstance(template, PerturbedOptimizer):
        return ds_engine.optimizer, engine
    cls = type(template)
    hyper = {k: template.defaults[k] for k in cls.hyperparameters}
    opt = cls(None, ds_engine.optimizer.optimizer, engine=engine, on_nonfinite=template.on_nonfinite, **hyper)
    return opt, engine


def tram_on_deepspeed(model, optimizer, method: str = "tram-theta-prev", **method_kwargs
                      ) -> Tuple[Any, Optional[Any], Any]:
    """The method ``method`` on what ``accelerator.prepare`` returned under ``DeepSpeedPlugin``.

    Args:
        model: the prepared ``deepspeed.DeepSpeedEngine`` (ZeRO stage 1, 2 or 3).
        optimizer: the prepared optimizer (accelerate's ``DeepSpeedOptimizerWrapper``, or
            ``model.optimizer``); the optimizer given to ``prepare`` must be the base optimizer
            (``torch.optim.AdamW``: lr, betas, eps, weight decay and param groups are its own).
        method: a name of ``tram_dist.METHODS`` (``"adamw"``: the base optimizer alone).
        **method_kwargs: the method's options as ``build_method`` takes them (``nu``, ``rho``,
            ``eta``, ``sigma``, ``noise``, ``radius_scale``, ``lam``, ``decay``,
            ``logit_scale``, ``on_nonfinite``), not the base optimizer's.

    Returns ``(optimizer, trust_region, engine)``: run
    ``TrainStep(model, optimizer, trust_region=trust_region, engine=engine, max_grad_norm=...)``.
    The optimizer shares the base's ``param_groups``: the LR scheduler accelerate prepared keeps
    driving it. DeepSpeed's own clipping must be off (``"gradient_clipping": 0`` in the config,
    or "auto" there and ``DeepSpeedPlugin(..., gradient_clipping=0.0)``; DeepSpeed's default
    without the field is 1.0, and accelerate fills "auto" with 1.0);
    clip with ``TrainStep(max_grad_norm=...)``, inside the step, after the restore.
    """
    import torch

    from ..methods import METHODS, build_method
    from ..optim import PerturbedOptimizer

    if method not in METHODS:
        raise ValueError(f"tram_on_deepspeed: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    given = sorted(k for k in method_kwargs if k in _BASE_OPTIONS)
    if given:
        raise ValueError(f"tram_on_deepspeed: {given} belong to the base optimizer given to accelerator.prepare "
                         f"(build it with them); method_kwargs are the method's options")
    if not hasattr(model, "zero_optimization_stage"):
        raise TypeError(f"tram_on_deepspeed: model must be the DeepSpeedEngine accelerator.prepare returned "
                        f"under DeepSpeedPlugin, got {type(model).__name__}")
    zero = model.optimizer
    inner = optimizer
    while type(inner).__name__ in _WRAPPERS + _DEEPSPEED_WRAPPERS and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    if zero is None or inner is not zero:
        raise ValueError("tram_on_deepspeed: optimizer is not the one accelerator.prepare returned with this "
                         "DeepSpeedEngine (prepare the model and the base optimizer in the same call)")
    base = getattr(zero, "optimizer", None)
    if isinstance(base, PerturbedOptimizer):
        raise TypeError(f"tram_on_deepspeed: accelerator.prepare was given {type(base).__name__}, which ZeRO now "
                        f"partitions as if it were the base optimizer; give prepare the base optimizer "
                        f"(e.g. torch.optim.AdamW) and name the method here")
    if not isinstance(base, torch.optim.Optimizer):
        raise TypeError(f"tram_on_deepspeed: ZeRO's optimizer holds {type(base).__name__}, not a torch optimizer "
                        f"(a DeepSpeed config 'optimizer' section?); remove that section and give "
                        f"accelerator.prepare a torch optimizer")
    clip = float(model.gradient_clipping() or 0.0)
    if clip > 0:
        raise ValueError(f"tram_on_deepspeed: DeepSpeed clips the gradients at {clip:g} (DeepSpeed's default "
                         f"without a gradient_clipping field is 1.0, and accelerate fills 'auto' with 1.0); set "
                         f"\"gradient_clipping\": 0 in the DeepSpeed config or DeepSpeedPlugin(..., "
                         f"gradient_clipping=0.0), and clip with TrainStep(max_grad_norm={clip:g}) (inside the "
                         f"step, after the restore)")
    # the method's class, options and trust region, as build_method makes them for this name; the
    # template's own base optimizer (on a placeholder parameter) is dropped
    placeholder = [torch.nn.Parameter(torch.zeros(1))]
    template, trust_region = build_method(method, placeholder, lr=0.0, **method_kwargs)
    opt, engine = zero_method(model, template)
    return opt, trust_region, engine


__all__ = ["tram_on_deepspeed", "unwrap_optimizer", "zero_method"]
