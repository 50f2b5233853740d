"""TramTrainer (transformers.Trainer + TrainStep) against a plain single-process TrainStep loop.

4 optimizer steps of a tiny GPT-2 (2 layers, width 32, vocabulary 128) on 16 in-memory
sequences, every third partly padding; Trainer reads them in order
(``train_sampling_strategy="sequential"``), the reference (trainer_harness.reference) feeds
the same samples to TrainStep with the optimizer, param groups and linear schedule TramTrainer
builds from TrainingArguments.

Tolerances.
* 0 (bit for bit) where TramTrainer hands TrainStep exactly the micro-batches the reference
  does (one process, any accumulation): the same operations in the same order. This covers
  the parameters, the logged loss (the step's loss as float32, which Trainer sums with the
  zeros of the other micro-batches: exact), grad_norm, learning_rate and every tram/* metric.
* 1e-5 relative where the split of the global batch changes (k micro-batches against one,
  2 DDP ranks against one process): TrainStep computes the same gradient, but float32 sums
  it in another order (per micro-batch / per rank, then accumulated or all-reduced). This is
  the engines tests' fp32 bound (tests/engines/test_engines_invariance.py, measured there
  <= 3.5e-6 for the parameters): parameters as max|a - b| / max|b|, losses and norms relative
  to the reference. d is a KL of two nearby distributions, made of differences of logits: if
  both logit sets agree to rtol, d moves by at most 2 sqrt(2 d) rtol + rtol d (the engines
  tests' derivation), used for tram/divergence.
* Resume: 0. A resumed run must repeat the uninterrupted one bit for bit (TRAM's target and
  counters come back with the optimizer state, the RNG with Trainer's rng_state.pth).
"""
import math
import os

import pytest
import torch

import trainer_harness as H
from tram_dist import METHODS

STEPS = 4
RTOL = 1e-5


def _assert_same_params(a, b):
    bad = [k for k in b if not torch.equal(a[k], b[k])]
    assert not bad, f"parameters differ (max rel {H.max_rel_diff(a, b):.3g}): {bad[:4]}"


def _assert_logs_match(logs, ref, rtol=0.0):
    """Trainer's logs per step against the reference's StepMetrics: loss, grad_norm (the
    descent gradient's norm before clipping), learning_rate, and TRAM's metrics."""
    assert len(logs) == len(ref["metrics"])
    for s, (log, m) in enumerate(zip(logs, ref["metrics"])):
        pairs = [("loss", m["loss"]), ("grad_norm", m["clip_norm"]), ("learning_rate", m["lr"])]
        pairs += [(f"tram/{k}", m[k]) for k in ("radius", "grad_norm", "eps_norm", "eps_applied",
                                                "perturbed_loss") if m[k] is not None]
        for key, want in pairs:
            want = float(torch.tensor(want, dtype=torch.float32)) if key == "loss" else want
            assert log[key] == pytest.approx(want, rel=rtol, abs=0), (s, key, log[key], want)
        if m["divergence"] is not None:
            d = m["divergence"]
            tol = 2 * math.sqrt(2 * max(d, 0.0)) * rtol + rtol * abs(d)
            assert abs(log["tram/divergence"] - d) <= tol, (s, log["tram/divergence"], d, tol)
            assert log["tram/ascent_skipped"] == float(m["ascent_skipped"]) == 0.0


# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["tram-theta-prev", "tram-x", "adamw"])
def test_plain_matches_train_step(method, tmp_path):
    """One process, no accumulation: parameters, logs (loss, grad_norm, learning_rate, tram/*)
    bit for bit; the lr the base optimizer used each step is the schedule's."""
    trainer, rec = H.train(method, str(tmp_path), batch=4, steps=STEPS)
    ref = H.reference(method, batch=4, steps=STEPS)
    _assert_same_params(H.params_of(trainer.model), ref["params"])
    _assert_logs_match(rec.logs, ref)
    expected = [H.expected_lr(s, STEPS) for s in range(STEPS)]
    assert rec.lrs == ref["lrs"] == expected  # what the base optimizer stepped with
    assert [log["learning_rate"] for log in rec.logs] == expected
    if method == "adamw":
        assert not any(k.startswith("tram/") for k in rec.logs[0])
    else:
        assert {"tram/divergence", "tram/radius", "tram/grad_norm", "tram/eps_norm", "tram/eps_applied",
                "tram/ascent_skipped", "tram/perturbed_loss"} <= set(rec.logs[0])
        assert all(log["tram/eps_norm"] > 0 for log in rec.logs)  # the ascent happened
        assert trainer.tram_optimizer._phase == "idle"  # nothing left perturbed or swapped
    # the same dicts reach Trainer's state (and every report_to integration through on_log)
    assert [h for h in trainer.state.log_history if "loss" in h][0]["grad_norm"] == rec.logs[0]["grad_norm"]


