"""The optimizer API contract: restore, scheduler, state_dict, closure, errors, non-finite d."""
import math
import warnings

import pytest
import torch

from tram_dist import ASAM, SAM, TRAM, FisherSAM, NonFiniteAscentError, PreviousParams, TRAMFisher

from tinymodels import lm_batch, params_of, tiny_gpt2


def loss_of(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "sample_index"}
    return model(**inputs).loss


@pytest.mark.parametrize("cls,kw,d", [(TRAM, {}, 0.3), (SAM, {}, None), (ASAM, {}, None),
                                      (FisherSAM, {}, None), (TRAMFisher, {}, None)])
def test_restore_is_bit_exact_with_lr_zero(cls, kw, d):
    model = tiny_gpt2(dtype=torch.bfloat16)
    before = params_of(model)
    opt = cls(model.parameters(), torch.optim.AdamW, lr=0.0, weight_decay=0.0, **kw)
    batch = lm_batch()
    loss_of(model, batch).backward()
    opt.first_step(d)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    loss_of(model, batch).backward()
    opt.second_step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    # restore copies in place: the parameter storage was never rebound
    assert all(p.grad is None for p in model.parameters())


def test_restore_copies_in_place_never_rebinds_storage():
    model = tiny_gpt2()
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    opt = TRAM(model.parameters(), torch.optim.SGD, lr=0.0)
    loss_of(model, lm_batch()).backward()
    opt.first_step(0.1)
    loss_of(model, lm_batch()).backward()
    opt.second_step()
    assert ptrs == {n: p.data_ptr() for n, p in model.named_parameters()}


def test_param_groups_shared_scheduler_drives_base():
    model = tiny_gpt2()
    opt = TRAM(model.parameters(), torch.optim.AdamW, lr=1.0)
    assert opt.param_groups is opt.base.param_groups
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    model(**{k: v for k, v in lm_batch().items() if k != "sample_index"}).loss.backward()
    opt.first_step(0.1)
    model(**{k: v for k, v in lm_batch().items() if k != "sample_index"}).loss.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()"
        opt.second_step()
        sched.step()
    assert opt.base.param_groups[0]["lr"] == pytest.approx(0.5)
    # after load_state_dict the groups are shared again
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups is opt.base.param_groups
    sched.step()
    assert opt.base.param_groups[0]["lr"] == pytest.approx(0.25)


def test_base_optimizer_instance_and_class_are_equivalent():
    m1, m2 = tiny_gpt2(), tiny_gpt2()
    o1 = TRAM(m1.parameters(), torch.optim.AdamW, lr=1e-2, betas=(0.9, 0.99))
    o2 = TRAM(m2.parameters(), torch.optim.AdamW(m2.parameters(), lr=1e-2, betas=(0.9, 0.99)))
    for m, o in ((m1, o1), (m2, o2)):
        for _ in range(2):
            loss_of(m, lm_batch()).backward()
            o.first_step(0.05)
            loss_of(m, lm_batch()).backward()
            o.second_step()
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.equal(a, b), n


def test_state_dict_round_trip_resumes_exactly():
    torch.manual_seed(0)
    batches = [lm_batch(seed=s) for s in range(4)]

    def run(model, opt, bs):
        for b in bs:
            loss_of(model, b).backward()
            opt.swap_in_target()
            opt.first_step(0.02)
            loss_of(model, b).backward()
            opt.second_step()

    ref = tiny_gpt2()
    ref_opt = TRAM(ref.parameters(), torch.optim.AdamW, lr=1e-2)
    ref_opt.attach_trust_region(PreviousParams())
    run(ref, ref_opt, batches)

    a = tiny_gpt2()
    a_opt = TRAM(a.parameters(), torch.optim.AdamW, lr=1e-2)
    a_opt.attach_trust_region(PreviousParams())
    run(a, a_opt, batches[:2])
    saved_model = {k: v.clone() for k, v in a.state_dict().items()}
    saved_opt = a_opt.state_dict()
    assert saved_opt["base"]["state"], "AdamW moments must be in the state dict"
    assert all("tr_target" in s for s in saved_opt["tram"]["state"].values())
    assert all("backup" not in s for s in saved_opt["tram"]["state"].values())
    assert saved_opt["tram"]["step_count"] == 2

    b = tiny_gpt2(seed=7)
    b.load_state_dict(saved_model)
    b_opt = TRAM(b.parameters(), torch.optim.AdamW, lr=1e-2)
    b_opt.attach_trust_region(PreviousParams())
    b_opt.load_state_dict(saved_opt)
    run(b, b_opt, batches[2:])
    for (n, x), (_, y) in zip(ref.named_parameters(), b.named_parameters()):
        assert torch.equal(x, y), n
    assert b_opt.step_count == 4


