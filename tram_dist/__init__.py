"""TRAM (Trust Region Aware Minimization, Sherborne et al., ICLR 2024) and the SAM family,
as sharded optimizers for large-model fine-tuning."""
from .divergence import Partial
from .methods import METHODS, build_method
from .optim import (ASAM, SAM, TRAM, Descent, FisherSAM, NonFiniteAscentError, PerturbedOptimizer,
                    TRAMFisher, TRAMReleased)
from .regularizers import TrustRegionPenalty
from .step import StepMetrics, TrainStep
from .trust_region import EMAParams, NoisyInputs, PretrainedParams, PreviousParams

__version__ = "0.1.0"


def __getattr__(name):
    # the run pulls in the data and engine layers: imported on first use only
    if name in ("Run", "RunConfig", "ConfigError", "NonFiniteRun"):
        from . import run

        return getattr(run, name)
    raise AttributeError(f"module 'tram_dist' has no attribute {name!r}")


__all__ = [
    "TRAM", "SAM", "ASAM", "FisherSAM", "TRAMFisher", "TRAMReleased", "Descent", "PerturbedOptimizer",
    "NonFiniteAscentError", "TrustRegionPenalty",
    "NoisyInputs", "PreviousParams", "PretrainedParams", "EMAParams", "Partial",
    "TrainStep", "StepMetrics", "build_method", "METHODS", "Run", "RunConfig",
]
