"""The examples run as written, and the README shows them as they are."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_fsdp2_example_is_the_readmes_and_runs_on_two_cpu_ranks():
    code = (ROOT / "examples" / "fsdp2_tram.py").read_text()
    assert code[code.index("import os"):] in (ROOT / "README.md").read_text()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "examples" / "fsdp2_tram.py")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("loss ")]
    assert len(lines) == 3 and lines[0].split()[3] == "0.00e+00", lines  # d_theta(t-1) = 0 at step 1


def test_accelerate_example_runs_on_two_processes():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "examples" / "accelerate_tram.py")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 processes (DistributedType.MULTI_CPU), 8 steps" in r.stdout, r.stdout
    lines = [line for line in r.stdout.splitlines() if line.startswith("loss ")]
    assert len(lines) == 8 and lines[0].split()[3] == "0.00e+00", lines  # printed once, by the main process


def test_train_step_steps_the_optimizer_inside_accelerates_wrapper():
    import pytest
    import torch
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    from tram_dist import TRAM, PreviousParams, TrainStep

    model = torch.nn.Linear(4, 2)
    opt = TRAM(model.parameters(), torch.optim.AdamW, lr=1e-3)
    model, prepared = Accelerator(cpu=True).prepare(model, opt)
    assert isinstance(prepared, AcceleratedOptimizer)
    step = TrainStep(model, prepared, trust_region=PreviousParams())
    assert step.optimizer is opt and step.perturbed

    class DeepSpeedOptimizerWrapper:  # accelerate's DeepSpeedPlugin wrapper, by name
        optimizer = opt

    with pytest.raises(TypeError, match="tram_dist.engines.deepspeed.initialize"):
        TrainStep(model, DeepSpeedOptimizerWrapper(), trust_region=PreviousParams())
