"""A fine-tuning run as a library object: ``RunConfig`` (typed, validated, from_yaml) and
``Run`` (train, evaluate, save_checkpoint, resume, export)."""
from .config import ConfigError, RunConfig
from .run import NonFiniteRun, Run

__all__ = ["Run", "RunConfig", "ConfigError", "NonFiniteRun"]
