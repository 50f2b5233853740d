"""DeepSpeed ZeRO offload and fp16 (DeepSpeed's loss scaler) under the TRAM ZeRO engine.

One spawn of 2 ranks (``offload_workers.all_jobs``), 3 steps of the engine tests' tiny GPT-2 on
their global batches (4 sequences, the last partly padding), built by ``tram_dist.runs.build_run``.

Offload (``zero_optimization.offload_optimizer.device = "cpu"``): the fp32 master, its gradient
and AdamW's state live in host memory; TRAM reads theta and the reduced gradient there and writes
theta + eps into the working partition, through a host copy of it (``ZeroEngine.stage_on_host``:
on a GPU the working partition is on the device, so TRAM computes beside the master and
``publish`` uploads; the CPU runs below force that layout, and run ZeRO-3 with ``offload_param``
too without it, as a GPU run of configs/zero3_offload.json does; ZeRO-3 with ``offload_param``
alone, the master on the accelerator and the working partition in host memory, is staged the other
way). DeepSpeed steps the client torch
AdamW as given on the host partition (``zero_force_ds_cpu_optimizer`` false, set by
``initialize``); it does not swap in DeepSpeedCPUAdam. Compared with the same engine without
offload, tolerance 0 (bit for bit): the gradients are reduced by the same collectives in the same
order and only copied (exactly, fp32 to fp32) into the host buffer, TRAM's kernels read the same
fp32 values and write the same working values (the host copy is exact both ways), and AdamW runs
the same CPU kernel on the same fp32 partition. (On a GPU the offloaded AdamW runs on the CPU and
the other one on the GPU, so the two differ by fp32 rounding there; the fp32 tolerance of
test_engines_invariance.py, 1e-5, is what applies then.) configs/zero3_offload.json itself goes
through the launcher's path (resolve_ds_config, check_ds_config, the run) and is compared with the
single process within that fp32 tolerance (its persistent small parameters and overlapped
reduction change the summation order, as in test_engines_invariance.py's ZeRO settings).

fp16 under ZeRO-1/2: DeepSpeed's dynamic loss scaler scales each backward; after pass 1 the engine
runs DeepSpeed's overflow check (one all-reduce) and unscales pass 1's gradients for the ascent;
pass 2's gradients stay scaled for DeepSpeed's step (clipping measures them in true units).

* An overflow forced in pass 1 or in pass 2 skips the whole step (``StepMetrics.step_skipped``):
  the working fp16 parameters (every rank's whole copy) and this rank's fp32 master are bit for
  bit what they were, DeepSpeed counted one skipped step and halved its scale (hysteresis 1), and
  the next step runs normally. TRAM's step counter advances on a pass-2 skip (the ascent and
  the trust-region update happened, as with a torch GradScaler on the local engines), not on a
  pass-1 skip (nothing ran).
* Normal steps against the same engine in fp32: the forward and backward run in fp16 (weights and
  activations rounded to u = 2^-11) from fp16-rounded initial weights. The tolerances are
  test_engines_invariance.py's bf16-against-fp32 ones with fp16's u: 2u = 2^-10 relative for
  the losses, ||T g||, ||eps|| (per unit radius) and the clip norm, d within its KL tolerance
  (rtol d + 2 sqrt(2 d) rtol); parameters within 2 x 1.003 lr x steps absolute (AdamW moves an
  element by at most 1.003 lr per step for these betas, and a near-zero gradient element may
  change sign under rounding). Without the unscaling of pass 1 the norms would be 256x off.

DeepSpeed's CPU accelerator refuses fp16 on CPUs without AVX512-FP16; the ranks declare it
supported (``offload_workers.allow_fp16_on_cpu``) so that DeepSpeed's fp16 code runs here.
"""
import json
import os
import time
from pathlib import Path

import pytest

import engines_harness as H
import offload_workers as W
from test_engines_invariance import BF16_PARAM_ATOL, FP32_RTOL, _check_metrics

STEPS = 3
FP16_U = 2.0 ** -11
FP16_RTOL = 2 * FP16_U
PRESET = str(Path(__file__).resolve().parents[2] / "configs" / "zero3_offload.json")
METHODS = ("tram-theta-prev", "tram-x", "sam", "adamw")
# (name, engine, zero_optimization overrides, ZeroEngine.stage_on_host); "<engine>" is the reference
OFFLOAD = (("zero2", "zero2", None, None), ("zero2+offload", "zero2", W.OFFLOAD_OPTIMIZER, True),
           ("zero3", "zero3", None, None), ("zero3+offload", "zero3", W.OFFLOAD_OPTIMIZER, True),
           ("zero3+offload+param", "zero3", W.OFFLOAD_BOTH, None), ("zero3+param", "zero3", W.OFFLOAD_PARAM, True))
