"""World-size invariance of Table 3's trust-region regularizers (TRPO, R3F, MESA, alone and
under ASAM) and of the released code's ascent (tram-released-*): DDP, FSDP2, ZeRO-2 and ZeRO-3
on 2 ranks equal one process, with the tolerances
of test_engines_invariance (fp32: 1e-5 relative). The penalty's KL is compared as d is there:
a KL of two nearby distributions moves by at most 2 sqrt(2 KL) rtol when the logits move by rtol.
"""
import math

import pytest

import engines_harness as H

STEPS = 3
FP32_RTOL = 1e-5
ENGINES = ("ddp", "fsdp2", "zero2", "zero3")


METHODS = H.REGULARIZER_METHODS + H.RELEASED_METHODS


@pytest.fixture(scope="module")
def runs():
    single = H.run_single(METHODS, STEPS)
    world2 = H.spawn(H.run_jobs, 2, [(e, m, 1) for e in ENGINES for m in METHODS], STEPS)
    return single, world2


@pytest.fixture(scope="module")
def dropout_d():
    return H.spawn(H.dropout_step_one_divergence, 2, ("ddp", "fsdp2", "zero2", "zero3"),
                   ("tram-theta-prev", "trpo"))


def _per_radius(metrics):
    # The released ascent's radius is logit_scale * d', and d' (a KL of nearby distributions)
    # has the KL's precision, checked below: compare ||eps|| per unit radius, a ratio of
    # global norms, as test_engines_invariance does for TRAM
    out = []
    for m in metrics:
        m = dict(m)
        if m["radius"]:
            m["eps_norm"] = m["eps_norm"] / m["radius"]
        out.append(m)
    return out


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("method", METHODS)
def test_regularizers_and_released_two_ranks_equal_single_process(runs, engine, method):
    single, world2 = runs
    ref, got = single[("single", method)], world2[(engine, method, 1)]
    rel = H.max_rel_diff(got["params"], ref["params"])
    assert rel <= FP32_RTOL, f"{engine} {method}: parameters differ by {rel:.2e}"
    keys = ("loss", "perturbed_loss", "grad_norm", "eps_norm")
    for key in keys:
        worst = H.metric_rel_diff(_per_radius(got["metrics"]), _per_radius(ref["metrics"]), key)
        assert worst is None or worst <= FP32_RTOL, f"{engine} {method}: {key} differs by {worst:.2e}"
    # ||eps|| as written is theta + eps rounded to fp32, minus theta: each element's rounding
    # (<= half an ulp, 2^-24 |theta|) can differ between runs whose theta differ in the last
    # bit, so the applied norms agree to rtol plus 2 * 2^-24 ||theta||
    theta_norm = math.sqrt(sum(float(p.double().pow(2).sum()) for p in ref["params"].values()))
    for a, b in zip(got["metrics"], ref["metrics"]):
        if b["eps_applied"] is not None:
            tol = FP32_RTOL * b["eps_applied"] + 2 * 2.0 ** -24 * theta_norm
            assert abs(a["eps_applied"] - b["eps_applied"]) <= tol, (engine, method, a["eps_applied"], b["eps_applied"])
    key = "divergence" if method in H.RELEASED_METHODS else "penalty"
    for a, b in zip(got["metrics"], ref["metrics"]):
        kl = abs(b[key])
        tol = FP32_RTOL * kl + 2 * math.sqrt(2 * kl) * FP32_RTOL
        assert abs(a[key] - b[key]) <= tol, (engine, method, key, a[key], b[key])
    assert ref["metrics"][-1][key] > 1e-9  # the penalty / the released d' is active in these runs


@pytest.mark.parametrize("engine", ("ddp", "fsdp2", "zero2", "zero3"))
@pytest.mark.parametrize("method", ("tram-theta-prev", "trpo"))
def test_shared_dropout_masks_under_every_engine(dropout_d, engine, method):
    """Dropout 0.1 in train mode, 2 ranks: with the pass-1 masks replayed, the step-1 KL to
    theta_{t-1} = theta is 0 (TRAM's d; TRPO's penalty), with fresh masks it is dropout noise."""
    shared, indep = dropout_d[(engine, method, "shared")], dropout_d[(engine, method, "independent")]
    assert abs(shared) <= 1e-7, (engine, shared)
    assert indep > 1e-5, (engine, indep)
