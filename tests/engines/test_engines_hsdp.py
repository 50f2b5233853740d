"""HSDP (FSDP2 on a 2-D (replicate, shard) mesh): 4 ranks in a 2 x 2 mesh equal one process.

Every parameter is a DTensor placed (Replicate(), Shard(0)): after backward the gradients are
reduce-scattered within a replica group and all-reduced across the 2 replicas, so both
replicas hold the same shards while every rank has seen different data. TRAM must then sum
parameter-shaped partials (||T g||^2, ||eps|| as applied, the clip norm) once per shard (a sum
over all 4 ranks would be 2x too large: grad_norm off by sqrt(2)) and per-sample sums (d,
token counts, losses) over all 4 ranks.

3 steps of the engine tests' tiny GPT-2 on their global batches (4 sequences, the last partly
padding: 1 sequence per rank, different token counts), built by ``tram_dist.runs.build_run``
with ``RunConfig(hsdp_replicas=2)`` (``hsdp_workers.HSDPRun``), against the single-process run.

Tolerances: those of test_engines_invariance.py (derived there): fp32 parameters within
1e-5 of max|theta|; loss, perturbed loss, ||T g||, ||eps|| (per unit radius for TRAM), the
clip norm within 1e-5 relative; d, TRPO's penalty (KLs of nearby distributions) and TRAM's
radius d + nu within rtol d + 2 sqrt(2 d) rtol, SAM's and Fisher's radius rho within rtol;
||eps|| as written (fp32 rounding of theta + eps) within rtol + 2 * 2^-24 ||theta||. The replicas' shards must stay equal: they are
all-reduced across replicas and stepped identically, so they are compared bit for bit.
"""
import math
import time

import pytest

import engines_harness as H
import hsdp_workers as W
from test_engines_invariance import FP32_RTOL, _check_metrics

WORLD, REPLICAS, STEPS = 4, 2, 3
METHODS = ("adamw", "sam", "tram-x", "tram-theta-prev", "tram-fisher", "trpo")
CLIP = {"max_grad_norm": 0.5}  # the gradient norm is ~1.5: clipping is active
CLIP_METHODS = ("tram-x",)
REPORT = {}


@pytest.fixture(scope="module")
def runs():
    t0 = time.perf_counter()
    single = H.run_single(METHODS, STEPS)
    single.update({("clip", m): r for (_, m), r in H.run_single(CLIP_METHODS, STEPS, step_kwargs=CLIP).items()})
    jobs = [(m, None) for m in METHODS] + [(m, CLIP) for m in CLIP_METHODS]
    hsdp = H.spawn(W.hsdp_jobs, WORLD, REPLICAS, jobs, STEPS)  # one spawn of 4 ranks
    REPORT["seconds"] = time.perf_counter() - t0
    return single, hsdp


def _check_radius(got, ref, what):
    """The radius (||T^-1 eps||): rho (SAM, Fisher) to FP32_RTOL; TRAM's is d + nu, so d's
    tolerance (absolute) applies to it."""
    for a, b in zip(got, ref):
        if b["radius"] is None:
            continue
        if b["divergence"] is None:
            tol = FP32_RTOL * abs(b["radius"])
        else:
            d = abs(b["divergence"])
            tol = FP32_RTOL * d + 2 * math.sqrt(2 * d) * FP32_RTOL
        assert abs(a["radius"] - b["radius"]) <= tol, f"{what}: radius {a['radius']} vs {b['radius']}"


@pytest.mark.parametrize("method", METHODS)
def test_hsdp_2x2_equals_single_process(runs, method):
    single, hsdp = runs
    got, ref = hsdp[(method,)], single[("single", method)]
    assert got["mesh"] == (REPLICAS, WORLD // REPLICAS), got["mesh"]
    assert got["placements"] == [("Replicate", None), ("Shard", 0)], got["placements"]
    assert got["engine_world"] == WORLD  # per-sample sums and gradient weights: every rank
    assert got["replica_diff"] == 0.0, f"{method}: the replicas' shards differ by {got['replica_diff']}"
    err = H.max_rel_diff(got["params"], ref["params"])
    REPORT[method] = err
    assert err <= FP32_RTOL, f"hsdp/{method}: parameters differ by {err:.2e}"
    _check_metrics(got["metrics"], ref["metrics"], FP32_RTOL, f"hsdp/{method}")
    _check_radius(got["metrics"], ref["metrics"], f"hsdp/{method}")
    if method == "trpo":  # the penalty (a per-sample KL sum) is summed over every rank
        for a, b in zip(got["metrics"], ref["metrics"]):
            kl = abs(b["penalty"])  # a KL of nearby distributions: compared as d is
            tol = FP32_RTOL * kl + 2 * math.sqrt(2 * kl) * FP32_RTOL
            assert abs(a["penalty"] - b["penalty"]) <= tol, (method, a["penalty"], b["penalty"])
        assert ref["metrics"][-1]["penalty"] > 1e-9


@pytest.mark.parametrize("method", CLIP_METHODS)
def test_hsdp_clip_norm_is_global(runs, method):
    """The pass-2 clip norm (base.Engine.clip_grad_norm_) sums the shard partials once."""
    single, hsdp = runs
    got, ref = hsdp[(method, "max_grad_norm")], single[("clip", method)]
    err = H.max_rel_diff(got["params"], ref["params"])
    assert err <= FP32_RTOL, (method, err)
    worst = H.metric_rel_diff(got["metrics"], ref["metrics"], "clip_norm")
    assert worst is not None and worst <= FP32_RTOL, (method, worst)
    assert all(m["clip_norm"] > CLIP["max_grad_norm"] for m in ref["metrics"])
    assert got["replica_diff"] == 0.0


def test_hsdp_norm_and_applied_eps_count_each_shard_once(runs):
    """grad_norm and eps_applied (parameter-shaped sums) equal the single process's: a sum over
    all 4 ranks without the replica correction would make both sqrt(2) = 1.41x larger.
    eps_applied is ||fl(theta + eps) - theta|| in fp32: each element's rounding (<= half an
    ulp, 2^-24 |theta|) may differ between runs whose theta differ in the last bit, so the
    two agree to rtol plus 2 * 2^-24 ||theta|| (as in test_engines_regularizers.py); that is
    ~1.5e-6 here, below the 41% a double count adds to the smallest ||eps|| (5.5e-6)."""
    single, hsdp = runs
    for method in ("sam", "tram-x", "tram-theta-prev", "tram-fisher"):
        got, ref = hsdp[(method,)]["metrics"], single[("single", method)]
        theta_norm = math.sqrt(sum(float(p.double().pow(2).sum()) for p in ref["params"].values()))
        for a, b in zip(got, ref["metrics"]):
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=FP32_RTOL), method
            tol = FP32_RTOL * b["eps_applied"] + 2 * 2.0 ** -24 * theta_norm
            assert tol < (math.sqrt(2) - 1) * b["eps_applied"]  # the check can see a double count
            assert abs(a["eps_applied"] - b["eps_applied"]) <= tol, \
                (method, a["eps_applied"], b["eps_applied"], tol)