PARAM_ONLY_METHODS = ("tram-theta-prev", "sam")  # parameter offload alone: the master stays put
ZERO1_METHODS = ("tram-theta-prev",)  # ZeRO-1 offload shares ZeRO-2's host-gradient path
CLIP = {"max_grad_norm": 0.5}  # the gradient norm is ~1.5: clipping is active
FP16_ENGINES = ("zero1", "zero2")
# ZeRO-1 runs ZeRO-2's optimizer class (stage_1_and_2.py) with the same fp16 hooks: one method there
FP16_METHODS = {"zero1": ("tram-theta-prev",), "zero2": METHODS}
FP16_CASES = [(e, m) for e in FP16_ENGINES for m in FP16_METHODS[e]]
# the fp32 reference of each fp16 run is the offload jobs' run of the same engine without offload
FP16_RUNS = [(f"{e}-fp16", e, m, None, None, True) for e, m in FP16_CASES]
FP16_RUNS += [(f"zero2-{p}-clip", "zero2", "tram-x", None, CLIP, p == "fp16") for p in ("fp16", "fp32")]
FP16_RUNS += [("zero2-fp16+offload", "zero2", "sam", W.OFFLOAD_OPTIMIZER, None, True)]
OVERFLOW = [(e, m, which, None) for e, m in (("zero2", "sam"), ("zero2", "tram-theta-prev"),
                                             ("zero1", "tram-theta-prev")) for which in (1, 2)]
OVERFLOW += [("zero2", "sam", which, W.OFFLOAD_OPTIMIZER) for which in (1, 2)]
# skip_nonfinite under ZeRO (engine, method, zero_optimization overrides): a NaN on one rank
SKIP = [("zero2", "sam", None), ("zero3", "sam", None), ("zero2", "sam", W.OFFLOAD_OPTIMIZER),
        ("zero2", "tram-theta-prev", None)]
REPORT = {}


@pytest.fixture(scope="module")
def runs():
    t0 = time.perf_counter()
    jobs = [(name, engine, m, overrides, staged) for name, engine, overrides, staged in OFFLOAD
            for m in (PARAM_ONLY_METHODS if name == "zero3+param" else METHODS)]
    jobs += [(name, "zero1", m, overrides, True) for name, overrides in (("zero1", None),
                                                                         ("zero1+offload", W.OFFLOAD_OPTIMIZER))
             for m in ZERO1_METHODS]
    out = H.spawn(W.all_jobs, 2, jobs, (PRESET, "tram-theta-prev"), (FP16_RUNS, OVERFLOW), STEPS, SKIP)
    out["single"] = H.run_single(("tram-theta-prev",), STEPS)[("single", "tram-theta-prev")]
    REPORT["seconds"] = time.perf_counter() - t0
    REPORT.update({k: out[k] for k in ("offload_seconds", "preset_seconds", "fp16_seconds")})
    if os.environ.get("TRAM_OFFLOAD_REPORT"):  # the measured differences, for the README
        with open(os.environ["TRAM_OFFLOAD_REPORT"], "w") as f:
            json.dump(_summary(out), f, indent=1)
    return out


def _summary(out):
    def absdiff(a, b):
        return max(float((a["params"][k] - b["params"][k]).abs().max()) for k in b["params"])

    rows = {"seconds": dict(REPORT)}
    rows["offload_vs_without"] = {f"{n}/{m}": absdiff(out["offload"][(n, m)], out["offload"][(n.split("+")[0], m)])
                                  for n, m in OFFLOAD_CASES}
    rows["preset_vs_single_max_rel"] = H.max_rel_diff(out["preset"]["params"], out["single"]["params"])
    rows["preset_vs_single_grad_norm_rel"] = H.metric_rel_diff(out["preset"]["metrics"], out["single"]["metrics"],
                                                               "grad_norm")
    fp16 = {}
    for (name, method), got in out["fp16"]["runs"].items():
        if "fp16" not in name:
            continue
        _, ref = _fp16_pair(out, name, method)
        fp16[f"{name}/{method}"] = {"param_abs": absdiff(got, ref), **{
            k: H.metric_rel_diff(got["metrics"], ref["metrics"], k)
            for k in ("loss", "perturbed_loss", "grad_norm", "clip_norm")}}
    rows["fp16_vs_fp32"] = fp16
    return rows


