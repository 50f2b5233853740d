"""TramTrainer tests: CPU + gloo, GPUs hidden; trainer_harness.py is importable here and in
the ranks the DDP test spawns."""
import os
import sys

import pytest
import torch

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.fixture(autouse=True)
def _one_thread():
    # small shared machines: no oversubscription, and the same threads for trainer and reference
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
