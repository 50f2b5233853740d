"""epsilon-sharpness (``tram_dist.analysis``, Table 5a) and ``table5_analysis`` under DeepSpeed
ZeRO-1/2/3 (fp32 and bf16; also with configs/zero*.json's overlapped reduction and ZeRO-3's
persistent small parameters), DDP and FSDP2 on 2 gloo ranks equal one process.

One spawn of 2 ranks (module fixture). Each rank holds half of every global batch (the last
sample of each is part padding, so the ranks' token counts differ). Under ZeRO the model
passed is what a run gives as ``eval_model``: the DeepSpeed engine (its ``ZeroEngine`` is found
on the ZeRO optimizer), and once (ZeRO-3, ``table5_analysis``) the engine's module with
``engine=`` given. Per engine:

* one no-grad forward first, as in a run (an evaluation precedes the analysis: FSDP2's root unit
  stays gathered then, and ZeRO-3 with persistent parameters keeps them gathered);
* a measurement whose loss raises mid-ascent (the slices perturbed and a backward of the step
  pending) on both ranks: the exception propagates and the parameters are restored;
* the measurement on the fresh model equals the single-process value;
* the parameters afterwards equal those before bitwise: this rank's working-precision slices
  and fp32 masters (``ZeroEngine.slice_groups``), the whole working parameters the forward
  reads (ZeRO-1/2: the module's, all-gathered; ZeRO-3: gathered for the check), no ``.grad``
  left; DDP: the parameters; FSDP2: the local shards;
* fp32 ZeRO: one AdamW step afterwards equals the single-process step (DeepSpeed's gradient
  buffers hold nothing of the ascent), and ``table5_analysis(eval_model, start, domains)`` as
  the launcher calls it (a plain start model on every rank) at that trained state equals the
  single-process Table 5, again restoring the parameters bitwise.

Tolerances (phi is in percent; phi = 100 (f_max - f0) / (1 + f0), ~0.5 here).
* Loss evaluations: f0 and f_max are token-weighted means of float32 batch losses. A different
  split of the batch changes only the rounding of each sample's float32 forward: at most a few
  ulp of f each (measured <= 1.7e-7 = 0.36 ulp(f), f ~ 4.85; float32 against float64: 1.2e-7).
  Allowing LOSS_ULPS = 4 ulp per evaluation, two evaluations move phi by at most
  100 * 2 * 4 ulp32(f) / (1 + f0) = 6.5e-5.
* Ascent: y = clip(lr * sum of the step gradients). The 2-rank gradients are reduced in another
  order than one process sums them; as in test_engines_invariance they agree to FP32_RTOL =
  1e-5 relative, so the unclipped y (clipped coordinates are exact) moves by <= 1e-5
  relative, and f_max - f0, first order in y, by <= 1e-5 relative: FP32_RTOL * phi.
  fp32: |phi - phi_single| <= FP32_RTOL * phi_single + 6.5e-5 (~7e-5; measured 3.8e-7, every
  engine).
* After one AdamW step from the same theta: AdamW's first step is lr * g / (|g| + eps) per
  element, i.e. +-lr wherever |g| >> eps, so the two runs' parameters differ only where g is
  within rounding of 0, where they move f by |g| * 2 lr ~ 1e-11: the same tolerance holds for
  the trained state (measured <= 1.5e-6). The step's parameters: FP32_RTOL relative, as in
  test_engines_invariance (measured 1.1e-6).
* CKA = ||Y^T X||^2 / (||X^T X|| ||Y^T Y||) with X the identical start model's features: a
  relative change delta of the trained model's features Y moves the numerator by <= 2 delta
  and ||Y^T Y|| by <= 2 delta, so CKA by <= 4 delta relative; delta <= FP32_RTOL (the
  parameters' agreement): rel 4e-5 (measured 7.6e-10).
* bf16 (u = 2^-8): compared with the single-process model cast to bf16 (DeepSpeed's fp32
  masters are the bf16 parameters widened, so theta and the box are the same). As in
  test_engines_invariance, 2 ranks round each gradient element at most twice more (the rank's
  partial, the bf16 reduction), so y and f_max - f0 move by <= 2u relative; the forward itself
  is the same bf16 model (GEMMs accumulate in fp32, the loss is taken on fp32 logits), so the
  loss-evaluation term is the fp32 one: |phi - phi_single| <= 2u * phi_single + 6.5e-5 (~4.1e-3;
  measured <= 6.2e-4).
The tolerances can tell a wrong gradient scale (a sum instead of the mean over the 2 ranks):
halving lr moves phi by ~30%.
"""
import math

import pytest
import torch
import torch.distributed as dist

import engines_harness as H

