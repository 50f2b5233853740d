"""The method as it runs: d measures the trust region (not dropout noise or rounding), the
ascent is never skipped for a rounding-negative d, and the step's metrics report what was
actually done (radius, ||eps|| intended and applied, global losses, lr)."""
import math
import warnings

import pytest
import torch

from tram_dist import TRAM, TrainStep, build_method
from tram_dist.dropout import RNGState, eval_mode, set_dropout

from tinymodels import lm_batch, params_of, tiny_gpt2

DROPOUT = dict(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)


def _first_step(method, target_dropout, *, sigma=1e-5, checkpointing=False, steps=1, **kw):
    model = tiny_gpt2(**DROPOUT)
    if checkpointing:
        model.gradient_checkpointing_enable()
    opt, tr = build_method(method, model, lr=1e-3, sigma=sigma, **kw)
    step = TrainStep(model, opt, trust_region=tr, target_dropout=target_dropout)
    torch.manual_seed(0)
    return [step(lm_batch(seed=s)) for s in range(steps)], opt, model


# --------------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_masks_make_d_theta_prev_zero_at_step_one(checkpointing):
    """At step 1 the target theta_{t-1} is theta itself: with the pass-1 masks replayed, d = 0."""
    ms, _, _ = _first_step("tram-theta-prev", "shared", checkpointing=checkpointing)
    assert abs(ms[0].divergence) <= 1e-7


def test_independent_masks_measure_dropout_noise():
    """The contrast that makes the test above meaningful: fresh masks give d of the dropout noise."""
    ms, _, _ = _first_step("tram-theta-prev", "independent")
    assert ms[0].divergence > 1e-4
    off, _, _ = _first_step("tram-theta-prev", "off")
    assert off[0].divergence > 1e-4  # eval-mode target against the pass-1 forward with dropout


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_masks_d_x_vanishes_with_sigma_and_grows_with_it(checkpointing):
    d = {s: _first_step("tram-x", "shared", sigma=s, checkpointing=checkpointing)[0][0].divergence
         for s in (1e-12, 1e-3, 1e-2)}
    assert abs(d[1e-12]) <= 1e-7
    assert 1e-7 < d[1e-3] < d[1e-2]
    indep = _first_step("tram-x", "independent", sigma=1e-12)[0][0].divergence
    assert indep > 1e-4  # same sigma, fresh masks: dropout noise, not the trust region


def test_rng_replay_restores_the_stream_afterwards():
    torch.manual_seed(3)
    state = RNGState.capture(torch.device("cpu"))
    a = torch.rand(4)
    with state.replayed():
        b = torch.rand(4)
    c = torch.rand(4)
    torch.manual_seed(3)
    ref = torch.rand(8)
    assert torch.equal(a, b) and torch.equal(torch.cat([a, c]), ref)


def test_target_dropout_bad_value_is_one_clear_error():
    model = tiny_gpt2()
    opt, tr = build_method("tram-x", model, lr=1e-3)
    with pytest.raises(ValueError, match="target_dropout must be one of shared, off, independent"):
        TrainStep(model, opt, trust_region=tr, target_dropout="same")


def test_step_trains_in_train_mode_whatever_mode_the_model_arrives_in():
    model = tiny_gpt2(**DROPOUT)
    model.eval()  # as from_pretrained leaves it
    opt, tr = build_method("tram-theta-prev", model, lr=1e-3)
    step = TrainStep(model, opt, trust_region=tr, target_dropout="independent")
    torch.manual_seed(0)
    m = step(lm_batch())
    assert model.training and all(x.training for x in model.modules())
    assert m.divergence > 1e-4  # dropout was on in the passes


def test_eval_mode_context_restores_each_module():
    model = tiny_gpt2()
    model.train()
    model.transformer.h[0].eval()
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and not model.transformer.h[0].training and model.transformer.h[1].training


