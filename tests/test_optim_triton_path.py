"""The core optimizer suite again with the Triton kernels forced (interpreted on CPU)."""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(__file__)


def test_optimizer_suite_passes_with_triton_kernels():
    pytest.importorskip("triton")
    env = {**os.environ, "TRAM_KERNELS": "triton", "TRITON_INTERPRET": "1"}
    # the optimizer-level suites that reach every kernel call site (perturb, restore, swap-in,
    # sums of squares): test_step.py and test_optim_api.py drive the same calls (the API contract
    # around them) and are left out for the suite's time budget; tests/kernels checks each kernel
    # against its reference. The EMA(0) test here adds no other call site (~18 s interpreted).
    files = ["test_optim_formulas.py", "test_trust_region.py"]
    slow = "test_ema_with_zero_decay_equals_previous_params_and_ema_update_formula"
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", f"not ({slow})",
                          *[os.path.join(HERE, f) for f in files]],
                         cwd=os.path.dirname(HERE), env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "failed" not in out.stdout and "1 deselected" in out.stdout
