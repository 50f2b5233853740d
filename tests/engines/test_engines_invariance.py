"""World-size invariance: every engine and variant on 2 (and 4) ranks equals one process.

3 steps of a tiny GPT-2 on the same global batches (4 samples, the last one partly padding, so
ranks hold different token counts). fp32 engines are compared with the single-process run
(no process group, plain model); bf16 engines with the same engine on 1 rank (the same
arithmetic, only the split over ranks changes) and, for information, with the fp32 run.

Tolerances.
* fp32: 1e-5 relative: parameters as max|a - b| / max|b| over the whole model; the global
  norm ||T g||, ||eps||, the losses and d per step relative to the single-process value (d
  relative to its largest value over the steps, since d_theta(t-1) is 0 up to rounding at
  step 0). Measured: <= 3.5e-6 for the parameters, <= 3e-7 for the norms.
  d (TRAM-d_theta) is a KL between two predictive distributions a step apart: it is made of
  differences of nearby logits, so its relative precision is far worse than the logits' (a
  different split of the batch already moves d_theta(t-1) by ~3e-5 relative, DDP included).
  Its tolerance is derived from the logits': if both logit sets (O(1)) agree to rtol, d
  moves by at most 2 sqrt(2 d) rtol (dKL/dlogit ~ p - q ~ sqrt(2 KL)), plus rtol d.
* bf16: u = 2^-8 is bf16's unit roundoff. Going from 1 to 2 ranks rounds each gradient
  element at most twice more (this rank's partial gradient, and the bf16 sum of the
  reduction), so |g~ - g| <= 2u |g| elementwise and, by the triangle inequality, every
  weighted norm (||T g||, ||eps||) moves by at most 2u = 2^-7 ~ 7.8e-3 relative; the same
  bound is used for the losses and d. A per-shard norm would be off by sqrt(2) - 1 = 41%.
  Parameters: AdamW's step is at most lr * (1 - b1) / (1 - b1^t) * sqrt((1 - b2^t) / (1 - b2))
  * sqrt(sum_k (b1^2 / b2)^k) <= 1.003 lr per element for t <= 3 and betas (0.9, 0.99)
  (Cauchy-Schwarz), so where bf16 rounding flips the sign of a near-zero gradient two runs
  may differ by 2 * 1.003 * lr per step: max|a - b| <= 2 * 1.003 * lr * 3 (6.0e-3 for
  lr = 1e-3). Measured: <= 5e-3 (parameters), <= 1.4e-3 (norms), <= 4.1e-3 (||eps||).
"""
import json
import math
import os
import time

import pytest

import engines_harness as H

STEPS = 3
FP32_RTOL = 1e-5
BF16_U = 2.0 ** -8
BF16_RTOL = 2 * BF16_U
ADAM_STEP_BOUND = 1.003 * H.LR  # see the module docstring
BF16_PARAM_ATOL = 2 * ADAM_STEP_BOUND * STEPS

ACCUM_ENGINES = ("fsdp2", "zero1", "zero2", "zero3")
ACCUM_METHODS = ("adamw", "sam", "tram-x", "tram-theta-prev")
# DeepSpeed settings that change where gradients and parameters live: overlapped reduction
# (double buffers, the setting of configs/zero2.json) and ZeRO-3's persistent small parameters
# (DeepSpeed's default threshold: they stay gathered and are re-gathered by publish)
ZERO_VARIANTS = (("zero2", {"overlap_comm": True}), ("zero3", {"overlap_comm": True}),
                 ("zero3", {"stage3_param_persistence_threshold": 100000}),
                 ("zero1-bf16", {"overlap_comm": True}))
ZERO_VARIANT_METHODS = ("sam", "tram-theta-prev")
CLIP = {"max_grad_norm": 0.5}  # the gradient norm is ~1.5: clipping is active
CLIP_ENGINES = ("ddp", "fsdp2", "zero2", "zero3")
CLIP_METHODS = ("adamw", "tram-x")
WORLD4_ENGINES = ("fsdp2", "zero3")
WORLD4_METHODS = ("adamw", "sam", "asam", "tram-x", "tram-theta-prev", "tram-theta0", "tram-fisher")

REPORT = {}