# the released ascent at its default logit_scale is ~4e-8 here, under fp32's resolution of theta
@pytest.mark.filterwarnings("ignore:only .* survived rounding:RuntimeWarning")
@pytest.mark.parametrize("method", METHODS)
def test_every_method_matches_train_step(method, tmp_path):
    """Every name build_method knows, with its default options: 2 steps bit for bit, and the
    logs carry the metrics the method has (d for TRAM, the penalty for TRPO / R3F / MESA)."""
    trainer, rec = H.train(method, str(tmp_path), batch=4, steps=2, method_kwargs={})
    ref = H.reference(method, batch=4, steps=2, method_kwargs={})
    _assert_same_params(H.params_of(trainer.model), ref["params"])
    _assert_logs_match(rec.logs, ref)
    if ref["metrics"][0]["penalty"] is not None:
        assert [log["tram/penalty"] for log in rec.logs] == [m["penalty"] for m in ref["metrics"]]


def test_accumulation_equals_one_big_batch(tmp_path):
    """gradient_accumulation_steps=2 of 2 samples: bit for bit the TrainStep of those two
    micro-batches, and within 1e-5 of one batch of 4. No clipping (max_grad_norm=0): grad_norm
    is still logged, and is the norm of the gradient the base optimizer stepped on."""
    trainer, rec = H.train("tram-theta-prev", str(tmp_path), batch=2, accum=2, steps=STEPS, max_grad_norm=0.0)
    split = H.reference("tram-theta-prev", batch=2, accum=2, steps=STEPS, max_grad_norm=math.inf)
    big = H.reference("tram-theta-prev", batch=4, steps=STEPS, max_grad_norm=math.inf)
    params = H.params_of(trainer.model)
    _assert_same_params(params, split["params"])
    _assert_logs_match(rec.logs, split)
    assert H.max_rel_diff(params, big["params"]) <= RTOL
    _assert_logs_match(rec.logs, big, rtol=RTOL)
    # one scheduler step per optimizer step, not per micro-batch
    assert rec.lrs == [H.expected_lr(s, STEPS) for s in range(STEPS)]
    for log, norm in zip(rec.logs, rec.norms):  # grad_norm: what the base step saw (no clipping)
        assert log["grad_norm"] > 0.1 and log["grad_norm"] == pytest.approx(norm, rel=1e-6)


def test_clipping_and_grad_norm(tmp_path):
    """max_grad_norm=0.5 (the norm is ~1.5: clipping is active): clipped inside the step, on
    the descent gradient; grad_norm is the norm before clipping, the base step sees 0.5."""
    trainer, rec = H.train("sam", str(tmp_path), batch=4, steps=2, max_grad_norm=0.5)
    ref = H.reference("sam", batch=4, steps=2, max_grad_norm=0.5)
    _assert_same_params(H.params_of(trainer.model), ref["params"])
    _assert_logs_match(rec.logs, ref)
    assert all(log["grad_norm"] > 1.0 for log in rec.logs)
    assert rec.norms == pytest.approx([0.5, 0.5], rel=1e-5)