def test_set_dropout_sets_every_field_and_refuses_bad_values():
    from transformers import GPT2Config

    cfg = GPT2Config()
    names = set_dropout(cfg, 0.0)
    assert {"resid_pdrop", "embd_pdrop", "attn_pdrop"} <= set(names)
    assert cfg.resid_pdrop == cfg.embd_pdrop == cfg.attn_pdrop == 0.0
    for bad in (-0.1, 1.0, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="dropout must be a number in"):
            set_dropout(cfg, bad)


# ----------------------------------------------------------------------------- negative d
def _with_grads(model, seed=0):
    torch.manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn_like(p)


def test_negative_d_is_taken_as_zero_counted_and_never_skips():
    model = tiny_gpt2()
    _with_grads(model)
    opt = TRAM(model.parameters(), torch.optim.SGD, nu=1e-3, lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no skip warning
        m = opt.first_step(-3e-9)
    assert not m["ascent_skipped"] and m["divergence_clamped"]
    assert m["radius"] == pytest.approx(1e-3, rel=1e-12)
    assert opt.clamped_divergences == 1 and opt.skipped_ascents == 0
    opt.second_step()


def test_step_metrics_report_the_clamp():
    model = tiny_gpt2()
    opt, tr = build_method("tram-x", model, lr=1e-3, nu=1e-4)

    def negative(target, current, mask):  # a divergence that rounding drove below 0
        return -1e-9 * mask.sum().float(), mask.sum()

    step = TrainStep(model, opt, trust_region=tr, divergence=negative)
    m = step(lm_batch())
    assert m.divergence < 0 and m.divergence_clamped and not m.ascent_skipped
    assert m.radius == pytest.approx(1e-4, rel=1e-6) and m.eps_norm > 0


# ------------------------------------------------------------------------------- metrics
def test_eps_norm_and_radius_with_groups_of_different_radii_in_float64():
    """||eps|| and the radius against float64 Eq. 7 with a per-group nu (the old eps_norm
    took the last group's radius for all)."""
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(50)), torch.nn.Parameter(torch.randn(30))
    ga, gb = torch.randn(50), torch.randn(30)
    a.grad, b.grad = ga.clone(), gb.clone()
    ta, tb = a.detach().double().clone(), b.detach().double().clone()
    opt = TRAM([{"params": [a], "nu": 0.05}, {"params": [b], "nu": 0.5}], torch.optim.SGD, lr=0.0,
               radius_scale=2.0)
    d = 0.01
    m = opt.first_step(d)
    # independent float64 reference of Eq. 7 with lambda: eps_g = (lambda d + nu_g) theta^2 g / ||theta g||
    norm = torch.sqrt(((ta * ga.double()) ** 2).sum() + ((tb * gb.double()) ** 2).sum())
    ra, rb = 2.0 * d + 0.05, 2.0 * d + 0.5
    ea, eb = ra * ta ** 2 * ga.double() / norm, rb * tb ** 2 * gb.double() / norm
    eps = torch.sqrt((ea ** 2).sum() + (eb ** 2).sum()).item()
    radius = math.sqrt((ra ** 2 * ((ta * ga.double()) ** 2).sum() + rb ** 2 * ((tb * gb.double()) ** 2).sum()).item()) / norm.item()
    assert m["eps_norm"] == pytest.approx(eps, rel=1e-5)
    assert m["radius"] == pytest.approx(radius, rel=1e-5)
    applied = math.sqrt(((a.detach().double() - ta) ** 2).sum() + ((b.detach().double() - tb) ** 2).sum())
    assert applied == pytest.approx(eps, rel=1e-4)  # fp32 storage keeps this eps
    assert math.sqrt(m["applied_sq"].item()) == pytest.approx(applied, rel=1e-5)
    opt.second_step()


def test_radius_scale_is_eq7_times_lambda_in_float64():
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(40))
    g = torch.randn(40)
    p.grad = g.clone()
    theta = p.detach().double().clone()
    opt = TRAM([p], torch.optim.SGD, lr=0.0, nu=1e-5, radius_scale=100.0)
    opt.first_step(3e-4)
    eps = (100.0 * 3e-4 + 1e-5) * theta ** 2 * g.double() / torch.sqrt(((theta * g.double()) ** 2).sum())
    # stored in fp32: theta + eps is rounded once (half an ulp, 2^-24 relative), the float32
    # math of the scale adds a few 2^-24 relative to eps itself
    bound = (theta + eps).abs() * 2.0 ** -24 + eps.abs() * 8 * 2.0 ** -24
    assert ((p.detach().double() - theta - eps).abs() <= bound).all()
    opt.second_step()
    assert torch.equal(p.detach().double(), theta)  # lr 0: restored bit-exactly


