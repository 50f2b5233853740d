"""TramTrainer tests: CPU + gloo, GPUs hidden; trainer_harness.py is importable here and in
the ranks the DDP test spawns."""
import os
import sys

import pytest

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # tests/conftest.py's, for every test here
    yield


@pytest.fixture(scope="session")
def deepspeed_runs(tmp_path_factory):
    """One launch of 2 CPU ranks for every DeepSpeed job here (DeepSpeed's start-up on the ranks
    costs ~25 s; each job a few seconds): ``{"trainer": {job: ...}, "accelerate": {job: ...}}``
    for deepspeed_harness.JOBS (TramTrainer) and accelerate_ds_harness.JOBS (an Accelerator
    with DeepSpeedPlugin and TrainStep)."""
    pytest.importorskip("deepspeed")
    import accelerate_ds_harness as A
    import deepspeed_harness as D
    import trainer_harness as H

    return H.spawn(A.all_jobs, 2, D.JOBS, str(tmp_path_factory.mktemp("deepspeed")), A.JOBS)
