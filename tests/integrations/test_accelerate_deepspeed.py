"""TrainStep on what an Accelerator with DeepSpeedPlugin prepared (ZeRO-2 and ZeRO-3, 2 CPU ranks,
one launch: accelerate_ds_harness.jobs) against the single-process TrainStep loop
(trainer_harness.reference): the base AdamW goes through accelerator.prepare, and
tram_on_deepspeed wraps the partitioned base in the method. Same model, data, param groups,
clipping and tolerance as the TramTrainer DeepSpeed test: 1e-5 relative (the engines tests'
fp32 bound: 2 ranks sum the gradient in another order) on the parameters and the per-step
losses and norms. The linear schedule accelerate prepared is stepped by accelerate (once per
process per step, over the single-process batch count) and drives the base optimizer's lr.
The ranks run in the launch shared with test_tram_trainer_deepspeed.py (the deepspeed_runs
fixture, conftest.py). The refusals are checked on stand-ins, without DeepSpeed."""
import math

import pytest
import torch

import accelerate_ds_harness as A
import trainer_harness as H
from tram_dist import SAM, TRAM
from tram_dist.integrations.accelerate import tram_on_deepspeed, unwrap_optimizer

RTOL = 1e-5
STEPS = H.N_SAMPLES // (A.BATCH * 2)  # one pass over the data at 2 ranks: 4 steps of 4 samples
JOBS = A.JOBS
_CLASS = {"tram-theta-prev": "TRAM", "sam": "SAM", "adamw": "DeepSpeedZeroOptimizer"}  # adamw: ZeRO's own


def test_accelerate_deepspeed_zero2_zero3_two_ranks(deepspeed_runs):
    results = deepspeed_runs["accelerate"]
    for job in JOBS:
        method, stage = job
        res = results[job]
        # accelerate's DeepSpeedEngine and optimizer wrapper; the TRAM ZeRO engine at this stage over
        # 2 ranks; the method around the base ZeRO partitions; DeepSpeed's own clipping off
        assert res["ran"] == ("DeepSpeedEngine", "DeepSpeedOptimizerWrapper", "ZeroEngine", stage, 2,
                              _CLASS[method], None if method == "adamw" else True, 0.0), job
        ref = H.cached_reference(method, batch=2 * A.BATCH, steps=STEPS)
        assert H.max_rel_diff(res["params"], ref["params"]) <= RTOL, (job, H.max_rel_diff(res["params"],
                                                                                           ref["params"]))
        assert len(res["logs"]) == STEPS
        for s, (got, want) in enumerate(zip(res["logs"], ref["metrics"])):
            for key in ("loss", "clip_norm", "grad_norm", "eps_norm", "perturbed_loss"):
                if want[key] is None:  # adamw: no ascent
                    assert got[key] is None and method == "adamw", (job, s, key)
                else:
                    assert got[key] == pytest.approx(want[key], rel=RTOL, abs=0), (job, s, key)
            assert got["lr"] == want["lr"] and (method == "adamw" or got["eps_norm"] > 0)
            if method == "tram-theta-prev":  # d, a KL of nearby distributions: the engines tests' bound
                d = want["divergence"]
                assert abs(got["divergence"] - d) <= 2 * math.sqrt(2 * max(d, 0.0)) * RTOL + RTOL * d, (s, d)
        # the prepared schedule drove the base optimizer: ZeRO steps it once per param group
        lrs = [lr for i, lr in enumerate(res["lrs"]) if i == 0 or res["lrs"][i - 1] != lr]
        assert lrs == [H.expected_lr(s, STEPS) for s in range(STEPS)] == ref["lrs"], res["lrs"]


class _Zero:  # DeepSpeed's ZeRO optimizer, by what tram_on_deepspeed reads
    def __init__(self, base):
        self.optimizer = base


class _Engine:  # a DeepSpeedEngine, by what tram_on_deepspeed reads before building anything
    def __init__(self, base, clip=0.0):
        self.optimizer = _Zero(base)
        self.clip = clip

    def zero_optimization_stage(self):
        return 2

    def gradient_clipping(self):
        return self.clip


class DeepSpeedOptimizerWrapper:  # accelerate's DeepSpeedPlugin wrapper, by name
    def __init__(self, zero):
        self.optimizer = zero


def test_tram_on_deepspeed_refusals():
    model = torch.nn.Linear(4, 2)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine = _Engine(adamw, clip=1.0)
    with pytest.raises(ValueError, match=r"DeepSpeed clips the gradients at 1 .*gradient_clipping=0\.0.*"
                                         r"TrainStep\(max_grad_norm=1\)"):
        tram_on_deepspeed(engine, DeepSpeedOptimizerWrapper(engine.optimizer), "sam")
    engine = _Engine(TRAM(model.parameters(), torch.optim.AdamW, lr=1e-3))
    with pytest.raises(TypeError, match="give prepare the base optimizer"):
        tram_on_deepspeed(engine, DeepSpeedOptimizerWrapper(engine.optimizer), "sam")
    engine = _Engine(adamw)
    with pytest.raises(ValueError, match="not the one accelerator.prepare returned"):
        tram_on_deepspeed(engine, DeepSpeedOptimizerWrapper(_Zero(adamw)), "sam")
    with pytest.raises(ValueError, match=r"\['lr'\] belong to the base optimizer"):
        tram_on_deepspeed(engine, engine.optimizer, "sam", lr=1e-3)
    with pytest.raises(ValueError, match="unknown method 'tram'"):
        tram_on_deepspeed(engine, engine.optimizer, "tram")
    with pytest.raises(TypeError, match="must be the DeepSpeedEngine"):
        tram_on_deepspeed(model, engine.optimizer, "sam")
    # TRAM given to accelerate itself: TrainStep (through unwrap_optimizer) names the way that works
    wrapped = DeepSpeedOptimizerWrapper(_Zero(SAM(model.parameters(), torch.optim.AdamW, lr=1e-3)))
    with pytest.raises(TypeError, match="tram_on_deepspeed"):
        unwrap_optimizer(wrapped)
