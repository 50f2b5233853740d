"""TramTrainer under Trainer's DeepSpeed option (ZeRO-2 and ZeRO-3), 2 CPU ranks, against the
single-process TrainStep loop that TramTrainer matches bit for bit without DeepSpeed
(test_tram_trainer.py). Same data, schedule and tolerances as the DDP test there: 1e-5
relative (the engines tests' fp32 bound) on the parameters, losses and norms; a resume from
a DeepSpeed checkpoint (DeepSpeed's partitions + TRAM's per-rank state) repeats the
uninterrupted run bit for bit. One launch of 2 ranks for these jobs and test_accelerate_deepspeed.py's
(the deepspeed_runs fixture, conftest.py; the ranks run deepspeed_harness.ds_jobs here)."""
import pytest
import torch

import deepspeed_harness as D
import trainer_harness as H
from test_tram_trainer import RTOL, STEPS, _assert_logs_match

pytest.importorskip("deepspeed")

# (method, ZeRO stage, per-device batch, accumulation, steps, save_at, skip_nonfinite): global batch 4 each
JOBS = D.JOBS
assert D.STEPS == STEPS
_CLASS = {"tram-theta-prev": "TRAM", "sam": "SAM"}


def test_deepspeed_zero2_zero3_two_ranks(deepspeed_runs):
    results = dict(deepspeed_runs["trainer"])
    refused = results.pop("refused")
    assert refused["optimizer"].startswith("ValueError: TramTrainer: remove the DeepSpeed config's optimizer"), refused
    assert refused["stage0"].startswith("NotImplementedError: TramTrainer: the DeepSpeed config needs"), refused
    assert refused["nvme"].startswith("NotImplementedError: ") and "nvme" in refused["nvme"], refused
    assert refused["unconfigured"].startswith("RuntimeError: TramTrainer: DeepSpeed runs 2 ranks but accelerate "
                                              "counts 1"), refused
    refs = {}
    for job in JOBS:
        method, stage = job[0], job[1]
        res = results[job]
        # what ran: accelerate's DeepSpeedEngine, the TRAM ZeRO engine at this stage over 2 ranks (the step
        # checking for non-finite values or not), the method around the partitioned base; DeepSpeed's own
        # clipping off (TrainStep clips at max_grad_norm)
        assert res["ran"] == ("DeepSpeedEngine", "ZeroEngine", stage, 2, job[6], _CLASS[method], 0.0), job
        if job[6]:  # skip_nonfinite on finite steps: nothing skipped, the same run
            assert [log["tram/step_skipped"] for log in res["logs"]] == [0.0] * STEPS
        if method not in refs:
            refs[method] = H.cached_reference(method, batch=4, steps=STEPS)
        ref = refs[method]
        assert H.max_rel_diff(res["params"], ref["params"]) <= RTOL, job
        _assert_logs_match(res["logs"], ref, rtol=RTOL)
        # ZeRO steps the base optimizer once per parameter group: the lr of each step, repeated
        lrs = [lr for i, lr in enumerate(res["lrs"]) if i == 0 or res["lrs"][i - 1] != lr]
        assert lrs == [H.expected_lr(s, STEPS) for s in range(STEPS)], res["lrs"]
        if job[5]:
            assert res["tram_files"] == ["tram_rank0.pt", "tram_rank1.pt"]
            assert res["resumed_step_count"] == STEPS
            bad = [k for k in res["params"] if not torch.equal(res["resumed"][k], res["params"][k])]
            assert not bad, f"resumed run differs: {bad[:4]}"
            assert res["resumed_logs"] == res["logs"][job[5]:]