def test_logging_window(tmp_path):
    """logging_steps=2: loss and tram/* are the means of the 2 steps since the last log (Trainer's
    own loss: float32 sum, then / 2), tram/ascent_skipped their count, grad_norm and
    learning_rate the last step's (Trainer's convention)."""
    trainer, rec = H.train("tram-theta-prev", str(tmp_path), batch=4, steps=STEPS, logging_steps=2)
    ref = H.reference("tram-theta-prev", batch=4, steps=STEPS)
    _assert_same_params(H.params_of(trainer.model), ref["params"])
    assert len(rec.logs) == 2
    for log, (a, b) in zip(rec.logs, (ref["metrics"][0:2], ref["metrics"][2:4])):
        f32 = [float(torch.tensor(m["loss"], dtype=torch.float32)) for m in (a, b)]
        assert log["loss"] == pytest.approx(sum(f32) / 2, rel=1e-6)
        for key in ("divergence", "radius", "grad_norm", "eps_norm", "eps_applied", "perturbed_loss"):
            assert log[f"tram/{key}"] == pytest.approx((a[key] + b[key]) / 2, rel=1e-12), key
        assert log["tram/ascent_skipped"] == 0.0
        assert (log["grad_norm"], log["learning_rate"]) == (b["clip_norm"], b["lr"])


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_resume_is_bit_exact(dropout, tmp_path):
    """Save at step 2 of 4 (accumulation 2), resume in a new TramTrainer: the last 2 steps,
    their logs and the parameters equal the uninterrupted run's bit for bit. TRAM's state
    (the previous parameters d_theta(t-1) compares with, the step count) is in optimizer.pt.
    With dropout 0.1 the masks after resuming come from Trainer's restored RNG state."""
    out = str(tmp_path / "run")
    save = dict(save_strategy="steps", save_steps=2)
    full, rec_full = H.train("tram-theta-prev", out, batch=2, accum=2, steps=STEPS, dropout=dropout, **save)
    ckpt = os.path.join(out, "checkpoint-2")
    state = torch.load(os.path.join(ckpt, "optimizer.pt"), weights_only=True)
    n_params = len({id(p) for p in full.model.parameters()})
    assert set(state) == {"base", "tram"} and state["tram"]["step_count"] == 2
    assert len(state["tram"]["state"]) == n_params
    assert all("tr_target" in s for s in state["tram"]["state"].values())

    resumed, rec_resumed = H.train("tram-theta-prev", str(tmp_path / "resumed"), batch=2, accum=2, steps=STEPS,
                                   dropout=dropout, resume=ckpt, **save)
    _assert_same_params(H.params_of(resumed.model), H.params_of(full.model))
    assert rec_resumed.logs == rec_full.logs[2:]
    assert rec_resumed.lrs == rec_full.lrs[2:]
    if dropout == 0.0:  # the reference has no dropout RNG to follow
        ref = H.reference("tram-theta-prev", batch=2, accum=2, steps=STEPS)
        _assert_same_params(H.params_of(full.model), ref["params"])


def test_exception_leaves_model_unperturbed(tmp_path):
    """An exception in pass 2 (at theta + eps) propagates out of train() with the parameters
    back at theta, bit for bit: the values after the last completed step."""
    from transformers import TrainerCallback

    after_step = {}

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            after_step.update(H.params_of(model))

    trainer_box = {}

    def fail_in_pass_2(module, args):
        t = trainer_box["t"]
        if t.state.global_step == 1 and t.tram_optimizer._phase == "perturbed":
            raise RuntimeError("boom in pass 2")

    from tram_dist.integrations.transformers import TramTrainer

    args = H.training_args(str(tmp_path), batch=4, steps=2)
    model = H.tiny_gpt2(H.SEED)
    trainer = trainer_box["t"] = TramTrainer(model=model, args=args, train_dataset=H.dataset(),
                                             method="tram-theta-prev", method_kwargs={"nu": 1e-2},
                                             callbacks=[Snapshot()])
    model.register_forward_pre_hook(fail_in_pass_2)
    with pytest.raises(RuntimeError, match="boom in pass 2"):
        trainer.train()
    assert trainer.state.global_step == 1 and trainer.tram_optimizer._phase == "idle"
    _assert_same_params(H.params_of(model), after_step)
    ref = H.reference("tram-theta-prev", batch=4, steps=1)  # step 1 of the same run
    # (the reference's schedule has 1 step, the trainer's 2: both use lr 1e-3 at step 0)
    _assert_same_params(after_step, ref["params"])