@pytest.mark.parametrize("bad", [-1.0, float("inf"), float("nan"), "2"])
def test_radius_scale_out_of_range_names_the_argument(bad):
    model = tiny_gpt2()
    for method in ("tram-x", "tram-fisher"):
        with pytest.raises(ValueError, match="radius_scale must be a finite number >= 0"):
            build_method(method, model, lr=1e-3, radius_scale=bad)


def test_tram_fisher_radius_scale_multiplies_rho():
    model = tiny_gpt2()
    _with_grads(model)
    opt, _ = build_method("tram-fisher", model, lr=0.0, rho=0.1, radius_scale=3.0)
    m = opt.first_step()
    assert m["radius"] == pytest.approx(0.3, rel=1e-9) and m["eps_norm"] > 0
    opt.second_step()


def test_step_metrics_lr_radius_and_applied_eps():
    model = tiny_gpt2()
    opt, tr = build_method("tram-theta-prev", model, lr=1e-3, nu=1e-2)
    step = TrainStep(model, opt, trust_region=tr)
    m = step(lm_batch())
    assert m.lr == 1e-3
    assert m.radius == pytest.approx(m.divergence + 1e-2, rel=1e-6)
    assert m.eps_applied == pytest.approx(m.eps_norm, rel=1e-3)  # fp32 keeps an eps of this size
    assert m.perturbed_loss is not None and math.isfinite(m.loss)
    assert set(m.as_dict()) >= {"radius", "lr", "eps_applied", "loss", "perturbed_loss"}
    assert "_deferred" not in m.as_dict()


def test_bf16_rounding_swallowing_the_ascent_is_reported_and_warned_once():
    model = tiny_gpt2(dtype=torch.bfloat16)
    opt, tr = build_method("tram-theta-prev", model, lr=1e-4, nu=1e-6)
    step = TrainStep(model, opt, trust_region=tr)
    with pytest.warns(RuntimeWarning, match="survived rounding to the working dtype") as record:
        ms = [step(lm_batch(seed=s)) for s in range(3)]
        applied = [m.eps_applied for m in ms]
    assert sum("survived rounding" in str(w.message) for w in record) == 1
    assert applied[0] < 0.5 * ms[0].eps_norm


def test_plain_step_reports_global_loss_and_lr():
    model = tiny_gpt2()
    opt, _ = build_method("adamw", model, lr=2e-3)
    m = TrainStep(model, opt)(lm_batch())
    assert m.lr == 2e-3 and m.perturbed_loss is None and m.eps_applied is None
    assert math.isfinite(m.loss)


def test_tied_weight_listed_twice_is_used_once_and_restored_exactly():
    model = tiny_gpt2()
    params = [p for _, p in model.named_parameters(remove_duplicate=False)]
    assert len(params) > len(list(model.parameters()))  # GPT-2 ties lm_head to wte
    with pytest.warns(UserWarning, match="listed more than once"):
        opt = TRAM(params, torch.optim.SGD, lr=0.0, nu=1e-2)
    _with_grads(model)
    before = params_of(model)
    opt.first_step(0.0)
    opt.second_step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


# ------------------------------------------------------------------------- SAM API compat
def test_base_optimizer_alias_and_sam_adaptive_pointer():
    from tram_dist import SAM

    model = tiny_gpt2()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    assert opt.base_optimizer is opt.base
    with pytest.raises(ValueError, match=r"ASAM\(params, base, rho=..., eta=0\)"):
        SAM(model.parameters(), torch.optim.SGD, lr=0.1, adaptive=True)


