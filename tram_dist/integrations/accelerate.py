"""Objects prepared by Hugging Face accelerate, as ``TrainStep`` takes them.

``accelerator.prepare`` wraps the model (DDP, FSDP2) and the optimizer (``AcceleratedOptimizer``).
``TrainStep`` runs the whole step itself (both passes, the restore, the base optimizer's update),
so it steps the optimizer inside the wrapper; the prepared model and LR scheduler are used as
they are (the scheduler shares the inner optimizer's ``param_groups``).

Under accelerate's ``DeepSpeedPlugin`` the optimizer ends up inside DeepSpeed's ZeRO optimizer,
where TRAM cannot perturb or restore the partitions; that case is refused with the ways that
work: build the ZeRO engine with ``tram_dist.engines.deepspeed.initialize``, or, with
``transformers.Trainer``, use ``TramTrainer`` with ``TrainingArguments(deepspeed=...)`` (it hands
accelerate the base optimizer and wraps the partitioned base in TRAM on a ``ZeroEngine``).
"""
from __future__ import annotations

# accelerate's wrappers, by class name: tram_dist never imports accelerate
_WRAPPERS = ("AcceleratedOptimizer",)
_DEEPSPEED_WRAPPERS = ("DeepSpeedOptimizerWrapper",)


def unwrap_optimizer(optimizer):
    """The optimizer inside accelerate's wrapper (``optimizer`` itself when not wrapped)."""
    inner = optimizer
    while True:
        name = type(inner).__name__
        if name in _DEEPSPEED_WRAPPERS:
            raise TypeError(
                "this optimizer was prepared by accelerate's DeepSpeedPlugin, which puts it inside "
                "DeepSpeed's ZeRO optimizer where TRAM cannot perturb and restore the partitions; "
                "build the engine with ds_engine, opt, _ = tram_dist.engines.deepspeed.initialize("
                "model, TRAM, accelerator.state.deepspeed_plugin.deepspeed_config, ...) and pass "
                "TrainStep(ds_engine, opt), or, under transformers.Trainer, use "
                "tram_dist.integrations.transformers.TramTrainer with TrainingArguments(deepspeed=...)")
        if name not in _WRAPPERS or not hasattr(inner, "optimizer"):
            return inner
        inner = inner.optimizer


__all__ = ["unwrap_optimizer"]