def test_closure_step_equals_manual_steps():
    batch = lm_batch()
    m1, m2 = tiny_gpt2(), tiny_gpt2()
    o1 = SAM(m1.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    o2 = SAM(m2.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)

    def closure():
        o1.zero_grad()
        loss = loss_of(m1, batch)
        loss.backward()
        return loss

    loss = o1.step(closure)
    assert torch.isfinite(loss)
    loss_of(m2, batch).backward()
    o2.first_step()
    loss_of(m2, batch).backward()
    o2.second_step()
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.equal(a, b), n
    with pytest.raises(RuntimeError, match="closure"):
        o1.step()


def test_tram_closure_takes_divergence_callable():
    model = tiny_gpt2()
    opt = TRAM(model.parameters(), torch.optim.SGD, lr=0.1)
    batch = lm_batch()
    calls = []

    def closure():
        opt.zero_grad()
        loss = loss_of(model, batch)
        loss.backward()
        return loss

    opt.step(closure, divergence=lambda: calls.append(1) or 0.1)
    assert calls == [1] and opt.step_count == 1 and opt.last_ascent["divergence"] == pytest.approx(0.1)


@pytest.mark.parametrize("make,match", [
    (lambda ps: TRAM(ps, torch.optim.SGD, nu=-1e-5, lr=0.1), "nu must be"),
    (lambda ps: SAM(ps, torch.optim.SGD, rho=-0.1, lr=0.1), "rho must be"),
    (lambda ps: ASAM(ps, torch.optim.SGD, eta=-0.01, lr=0.1), "eta must be"),
    (lambda ps: FisherSAM(ps, torch.optim.SGD, eta=float("nan"), lr=0.1), "eta must be"),
    (lambda ps: TRAM(ps, torch.optim.SGD, rho=0.05, lr=0.1), "unknown option.*rho"),
    (lambda ps: SAM(ps, torch.optim.AdamW, lr=0.1, bettas=(0.9, 0.99)), "unknown option.*bettas"),
    (lambda ps: TRAM(ps, torch.optim.SGD, lr=0.1, on_nonfinite="ignore"), "on_nonfinite"),
    (lambda ps: TRAM(ps, torch.optim.SGD(ps, lr=0.1), lr=0.2), "unknown option"),
    (lambda ps: TRAM(ps[:1], torch.optim.SGD(ps, lr=0.1)), "differ"),
    (lambda ps: TRAM([{"params": ps, "nu": -1.0}], torch.optim.SGD, lr=0.1), "nu must be"),
])
def test_bad_hyperparameters_raise_value_error(make, match):
    ps = [torch.nn.Parameter(torch.randn(3)) for _ in range(2)]
    with pytest.raises(ValueError, match=match):
        make(ps)


def test_wrong_call_order_and_divergence_usage():
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    opt = TRAM([p], torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="first_step"):
        opt.second_step()
    with pytest.raises(ValueError, match="needs the trust-region divergence"):
        opt.first_step()
    sam = SAM([p], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="takes no divergence"):
        sam.first_step(0.1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_divergence_skips_ascent_counts_and_warns_once(bad):
    model = tiny_gpt2()
    before = params_of(model)
    opt = TRAM(model.parameters(), torch.optim.SGD, lr=0.0)
    batch = lm_batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            loss_of(model, batch).backward()
            m = opt.first_step(bad)
            assert m["ascent_skipped"]
            for n, p in model.named_parameters():  # never perturbed
                assert torch.equal(p, before[n])
            loss_of(model, batch).backward()
            opt.second_step()
    assert opt.skipped_ascents == 2
    assert sum("skipping the ascent" in str(w.message) for w in caught) == 1


def test_nonfinite_divergence_raise_option_leaves_parameters_untouched():
    model = tiny_gpt2()
    before = params_of(model)
    opt = TRAM(model.parameters(), torch.optim.SGD, lr=0.1, on_nonfinite="raise")
    opt.attach_trust_region(PreviousParams())
    loss_of(model, lm_batch()).backward()
    opt.swap_in_target()
    with pytest.raises(NonFiniteAscentError, match="non-finite divergence"):
        opt.first_step(float("nan"))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_nonfinite_gradient_norm_skips():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    opt = SAM([p], torch.optim.SGD, lr=0.0)
    with pytest.warns(RuntimeWarning, match="non-finite perturbation norm"):
        assert opt.first_step()["ascent_skipped"]
    assert torch.equal(p.detach(), torch.ones(3))


def test_restore_after_exception_between_passes():
    model = tiny_gpt2()
    before = params_of(model)
    opt = TRAM(model.parameters(), torch.optim.SGD, lr=0.1)
    loss_of(model, lm_batch()).backward()
    opt.first_step(0.5)
    opt.restore()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    opt.restore()  # idempotent


def test_restore_after_swap_touches_only_swapped_slices():
    model = tiny_gpt2()
    before = params_of(model)
    opt = TRAM(model.parameters(), torch.optim.SGD, lr=0.1)
    opt.attach_trust_region(PreviousParams())
    loss_of(model, lm_batch()).backward()
    model.transformer.wpe.weight.grad = None  # trainable, but no gradient this step
    opt.swap_in_target()
    opt.restore()  # e.g. the target forward raised
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert "backup" not in opt.state[model.transformer.wpe.weight]