# ------------------------------------------------------------------------------------------
# offload
# ------------------------------------------------------------------------------------------
METRIC_KEYS = ("loss", "perturbed_loss", "grad_norm", "eps_norm", "eps_applied", "divergence", "radius")


def _assert_same_run(got, ref, what):
    for k in ref["params"]:
        assert got["params"][k].equal(ref["params"][k]), \
            f"{what}: {k} differs by {float((got['params'][k] - ref['params'][k]).abs().max()):.2e}"
    for a, b in zip(got["metrics"], ref["metrics"]):
        for key in METRIC_KEYS:
            assert a[key] == b[key], f"{what}: step {b['step']} {key} {a[key]} != {b[key]}"
        assert not a["ascent_skipped"] and not a["step_skipped"], what


OFFLOAD_CASES = [(n, m) for n, _, o, _ in OFFLOAD if o for m in (PARAM_ONLY_METHODS if n == "zero3+param" else METHODS)]
OFFLOAD_CASES += [("zero1+offload", m) for m in ZERO1_METHODS]
STAGED = {n: bool(staged) for n, _, _, staged in OFFLOAD}
STAGED["zero1+offload"] = True


@pytest.mark.parametrize("name,method", OFFLOAD_CASES)
def test_offload_equals_the_engine_without_it(runs, name, method):
    got = runs["offload"][(name, method)]
    ref = runs["offload"][(name.split("+")[0], method)]
    layout = got["layout"]
    offload = "+offload" in name
    assert layout["offload"] == offload and layout["offload_param"] == name.endswith("+param"), layout
    assert layout["master_device"] == "cpu" and layout["master_grad_buffer"] == offload, layout
    assert layout["client_optimizer"] == "AdamW", layout  # the client optimizer, not DeepSpeedCPUAdam
    # the GPU layout (TRAM on a copy of the working partition beside the master), except where both
    # are offloaded: then the working partition already sits beside the master
    assert layout["staged"] == STAGED[name], layout
    assert not ref["layout"]["offload"] and not ref["layout"]["offload_param"]
    _assert_same_run(got, ref, f"{name}/{method}")
    if method != "adamw":
        assert all(m["grad_norm"] > 0 for m in got["metrics"])


def test_zero3_offload_preset_runs_through_the_launcher_path(runs):
    """configs/zero3_offload.json (optimizer and parameters offloaded, overlapped reduction,
    persistent small parameters) resolved and checked as the launcher does, against one process."""
    got, ref = runs["preset"], runs["single"]
    assert got["layout"]["offload"] and got["layout"]["offload_param"], got["layout"]
    err = H.max_rel_diff(got["params"], ref["params"])
    REPORT["preset"] = err
    assert err <= FP32_RTOL, f"zero3_offload.json: parameters differ by {err:.2e}"
    _check_metrics(got["metrics"], ref["metrics"], FP32_RTOL, "zero3_offload.json")


def test_check_ds_config_accepts_offload_and_names_what_works():
    from tram_dist.ds_config import DsConfigError, load_ds_config
    from tram_dist.runs import check_ds_config

    check_ds_config(load_ds_config(PRESET), PRESET)
    for stage in (1, 2, 3):
        check_ds_config({"zero_optimization": {"stage": stage, "offload_optimizer": {"device": "cpu"}}})
    for stage in (1, 2):
        check_ds_config({"zero_optimization": {"stage": stage}, "fp16": {"enabled": True}})
    refused = {
        "offload_optimizer.device is 'nvme'": {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}},
        "offload_param.device is 'nvme'": {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}},
        "offload_param needs ZeRO stage 3": {"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}},
        "zero_force_ds_cpu_optimizer is true": {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
                                                "zero_force_ds_cpu_optimizer": True},
        "fp16 with ZeRO-3 is not supported": {"zero_optimization": {"stage": 3}, "fp16": {"enabled": True}},
    }
    for expected, cfg in refused.items():
        with pytest.raises(DsConfigError) as info:
            check_ds_config(cfg, "ds.json")
        message = str(info.value)
        assert expected in message and "\n" not in message, message
        if "offload" in expected:
            assert 'offload_optimizer.device "cpu"' in message, message  # names what works


