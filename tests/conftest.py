"""Shared fixtures: tiny models built from configs (no download), small batches."""
import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # CPU tests; gloo must not move models to a GPU
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
