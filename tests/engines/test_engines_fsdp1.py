"""FSDP1 (FullyShardedDataParallel(use_orig_params=True)): same guarantees as FSDP2.

FSDP1 refuses to run on CPU ("FSDP needs a non-CPU accelerator device"), so these tests run
only where CUDA is present (NCCL, one GPU per rank); elsewhere they are skipped.
"""
import os
import subprocess
import sys

import pytest
import torch

import engines_harness as H

METHODS = ("adamw", "sam", "tram-x", "tram-theta-prev", "tram-fisher")


def _original_cuda_env():
    value = os.environ.get("TRAM_TEST_CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"))
    return None if value == "<unset>" else value


def _gpu_count() -> int:
    if torch.version.cuda is None:
        return 0
    env = dict(os.environ)
    original = _original_cuda_env()
    if original is None:
        env.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        env["CUDA_VISIBLE_DEVICES"] = original
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                         env=env, capture_output=True, text=True, timeout=120)
    return int(out.stdout.strip() or 0) if out.returncode == 0 else 0


GPUS = _gpu_count()
pytestmark = pytest.mark.skipif(GPUS == 0, reason="FSDP1 needs CUDA (it refuses CPU); no GPU here")


@pytest.fixture(scope="module")
def runs():
    world = min(2, GPUS)
    single = H.run_single(METHODS, 3)
    got = H.spawn(H.run_jobs, world, [("fsdp1", m, 1) for m in METHODS], 3, backend="nccl",
                  env={"CUDA_VISIBLE_DEVICES": _original_cuda_env()})
    return world, single, got


@pytest.mark.parametrize("method", METHODS)
def test_fsdp1_equals_single_process(runs, method):
    world, single, got = runs
    r, ref = got[("fsdp1", method, 1)], single[("single", method)]
    # CUDA matmuls (TF32 off by default for fp32 matmul in torch) against CPU: 1e-4
    err = H.max_rel_diff(r["params"], ref["params"])
    assert err <= 1e-4, f"fsdp1/{method} on {world} GPUs: parameters differ by {err:.2e}"
    worst = H.metric_rel_diff(r["metrics"], ref["metrics"], "grad_norm")
    assert worst is None or worst <= 1e-4, worst