@pytest.fixture(scope="module")
def runs():
    t0 = time.perf_counter()
    single = H.run_single(H.METHODS, STEPS)
    single_clip = H.run_single(CLIP_METHODS, STEPS, step_kwargs=CLIP)
    jobs2 = [(e, m, 1) for e in H.ENGINES_FP32 + H.ENGINES_BF16 for m in H.METHODS]
    jobs2 += [(e, m, 2) for e in ACCUM_ENGINES for m in ACCUM_METHODS]
    jobs2 += [(e, m, 1, o) for e, o in ZERO_VARIANTS for m in ZERO_VARIANT_METHODS]
    jobs2 += [(e, m, 1, None, CLIP) for e in CLIP_ENGINES for m in CLIP_METHODS]
    world2 = H.spawn(H.run_jobs, 2, jobs2, STEPS)
    jobs1 = [(e, m, 1) for e in H.ENGINES_BF16 for m in H.METHODS]
    jobs1 += [(e, m, 1, o) for e, o in ZERO_VARIANTS if e.endswith("bf16") for m in ZERO_VARIANT_METHODS]
    world1 = H.spawn(H.run_jobs, 1, jobs1, STEPS)
    world4 = H.spawn(H.run_jobs, 4, [(e, m, 1) for e in WORLD4_ENGINES for m in WORLD4_METHODS], STEPS)
    REPORT["seconds"] = time.perf_counter() - t0
    runs = {"single": single, "single_clip": single_clip, 1: world1, 2: world2, 4: world4}
    if os.environ.get("TRAM_ENGINES_REPORT"):  # the measured differences, for docs/engines.md
        with open(os.environ["TRAM_ENGINES_REPORT"], "w") as f:
            json.dump(_summary(runs), f, indent=1)
    return runs


def _summary(runs):
    rows = []
    for world in (2, 4):
        for key, got in runs[world].items():
            engine, method, accum = key[:3]
            if engine.endswith("bf16"):
                ref = runs[1].get(key)
            else:
                ref = runs["single"][("single", method)]
            if ref is None:
                continue
            norm = H.metric_rel_diff(got["metrics"], ref["metrics"], "grad_norm")
            rows.append({"world": world, "engine": engine, "method": method, "accum": accum,
                         "settings": str(key[3]) if len(key) > 3 else "",
                         "reference": "1 rank" if engine.endswith("bf16") else "single process",
                         "param_max_rel": H.max_rel_diff(got["params"], ref["params"]),
                         "norm_max_rel": norm})
    return rows


def _theta0():
    return {n: p.detach().float() for n, p in H.tiny_gpt2().named_parameters()}


def _eps_per_radius(metrics):
    # TRAM's radius is d + nu, and d_theta(t-1) is 0 up to rounding at step 0: compare
    # ||eps|| / (d + nu) (a ratio of global norms); d itself is compared below
    out = []
    for m in metrics:
        m = dict(m)
        if m["divergence"] is not None:
            m["eps_norm"] = m["eps_norm"] / (m["divergence"] + 1e-5)
        out.append(m)
    return out


def _check_metrics(got, ref, rtol, what):
    for key in ("loss", "perturbed_loss", "grad_norm", "eps_norm"):
        worst = H.metric_rel_diff(_eps_per_radius(got), _eps_per_radius(ref), key)
        assert worst is None or worst <= rtol, f"{what}: {key} differs by {worst:.2e} (> {rtol:.1e})"
    for a, b in zip(got, ref):
        if b["divergence"] is None:
            continue
        d = abs(b["divergence"])
        # d is a KL between two nearby predictive distributions: logits that agree to rtol
        # (they are O(1)) move it by at most 2 sqrt(2 d) rtol (dKL/dlogit ~ p - q ~ sqrt(2 KL))
        tol = rtol * d + 2 * math.sqrt(2 * d) * rtol
        assert abs(a["divergence"] - b["divergence"]) <= tol, \
            f"{what}: d {a['divergence']} vs {b['divergence']} (tolerance {tol:.1e})"
    for a, b in zip(got, ref):
        assert a["ascent_skipped"] == b["ascent_skipped"] is False, f"{what}: ascent skipped"


@pytest.mark.parametrize("engine", H.ENGINES_FP32)
@pytest.mark.parametrize("method", H.METHODS)
def test_fp32_two_ranks_equal_single_process(runs, engine, method):
    got, ref = runs[2][(engine, method, 1)], runs["single"][("single", method)]
    err = H.max_rel_diff(got["params"], ref["params"])
    REPORT[(engine, method, 2)] = err
    assert err <= FP32_RTOL, f"{engine}/{method}: parameters differ by {err:.2e}"
    _check_metrics(got["metrics"], ref["metrics"], FP32_RTOL, f"{engine}/{method}")