SHARPNESS_KW = dict(epsilon=1e-3, lr=0.05, steps=2, accumulation_steps=2)  # most of y inside the box
N_BATCHES = 4
FP32_ZERO = ("zero1", "zero2", "zero3")
BF16_ZERO = ("zero1-bf16", "zero2-bf16", "zero3-bf16")
# the settings of configs/zero*.json that change where gradients and parameters live: overlapped
# reduction (double buffers) and ZeRO-3's persistent small parameters (they stay gathered and
# are re-gathered by ZeroEngine.publish)
ZERO_VARIANTS = {"zero1+overlap": ("zero1", {"overlap_comm": True}),
                 "zero2+overlap": ("zero2", {"overlap_comm": True}),
                 "zero3+overlap+persistent": ("zero3", {"overlap_comm": True,
                                                        "stage3_param_persistence_threshold": 100000})}
OTHER = ("ddp", "fsdp2")
ENGINES = FP32_ZERO + tuple(ZERO_VARIANTS) + BF16_ZERO + OTHER
TRAINED = FP32_ZERO  # also measured after a training step, through table5_analysis
FP32_RTOL = 1e-5
LOSS_ULPS = 4
BF16_U = 2.0 ** -8
CKA_RTOL = 4 * FP32_RTOL
FAIL_AT_CALL = 8  # f0: calls 1-4; step 1: 5, 6; step 2: 7 (backward, no boundary yet), 8 raises


def global_batches():
    return [H.global_batch(20 + s) for s in range(N_BATCHES)]


def rank_batches(rank: int, world: int):
    return [H.rank_micro_batches(b, rank, world)[0] for b in global_batches()]


def domains(batches):
    return {"a": batches, "b": batches[:2]}


class _Boom(RuntimeError):
    pass


def _failing_loss():
    calls = [0]

    def loss_fn(model, inputs):
        calls[0] += 1
        if calls[0] == FAIL_AT_CALL:
            raise _Boom("loss failed mid-ascent")
        return model(**inputs).loss
    return loss_fn


def _local_state(run):
    """This rank's parameters, as stored: ZeRO: the working slices and masters of the engine,
    then the whole working parameters the forward reads (ZeRO-1/2: the module's, all-gathered;
    ZeRO-3: gathered here, a collective); DDP: the parameters; FSDP2: the local shards."""
    if run.kind.startswith("zero"):
        groups = run.engine.slice_groups(with_grad_only=False)
        slices = [s for g in groups for s in g.slices]
        params = list(run.model.module.parameters())
        if run.kind.startswith("zero3"):
            import deepspeed
            with deepspeed.zero.GatheredParameters(params):
                whole = [p.detach().clone() for p in params]
        else:
            whole = [p.detach().clone() for p in params]
        return [s.param.detach().clone() for s in slices] + [s.theta.detach().clone() for s in slices] + whole
    if run.kind.startswith("fsdp2"):
        from torch.distributed.fsdp import FSDPModule
        for m in run.inner.modules():  # a forward leaves the root unit gathered: back to the shards
            if isinstance(m, FSDPModule):
                m.reshard()
    return [(p.to_local() if hasattr(p, "to_local") else p).detach().clone() for p in run.inner.parameters()]


def _forward(run, batch) -> None:
    with torch.no_grad():
        run.model(**{k: v for k, v in batch.items() if k != "sample_index"})


def _bitwise_equal(a, b) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))


def _no_grads(run) -> bool:
    return all(p.grad is None for p in run.inner.parameters())


def analysis_ranks(rank: int, world: int, engines) -> dict:
    """What the spawned ranks run; returns every rank's results (all-gathered)."""
    from tram_dist.analysis import epsilon_sharpness, table5_analysis

    mine = rank_batches(rank, world)
    out = {}
    for name in engines:
        r = {}
        engine, overrides = ZERO_VARIANTS.get(name, (name, None))
        run = H.Run(engine, "adamw", world, zero_overrides=overrides)
        _forward(run, mine[0])  # as in a run: ZeRO-3's persistent parameters are gathered from now on
        before = _local_state(run)
        try:
            epsilon_sharpness(run.model, mine, loss_fn=_failing_loss(), **SHARPNESS_KW)
            r["raised"] = False
        except _Boom:
            r["raised"] = True
        r["restored_after_raise"] = _bitwise_equal(before, _local_state(run)) and _no_grads(run)
        r["phi"] = epsilon_sharpness(run.model, mine, **SHARPNESS_KW)
        r["restored"] = _bitwise_equal(before, _local_state(run)) and _no_grads(run)
        if name in TRAINED:
            run.train(1)  # TrainStep goes on from the state the measurements left
            r["params"] = run.full_params()
            before = _local_state(run)
            if name == "zero3":  # the engine's module, with the ZeroEngine given
                model, kwargs = run.model.module, {"engine": run.engine}
            else:  # the DeepSpeed engine (a run's eval_model): the ZeroEngine is found on it
                model, kwargs = run.model, {}
            r["table5"] = table5_analysis(model, H.tiny_gpt2(), domains(mine), **SHARPNESS_KW, **kwargs)
            r["restored_table5"] = _bitwise_equal(before, _local_state(run)) and _no_grads(run)
        out[name] = r
        del run
    gathered = [None] * world
    dist.all_gather_object(gathered, out)
    return gathered