# ------------------------------------------------------------------------------------------
# fp16 with DeepSpeed's loss scaler (ZeRO-1/2)
# ------------------------------------------------------------------------------------------
def _fp16_pair(runs, name, method):
    r = runs["fp16"]["runs"]
    ref_name = name.replace("fp16", "fp32").replace("+offload", "")
    if ref_name in ("zero1-fp32", "zero2-fp32"):  # the same engine and config as that offload job's reference
        return r[(name, method)], runs["offload"][(ref_name.split("-")[0], method)]
    return r[(name, method)], r[(ref_name, method)]


@pytest.mark.parametrize("engine,method", FP16_CASES)
def test_fp16_steps_match_fp32(runs, engine, method):
    got, ref = _fp16_pair(runs, f"{engine}-fp16", method)
    assert got["fp16"] and str(got["dtype"]) == "torch.float16" and not ref["layout"]["offload"]
    assert got["skipped"] == 0 and got["loss_scale"] == 2.0 ** W.FP16["initial_scale_power"]
    assert not any(m["step_skipped"] for m in got["metrics"])
    err = max(float((got["params"][k] - ref["params"][k]).abs().max()) for k in ref["params"])
    REPORT[(engine, method, "fp16")] = err
    assert err <= BF16_PARAM_ATOL, f"{engine}/{method} fp16: parameters differ by {err:.2e}"
    _check_metrics(got["metrics"], ref["metrics"], FP16_RTOL, f"{engine}/{method} fp16")


@pytest.mark.parametrize("name,method", [("zero2-fp16-clip", "tram-x"), ("zero2-fp16+offload", "sam")])
def test_fp16_clipping_and_offload_match_fp32(runs, name, method):
    """Clipping measures pass 2's scaled gradients in true units; fp16 with the optimizer offloaded
    (DeepSpeed's host overflow tracker)."""
    got, ref = _fp16_pair(runs, name, method)
    assert got["fp16"] and got["offload"] == name.endswith("+offload")
    err = max(float((got["params"][k] - ref["params"][k]).abs().max()) for k in ref["params"])
    assert err <= BF16_PARAM_ATOL, (name, err)
    _check_metrics(got["metrics"], ref["metrics"], FP16_RTOL, name)
    if name.endswith("clip"):
        worst = H.metric_rel_diff(got["metrics"], ref["metrics"], "clip_norm")
        assert worst is not None and worst <= FP16_RTOL, (name, worst)
        assert all(m["clip_norm"] > CLIP["max_grad_norm"] for m in ref["metrics"])


@pytest.mark.parametrize("case", OVERFLOW, ids=lambda c: f"{c[0]}-{c[1]}-pass{c[2]}" + ("-offload" if c[3] else ""))
def test_fp16_overflow_skips_the_whole_step(runs, case):
    engine, method, which, overrides = case
    r = runs["fp16"]["overflow"][(engine, method, which, bool(overrides))]
    assert r["offload"] == bool(overrides)
    assert r["step_skipped"], r
    assert r["bit_identical"], f"parameters moved by {r['max_diff']:.2e} in a skipped step"
    assert r["skipped_steps"] == 1, r  # DeepSpeed's own skip
    scale = 2.0 ** W.FP16["initial_scale_power"]
    assert r["scale"] == (scale, scale / 2), r  # DeepSpeed's loss scaler saw the overflow
    before, after = r["step_count"]
    assert after == before + (1 if which == 2 else 0), r
    assert r["phase"] == "idle"
    assert not r["next_step_skipped"] and r["next_step_moved"] and r["next_working_is_master"], r


# ------------------------------------------------------------------------------------------
# skip_nonfinite
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", SKIP, ids=lambda c: f"{c[0]}-{c[1]}" + ("-offload" if c[2] else ""))
def test_a_nan_loss_on_one_rank_skips_the_step_on_every_rank(runs, case):
    """Both ranks skip (one global decision), theta is restored bit for bit from the fp32 master,
    DeepSpeed's gradient buffers are dropped, and the next step runs. SAM has no state that the
    step count touches, so its run equals a run without the skipped step, bit for bit."""
    engine, method, overrides = case
    for rank, got in enumerate(runs["skip"][(engine, method, bool(overrides))]):
        assert got["step_skipped"] and got["counted"] == 1 and got["restored"], (rank, got)
        assert not got["next_step_skipped"], (rank, got)
        if method == "sam":
            assert got["max_diff_to_run_without_the_step"] == 0.0, (rank, got)