def test_method_kwargs_routing_and_errors(tmp_path):
    """sigma/nu go to build_method, divergence_fraction/target_dropout to TrainStep; the seed
    and max_grad_norm come from TrainingArguments; misplaced or unknown options are refused."""
    from tram_dist import NoisyInputs
    from tram_dist.integrations.transformers import TramTrainer, TrainerOptimizer

    args = H.training_args(str(tmp_path), batch=4, steps=1, seed=3, max_grad_norm=0.7)
    trainer = TramTrainer(model=H.tiny_gpt2(), args=args, train_dataset=H.dataset(), method="tram-x",
                          method_kwargs={"sigma": 0.07, "nu": 0.02, "divergence_fraction": 0.5,
                                         "target_dropout": "off"})
    assert isinstance(trainer.create_optimizer(), TrainerOptimizer)
    assert isinstance(trainer.trust_region, NoisyInputs) and trainer.trust_region.sigma == 0.07
    assert trainer.tram_optimizer.param_groups[0]["nu"] == 0.02
    assert trainer.tram_optimizer.param_groups is trainer.optimizer.param_groups  # the scheduler drives it
    step = trainer._train_step(trainer.model)
    assert (step.divergence_fraction, step.target_dropout, step.seed, step.max_grad_norm) == (0.5, "off", 3, 0.7)

    def make(**kw):
        return TramTrainer(model=H.tiny_gpt2(), args=args, train_dataset=H.dataset(), **kw)

    with pytest.raises(ValueError, match="unknown method"):
        make(method="tram-nope")
    with pytest.raises(ValueError, match="learning_rate"):
        make(method="tram-x", method_kwargs={"lr": 1e-3})
    with pytest.raises(ValueError, match="unknown method_kwargs entry 'rhoo'"):
        make(method="sam", method_kwargs={"rhoo": 0.1})
    with pytest.raises(ValueError, match="optimizers"):
        make(method="sam", optimizers=(torch.optim.SGD(H.tiny_gpt2().parameters(), lr=0.1), None))


def test_ddp_two_ranks(tmp_path):
    """2 gloo ranks (one launch): per-device batch 2, and per-device batch 1 with accumulation 2,
    each against the single process on batches of 4 (tram-x: the input noise follows each
    sample's position in the global batch, so it matches across the split); both ranks hold
    the same parameters; a DDP resume from step 2 repeats the run bit for bit."""
    jobs = [("tram-x", 2, 1, STEPS, 2), ("tram-theta-prev", 1, 2, STEPS, None)]
    results = H.spawn(H.ddp_jobs, 2, jobs, str(tmp_path))
    for job in jobs:
        res = results[job]
        ref = H.reference(job[0], batch=4, steps=STEPS)
        assert res["ranks_agree"], job
        assert H.max_rel_diff(res["params"], ref["params"]) <= RTOL, job
        _assert_logs_match(res["logs"], ref, rtol=RTOL)
        assert res["lrs"] == [H.expected_lr(s, STEPS) for s in range(STEPS)]
        if job[4]:
            _assert_same_params(res["resumed"], res["params"])


def test_skip_nonfinite(tmp_path):
    """method_kwargs skip_nonfinite=True reaches TrainStep; a step whose pass-1 loss is NaN is
    skipped with the parameters bit for bit as before it (logged as tram/step_skipped), and
    the run goes on: the other steps update, and the parameters stay finite."""
    from transformers import TrainerCallback

    from tram_dist.integrations.transformers import TramTrainer

    after = []

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            after.append(H.params_of(model))

    trainer_box = {}

    def nan_loss_at_step_1(module, args, output):
        if trainer_box["t"].state.global_step == 1:
            output.loss = output.loss * float("nan")
        return output

    rec = H.Recorder()
    args = H.training_args(str(tmp_path), batch=4, steps=3)
    model = H.tiny_gpt2(H.SEED)
    before = H.params_of(model)
    trainer = trainer_box["t"] = TramTrainer(
        model=model, args=args, train_dataset=H.dataset(), method="tram-theta-prev",
        method_kwargs={"nu": 1e-2, "skip_nonfinite": True}, callbacks=[rec, Snapshot()])
    model.register_forward_hook(nan_loss_at_step_1)
    trainer.train()
    assert trainer.train_step.skip_nonfinite and trainer.train_step.skipped_steps == 1
    assert [log["tram/step_skipped"] for log in rec.logs] == [0.0, 1.0, 0.0]
    assert not torch.equal(after[0]["transformer.wte.weight"], before["transformer.wte.weight"])
    _assert_same_params(after[1], after[0])  # the skipped step left theta as it was
    assert not torch.equal(after[2]["transformer.wte.weight"], after[1]["transformer.wte.weight"])
    assert all(torch.isfinite(p).all() for p in after[2].values())