def test_plain_base_optimizer_state_dict_loads_with_a_warning():
    model = tiny_gpt2()
    plain = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _with_grads(model)
    plain.step()
    opt = TRAM(model.parameters(), torch.optim.AdamW, lr=1e-3)
    with pytest.warns(UserWarning, match="plain optimizer state dict"):
        opt.load_state_dict(plain.state_dict())
    p0 = next(iter(model.parameters()))
    assert torch.equal(opt.base.state[p0]["exp_avg"], plain.state[p0]["exp_avg"])
    assert opt.param_groups is opt.base.param_groups and opt.param_groups[0]["nu"] == 1e-5
    # davda54/sam's wrapper state: old_p / e_w are transient and dropped
    sam_like = {"state": {0: {"old_p": torch.zeros(3)}}, "param_groups": [
        {**{k: v for k, v in plain.state_dict()["param_groups"][0].items()}, "rho": 0.05, "adaptive": False}]}
    with pytest.warns(UserWarning, match="davda54/sam style"):
        opt.load_state_dict(sam_like)


# ----------------------------------------------------------------------- a cheaper d
def _d_with(fraction, batch_parts, method="tram-x", seed=0, **model_kw):
    model = tiny_gpt2(**model_kw)
    opt, tr = build_method(method, model, lr=0.0, sigma=0.05, base_optimizer=torch.optim.SGD)
    step = TrainStep(model, opt, trust_region=tr, seed=seed, divergence_fraction=fraction)
    torch.manual_seed(0)
    return step(batch_parts).divergence


def test_divergence_fraction_is_independent_of_the_split():
    from tinymodels import split
    batch = lm_batch(n=8, seq=12, seed=3)
    whole = _d_with(0.5, [batch])
    parts = _d_with(0.5, split(batch, [1, 3, 4]))
    assert parts == pytest.approx(whole, rel=1e-5)
    assert whole != _d_with(1.0, [batch])  # it is a subset


def test_divergence_fraction_estimate_is_bounded_by_the_sampling_error():
    """d on half the sequences against d on all: sequences of equal length, so d is the mean of
    per-sequence d_i and the subset mean is within 4 standard errors (finite population)."""
    n = 16
    batch = lm_batch(n=n, seq=12, seed=5)
    for seed in range(2):  # the seed picks both the noise and the rows
        full = _d_with(1.0, [batch], seed=seed)
        per_seq = [_d_with(1.0, [{k: v[i:i + 1] for k, v in batch.items()}], seed=seed) for i in range(n)]
        assert sum(per_seq) / n == pytest.approx(full, rel=1e-4)
        model = tiny_gpt2()
        opt, tr = build_method("tram-x", model, lr=0.0, sigma=0.05, base_optimizer=torch.optim.SGD)
        step = TrainStep(model, opt, trust_region=tr, seed=seed, divergence_fraction=0.5)
        rows = step._divergence_rows([(batch, batch["sample_index"])])[0]
        k = int(rows.sum())
        assert 0 < k < n
        frac = step(batch).divergence
        chosen = [d for d, r in zip(per_seq, rows.tolist()) if r]
        assert frac == pytest.approx(sum(chosen) / k, rel=1e-4)  # exactly the chosen rows' mean
        std = (sum((d - full) ** 2 for d in per_seq) / (n - 1)) ** 0.5
        bound = 4 * std / k ** 0.5 * ((n - k) / (n - 1)) ** 0.5
        assert abs(frac - full) <= bound, (seed, frac, full, bound)


def test_divergence_fraction_keeps_shared_dropout_masks():
    d = _d_with(0.5, [lm_batch(n=8, seq=12)], method="tram-theta-prev", **DROPOUT)
    assert abs(d) <= 1e-7


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, float("nan"), "0.5"])
def test_divergence_fraction_bad_values(bad):
    model = tiny_gpt2()
    opt, tr = build_method("tram-x", model, lr=1e-3)
    with pytest.raises(ValueError, match=r"divergence_fraction must be a number in \(0, 1\]"):
        TrainStep(model, opt, trust_region=tr, divergence_fraction=bad)