def _mean_loss(model, batches) -> float:
    """f(theta): token-weighted mean loss (labels[:, 1:] != -100 count, as the analysis counts)."""
    total = count = 0.0
    with torch.no_grad():
        for b in batches:
            n = float((b["labels"][:, 1:] != -100).sum())
            inputs = {k: v for k, v in b.items() if k != "sample_index"}
            total += float(model(**inputs).loss.double()) * n
            count += n
    return total / count


def _single_reference() -> dict:
    from tram_dist.analysis import epsilon_sharpness, table5_analysis

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        batches = global_batches()
        run = H.Run("single", "adamw", 1)
        model = run.model
        model.eval()
        ref = {"f0": _mean_loss(model, batches)}
        model.train()
        ref["phi"] = epsilon_sharpness(model, batches, **SHARPNESS_KW)
        ref["phi_half_lr"] = epsilon_sharpness(model, batches, **{**SHARPNESS_KW, "lr": SHARPNESS_KW["lr"] / 2})
        run.train(1)
        ref["params"] = run.full_params()
        model.eval()
        ref["f0_trained"] = _mean_loss(model, batches)
        model.train()
        ref["table5"] = table5_analysis(model, H.tiny_gpt2(), domains(batches), **SHARPNESS_KW)
        ref["phi_bf16"] = epsilon_sharpness(H.tiny_gpt2().to(torch.bfloat16), batches, **SHARPNESS_KW)
        return ref
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def results():
    ref = _single_reference()
    ranks = H.spawn(analysis_ranks, 2, ENGINES)
    return ref, ranks


def _ulp32(x: float) -> float:
    return 2.0 ** (math.floor(math.log2(abs(x))) - 23)


def _phi_tol(phi: float, f0: float, rtol: float) -> float:
    """rtol * phi (the ascent's gradients) + two loss evaluations of LOSS_ULPS ulp each."""
    return rtol * abs(phi) + 100.0 * 2 * LOSS_ULPS * _ulp32(f0) / (1.0 + f0)


def test_reference_is_informative(results):
    ref, _ = results
    assert ref["phi"] > 0.1  # most of y inside the box: phi depends on the gradient's scale
    tol = _phi_tol(ref["phi"], ref["f0"], FP32_RTOL)
    assert abs(ref["phi_half_lr"] - ref["phi"]) > 100 * tol  # a wrong gradient scale is caught
    assert all(0.5 < ref["table5"]["cka"][d] < 1.0 - 1e-4 for d in ("a", "b")), ref["table5"]["cka"]


@pytest.mark.parametrize("engine", ENGINES)
def test_sharpness_two_ranks_equals_one_process(results, engine):
    ref, ranks = results
    rtol, expected = (2 * BF16_U, ref["phi_bf16"]) if engine.endswith("bf16") else (FP32_RTOL, ref["phi"])
    tol = _phi_tol(expected, ref["f0"], rtol)
    for rank, res in enumerate(ranks):
        got = res[engine]["phi"]
        assert abs(got - expected) <= tol, f"{engine} rank {rank}: phi {got!r} vs {expected!r} (tol {tol:.2e})"
    assert ranks[0][engine]["phi"] == ranks[1][engine]["phi"]  # both ranks reduce the same sums


@pytest.mark.parametrize("engine", ENGINES)
def test_sharpness_restores_parameters_bitwise(results, engine):
    _, ranks = results
    for rank, res in enumerate(ranks):
        assert res[engine]["restored"], f"{engine} rank {rank}: parameters changed by the measurement"


@pytest.mark.parametrize("engine", ENGINES)
def test_sharpness_restores_parameters_when_the_loss_raises(results, engine):
    _, ranks = results
    for rank, res in enumerate(ranks):
        assert res[engine]["raised"], f"{engine} rank {rank}: the loss's exception did not propagate"
        assert res[engine]["restored_after_raise"], f"{engine} rank {rank}: parameters changed after the exception"


@pytest.mark.parametrize("engine", TRAINED)
def test_training_step_after_measuring_equals_one_process(results, engine):
    ref, ranks = results
    rel = H.max_rel_diff(ranks[0][engine]["params"], ref["params"])
    assert rel <= FP32_RTOL, f"{engine}: parameters after a step differ by {rel:.2e}"


@pytest.mark.parametrize("engine", TRAINED)
def test_table5_analysis_under_zero_equals_one_process(results, engine):
    ref, ranks = results
    for rank, res in enumerate(ranks):
        got = res[engine]["table5"]
        assert list(got["sharpness"]) == ["a", "b"] and list(got["cka"]) == ["a", "b"]
        for d in ("a", "b"):
            expected = ref["table5"]["sharpness"][d]
            tol = _phi_tol(expected, ref["f0_trained"], FP32_RTOL)
            assert abs(got["sharpness"][d] - expected) <= tol, (engine, rank, d, got["sharpness"][d], expected)
            assert got["cka"][d] == pytest.approx(ref["table5"]["cka"][d], rel=CKA_RTOL), (engine, rank, d)
        assert res[engine]["restored_table5"], f"{engine} rank {rank}: parameters changed by table5_analysis"