@pytest.mark.parametrize("engine", H.ENGINES_BF16)
@pytest.mark.parametrize("method", H.METHODS)
def test_bf16_two_ranks_equal_one_rank(runs, engine, method):
    got, ref = runs[2][(engine, method, 1)], runs[1][(engine, method, 1)]
    err = max(float((got["params"][k] - ref["params"][k]).abs().max()) for k in ref["params"])
    REPORT[(engine, method, 2)] = H.max_rel_diff(got["params"], ref["params"])
    REPORT[(engine, method, "fp32")] = H.max_rel_diff(ref["params"], runs["single"][("single", method)]["params"])
    assert err <= BF16_PARAM_ATOL, f"{engine}/{method}: parameters differ by {err:.2e}"
    _check_metrics(got["metrics"], ref["metrics"], BF16_RTOL, f"{engine}/{method}")
    # and the bf16 run itself stays within bf16 rounding of the fp32 one
    _check_metrics(ref["metrics"], runs["single"][("single", method)]["metrics"], BF16_RTOL,
                   f"{engine}/{method} vs fp32")


@pytest.mark.parametrize("engine", WORLD4_ENGINES)
@pytest.mark.parametrize("method", WORLD4_METHODS)
def test_four_ranks_equal_single_process(runs, engine, method):
    got, ref = runs[4][(engine, method, 1)], runs["single"][("single", method)]
    err = H.max_rel_diff(got["params"], ref["params"])
    REPORT[(engine, method, 4)] = err
    assert err <= FP32_RTOL, f"{engine}/{method} at 4 ranks: parameters differ by {err:.2e}"
    _check_metrics(got["metrics"], ref["metrics"], FP32_RTOL, f"{engine}/{method} at 4 ranks")


@pytest.mark.parametrize("engine", ACCUM_ENGINES)
@pytest.mark.parametrize("method", ACCUM_METHODS)
def test_accumulation_equals_one_big_batch(runs, engine, method):
    """2 ranks x 2 micro-batches (DeepSpeed gradient_accumulation_steps=2) = one global batch."""
    got, ref = runs[2][(engine, method, 2)], runs["single"][("single", method)]
    err = H.max_rel_diff(got["params"], ref["params"])
    REPORT[(engine, method, "accum2")] = err
    assert err <= FP32_RTOL, f"{engine}/{method} with accumulation: parameters differ by {err:.2e}"
    _check_metrics(got["metrics"], ref["metrics"], FP32_RTOL, f"{engine}/{method} accumulation")


@pytest.mark.parametrize("variant", range(len(ZERO_VARIANTS)))
@pytest.mark.parametrize("method", ZERO_VARIANT_METHODS)
def test_zero_settings(runs, variant, method):
    engine, overrides = ZERO_VARIANTS[variant]
    key = (engine, method, 1, tuple(sorted(overrides)))
    got = runs[2][key]
    if engine.endswith("bf16"):
        ref = runs[1][key]
        err = max(float((got["params"][k] - ref["params"][k]).abs().max()) for k in ref["params"])
        assert err <= BF16_PARAM_ATOL, (key, err)
        _check_metrics(got["metrics"], ref["metrics"], BF16_RTOL, str(key))
    else:
        ref = runs["single"][("single", method)]
        err = H.max_rel_diff(got["params"], ref["params"])
        REPORT[(engine, method, str(overrides))] = err
        assert err <= FP32_RTOL, (key, err)
        _check_metrics(got["metrics"], ref["metrics"], FP32_RTOL, str(key))


@pytest.mark.parametrize("engine", CLIP_ENGINES)
@pytest.mark.parametrize("method", CLIP_METHODS)
def test_clipping_uses_the_global_norm(runs, engine, method):
    """TrainStep(max_grad_norm=...) clips the descent gradient by its global norm: sharded
    engines sum the slices' squares over the group (one all-reduce)."""
    got = runs[2][(engine, method, 1, "max_grad_norm")]
    ref = runs["single_clip"][("single", method)]
    err = H.max_rel_diff(got["params"], ref["params"])
    assert err <= FP32_RTOL, (engine, method, err)
    worst = H.metric_rel_diff(got["metrics"], ref["metrics"], "clip_norm")
    assert worst is not None and worst <= FP32_RTOL, (engine, method, worst)
    assert all(m["clip_norm"] > CLIP["max_grad_norm"] for m in ref["metrics"])


def test_norm_is_global_not_per_shard(runs):
    """The reported norm is the single-process one at 1, 2 and 4 ranks (a per-shard norm would
    be smaller by about sqrt(world))."""
    ref = [m["grad_norm"] for m in runs["single"][("single", "tram-x")]["metrics"]]
    for world, engine in ((2, "fsdp2"), (2, "zero2"), (2, "zero3"), (4, "fsdp2"), (4, "zero3")):
        got = [m["grad_norm"] for m in runs[world][(engine, "tram-x", 1)]["metrics"]]
        for a, b in zip(got, ref):
            assert math.isclose(a, b, rel_tol=FP32_RTOL), (world, engine, a, b)
