"""The examples run as written, and the README shows them as they are."""
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


@functools.lru_cache(maxsize=None)
def _accelerate_example(*args):
    """examples/accelerate_tram.py on 2 CPU processes under torchrun: (stdout, the (loss, d, radius)
    lines printed once, by the main process); run once per set of arguments."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "examples" / "accelerate_tram.py"), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line.split() for line in r.stdout.splitlines() if line.startswith("loss ")]
    return r.stdout, [(float(w[1]), float(w[3]), float(w[5])) for w in lines]


def test_accelerate_example_runs_on_two_processes():
    out, lines = _accelerate_example()
    assert "2 processes (DistributedType.MULTI_CPU), 8 steps" in out, out
    assert len(lines) == 8 and lines[0][1] == 0.0, lines  # d_theta(t-1) = 0 at step 1


def test_accelerate_example_with_deepspeed_zero2_matches_ddp():
    """--deepspeed configs/zero2.json: accelerate's DeepSpeedPlugin partitions AdamW, TRAM runs on the
    partitions (tram_on_deepspeed); the printed losses, d and radii are the DDP run's (to the printed
    digits: fp32 sums in another order can move the last one)."""
    pytest.importorskip("deepspeed")
    out, lines = _accelerate_example("--deepspeed", str(ROOT / "configs" / "zero2.json"))
    assert "2 processes (DistributedType.DEEPSPEED), 8 steps" in out, out
    _, ddp = _accelerate_example()
    assert len(lines) == len(ddp) == 8, lines
    for got, want in zip(lines, ddp):
        assert got[0] == pytest.approx(want[0], abs=1.5e-3), (got, want)  # printed as %.3f
        assert got[1:] == pytest.approx(want[1:], rel=1.1e-2, abs=1e-12), (got, want)  # as %.2e
    assert ddp[2][1] > 0  # the trust region moved: d is measured


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

    with pytest.raises(TypeError, match="tram_on_deepspeed"):
        TrainStep(model, DeepSpeedOptimizerWrapper(), trust_region=PreviousParams())
