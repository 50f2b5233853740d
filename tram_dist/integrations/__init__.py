"""Adapters to other training frameworks.

``tram_dist.integrations.transformers.TramTrainer``: a ``transformers.Trainer`` that runs a
method of ``tram_dist.methods`` (TRAM, SAM, ...) through ``TrainStep``. Each adapter is its
own submodule and imports its framework only when imported, so ``import tram_dist`` never
needs transformers' Trainer or accelerate.
"""
