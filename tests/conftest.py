"""Shared fixtures: tiny models built from configs (no download), small batches."""
import os

import pytest
import torch

# what the caller asked for, before the line below hides GPUs (the FSDP1 tests read it)
os.environ.setdefault("TRAM_TEST_CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"))
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # CPU tests; gloo must not move models to a GPU
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (small shared machines: no oversubscription, and the
    same threads for a run and its reference)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
