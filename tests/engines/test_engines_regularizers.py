"""World-size invariance of Table 3's trust-region regularizers (TRPO, R3F, MESA, alone and
under ASAM): DDP, FSDP2, ZeRO-2 and ZeRO-3 on 2 ranks equal one process, with the tolerances
of test_engines_invariance (fp32: 1e-5 relative). The penalty's KL is compared as d is there:
a KL of two nearby distributions moves by at most 2 sqrt(2 KL) rtol when the logits move by rtol.
"""
import math

import pytest

import engines_harness as H

STEPS = 3
FP32_RTOL = 1e-5
ENGINES = ("ddp", "fsdp2", "zero2", "zero3")


@pytest.fixture(scope="module")
def runs():
    single = H.run_single(H.REGULARIZER_METHODS, STEPS)
    world2 = H.spawn(H.run_jobs, 2, [(e, m, 1) for e in ENGINES for m in H.REGULARIZER_METHODS], STEPS)
    return single, world2


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("method", H.REGULARIZER_METHODS)
def test_regularizers_two_ranks_equal_single_process(runs, engine, method):
    single, world2 = runs
    ref, got = single[("single", method)], world2[(engine, method, 1)]
    rel = H.max_rel_diff(got["params"], ref["params"])
    assert rel <= FP32_RTOL, f"{engine} {method}: parameters differ by {rel:.2e}"
    keys = ("loss", "perturbed_loss", "grad_norm", "eps_norm", "eps_applied")
    for key in keys:
        worst = H.metric_rel_diff(got["metrics"], ref["metrics"], key)
        assert worst is None or worst <= FP32_RTOL, f"{engine} {method}: {key} differs by {worst:.2e}"
    for a, b in zip(got["metrics"], ref["metrics"]):
        kl = abs(b["penalty"])
        tol = FP32_RTOL * kl + 2 * math.sqrt(2 * kl) * FP32_RTOL
        assert abs(a["penalty"] - b["penalty"]) <= tol, (engine, method, a["penalty"], b["penalty"])
    assert ref["metrics"][-1]["penalty"] > 1e-7  # the penalty is active in these runs
