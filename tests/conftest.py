"""Shared fixtures: tiny models built from configs (no download), small batches."""
import os

# what the caller asked for, before the line below hides GPUs (the FSDP1 tests read it)
os.environ.setdefault("TRAM_TEST_CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"))
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # CPU tests; gloo must not move models to a GPU
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
