"""TrainStep: the paper's algorithms end to end, accumulation, AMP overflow, clipping, errors."""
import math

import pytest
import torch

from tram_dist import (METHODS, ASAM, SAM, TRAM, NoisyInputs, PreviousParams, TRAMFisher, TrainStep,
                       build_method)

from tinymodels import lm_batch, params_of, split, tiny_gpt2


class ParamRecorder:
    """Records the parameters each forward pass sees."""

    def __init__(self, model):
        self.seen = []
        model.register_forward_pre_hook(lambda m, a, k: self.seen.append(params_of(m)), with_kwargs=True)


def grads64(model32, batch, noise=None, seed=0, step=0):
    m = tiny_gpt2().double()
    m.load_state_dict({k: v.double() for k, v in model32.state_dict().items()})
    inputs = {k: v for k, v in batch.items() if k != "sample_index"}
    if noise is not None:
        z = noise.sample((*inputs["input_ids"].shape, m.config.n_embd), seed=seed, step=step,
                         sample_index=batch["sample_index"], device="cpu", dtype=torch.float32).double()
        out = m(inputs_embeds=m.get_input_embeddings()(inputs["input_ids"]) + z,
                attention_mask=inputs["attention_mask"], labels=inputs["labels"])
    else:
        out = m(**inputs)
    out.loss.backward()
    return m, {n: p.grad for n, p in m.named_parameters()}, out.logits.detach()


def assert_close_to(expected64, got32, what, theta0):
    """theta + eps rounded to float32 (4 ulps), plus the float32 passes' gradient error:
    1e-5 of the tensor's largest |eps| (float32 backprop against float64)."""
    eps_scale = (expected64 - theta0.double()).abs().max()
    tol = 4 * torch.finfo(torch.float32).eps * expected64.abs() + 1e-5 * eps_scale + 1e-12
    err = (got32.double() - expected64).abs()
    assert (err <= tol).all(), f"{what}: max err {err.max():.3e}"


def test_tram_dx_step_is_algorithm_1_in_float64():
    sigma, nu = 0.05, 1e-5
    model = tiny_gpt2()
    theta0 = params_of(model)
    batch = lm_batch(pad_last=3)
    noise = NoisyInputs(sigma)
    # the float64 reference: g at x, d = mean_t KL(p(x + z) || p(x)) (Eq. 5), eps by Eq. 7
    m64, g, logits = grads64(model, batch)
    with torch.no_grad():
        z = noise.sample((4, 12, 32), seed=3, step=0, sample_index=batch["sample_index"], device="cpu",
                         dtype=torch.float32).double()
        noisy = m64(inputs_embeds=m64.get_input_embeddings()(batch["input_ids"]) + z,
                    attention_mask=batch["attention_mask"]).logits
    lp, lq = torch.log_softmax(noisy, -1), torch.log_softmax(logits, -1)
    valid = torch.zeros(4, 12, dtype=torch.bool)
    valid[:, :-1] = batch["labels"][:, 1:] != -100
    d = float((lp.exp() * (lp - lq)).sum(-1)[valid].mean())
    norm = math.sqrt(sum(float(((theta0[n].double() * g[n]) ** 2).sum()) for n in g))
    expected = {n: theta0[n].double() + (d + nu) * theta0[n].double() ** 2 * g[n] / norm for n in g}

    rec = ParamRecorder(model)
    opt = TRAM(model.parameters(), torch.optim.SGD, nu=nu, lr=0.1)
    metrics = TrainStep(model, opt, trust_region=noise, seed=3)(batch)
    assert len(rec.seen) == 3  # 3 forward passes (pass 1, target, pass 2)
    assert metrics.divergence == pytest.approx(d, rel=1e-4)
    assert metrics.grad_norm == pytest.approx(norm, rel=1e-4)
    for n in expected:
        assert_close_to(expected[n], rec.seen[2][n], n, theta0[n])


def test_tram_fisher_step_is_algorithm_2_in_float64():
    sigma, rho, eta = 0.05, 0.1, 0.1
    model = tiny_gpt2()
    theta0 = params_of(model)
    batch = lm_batch()
    noise = NoisyInputs(sigma)
    _, g, _ = grads64(model, batch, noise=noise, seed=5, step=0)  # g (and so f) at x + z
    finv_g = {n: g[n] / (1 + eta * g[n] ** 2) for n in g}
    denom = math.sqrt(sum(float((g[n] * finv_g[n]).sum()) for n in g))
    expected = {n: theta0[n].double() + rho * finv_g[n] / denom for n in g}
    rec = ParamRecorder(model)
    opt = TRAMFisher(model.parameters(), torch.optim.SGD, rho=rho, eta=eta, lr=0.1)
    TrainStep(model, opt, trust_region=noise, seed=5)(batch)
    assert len(rec.seen) == 2  # 2 forward, 2 backward
    for n in expected:
        assert_close_to(expected[n], rec.seen[1][n], n, theta0[n])


@pytest.mark.parametrize("method", METHODS)
def test_accumulation_equals_one_step_on_the_concatenated_batch(method):
    results = []
    for sizes in ([5], [2, 3], [1, 1, 3]):
        model = tiny_gpt2()
        # SGD base: its update is linear in the gradient, the quantity accumulation must match.
        # (Adam's normalisation turns float32 summation-order noise in near-zero gradients,
        # e.g. the attention key bias whose gradient is exactly 0, into order-lr differences.)
        opt, tr = build_method(method, model, lr=0.1, sigma=0.05, base_optimizer=torch.optim.SGD)
        step = TrainStep(model, opt, trust_region=tr, seed=1)
        ms = [step(split(lm_batch(n=5, seed=s, pad_last=4, start_index=5 * s), sizes)) for s in range(2)]
        results.append((params_of(model), ms))
    (ref, ref_m) = results[0]
    for params, ms in results[1:]:
        for n in ref:
            torch.testing.assert_close(params[n], ref[n], rtol=1e-5, atol=1e-6, msg=n)
        if ref_m[-1].divergence is not None:
            assert ms[-1].divergence == pytest.approx(ref_m[-1].divergence, rel=1e-4)
        assert ms[-1].loss == pytest.approx(ref_m[-1].loss, rel=1e-5)


def test_plain_optimizer_step_equals_a_manual_adamw_step():
    m1, m2 = tiny_gpt2(), tiny_gpt2()
    o1 = torch.optim.AdamW(m1.parameters(), lr=1e-2)
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    batch = lm_batch()
    TrainStep(m1, o1)(batch)
    m2(**{k: v for k, v in batch.items() if k != "sample_index"}).loss.backward()
    o2.step()
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)


class InfOnCall(torch.nn.Module):
    """Wraps a model; the forward numbered `bad_call` returns an infinite loss."""

    def __init__(self, model, bad_call):
        super().__init__()
        self.model, self.bad_call, self.calls = model, bad_call, 0

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def forward(self, **kw):
        self.calls += 1
        out = self.model(**kw)
        if self.calls == self.bad_call:
            out.loss = out.loss * float("inf")
        return out


@pytest.mark.parametrize("bad_call,which", [(1, "pass 1"), (3, "pass 2")])
def test_grad_scaler_overflow_skips_the_step_with_parameters_restored(bad_call, which):
    model = tiny_gpt2()
    before = params_of(model)
    wrapped = InfOnCall(model, bad_call)
    opt = TRAM(model.parameters(), torch.optim.AdamW, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    step = TrainStep(wrapped, opt, trust_region=NoisyInputs(0.01), scaler=scaler)
    m = step(lm_batch())
    assert m.step_skipped, which
    assert scaler.get_scale() == 2.0 ** 9
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert not opt.base.state  # AdamW never stepped
    wrapped.bad_call = -1
    m = step(lm_batch())
    assert not m.step_skipped and any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_grad_scaler_unscales_once_per_pass():
    """With a finite scale the scaled step equals the unscaled one."""
    m1, m2 = tiny_gpt2(), tiny_gpt2()
    o1 = SAM(m1.parameters(), torch.optim.SGD, lr=0.1)
    o2 = SAM(m2.parameters(), torch.optim.SGD, lr=0.1)
    TrainStep(m1, o1, scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 8))(lm_batch())
    TrainStep(m2, o2)(lm_batch())
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=n)


def test_bf16_autocast_step_runs_and_stays_finite():
    model = tiny_gpt2()
    opt = TRAM(model.parameters(), torch.optim.AdamW, lr=1e-3)
    step = TrainStep(model, opt, trust_region=PreviousParams(), autocast_dtype=torch.bfloat16)
    for s in range(2):
        m = step(lm_batch(seed=s))
        assert math.isfinite(m.loss) and math.isfinite(m.perturbed_loss) and not m.ascent_skipped


def test_clipping_applies_to_pass_2_gradients():
    model = tiny_gpt2()
    before = params_of(model)
    opt = ASAM(model.parameters(), torch.optim.SGD, lr=1.0)
    rec = ParamRecorder(model)
    captured = {}
    m = TrainStep(model, opt, max_grad_norm=1e-3)(lm_batch())
    assert m.clip_norm is not None and m.clip_norm > 1e-3
    # SGD with lr 1: the update is the clipped pass-2 gradient, of norm 1e-3
    update = math.sqrt(sum(float(((p.detach() - before[n]) ** 2).sum()) for n, p in model.named_parameters()))
    assert update == pytest.approx(1e-3, rel=1e-4)


def test_step_rejects_mismatched_trust_region_and_bad_options():
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="needs a trust region"):
        TrainStep(model, TRAM(model.parameters(), torch.optim.SGD, lr=0.1))
    with pytest.raises(ValueError, match="noised inputs"):
        TrainStep(model, TRAMFisher(model.parameters(), torch.optim.SGD, lr=0.1), trust_region=PreviousParams())
    with pytest.raises(ValueError, match="takes no trust region"):
        TrainStep(model, SAM(model.parameters(), torch.optim.SGD, lr=0.1), trust_region=NoisyInputs(0.1))
    with pytest.raises(ValueError, match="needs a TRAM optimizer"):
        TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), trust_region=NoisyInputs(0.1))
    with pytest.raises(ValueError, match="max_grad_norm"):
        TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), max_grad_norm=0)
    with pytest.raises(ValueError, match="unknown method"):
        build_method("tram", model, lr=0.1)
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1))
    batch = lm_batch()
    batch["labels"][:] = -100
    with pytest.raises(ValueError, match="no token with a label"):
        step(batch)


def test_exception_in_pass_2_restores_parameters():
    model = tiny_gpt2()
    before = params_of(model)

    class Boom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.calls = model, 0

        def forward(self, **kw):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("out of memory (simulated)")
            return self.model(**kw)

    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="simulated"):
        TrainStep(Boom(), opt)(lm_batch())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


@pytest.mark.parametrize("logit_scale", [1.0, 1e4])
def test_released_code_ascent_in_float64(logit_scale):
    """tram-released-x: eps = s theta^2 (no gradient factor), s = logit_scale * d' /
    (||theta g|| + 1e-12), d' = F.kl_div(reduction='mean') over B x T x V, divided by B again
    (tomsherborne/tram_optimizer's tram.py and kl.py, re-derived)."""
    sigma = 0.05
    model = tiny_gpt2()
    theta0 = params_of(model)
    batch = lm_batch(pad_last=3)
    noise = NoisyInputs(sigma)
    m64, g, logits = grads64(model, batch)
    with torch.no_grad():
        z = noise.sample((4, 12, 32), seed=3, step=0, sample_index=batch["sample_index"], device="cpu",
                         dtype=torch.float32).double()
        noisy = m64(inputs_embeds=m64.get_input_embeddings()(batch["input_ids"]) + z,
                    attention_mask=batch["attention_mask"]).logits
    lp, lq = torch.log_softmax(noisy, -1), torch.log_softmax(logits, -1)
    # every element of B x T x V, padding and the last position included, as kl_div's mean
    d_released = float((lp.exp() * (lp - lq)).mean()) / 4
    norm = math.sqrt(sum(float(((theta0[n].double() * g[n]) ** 2).sum()) for n in g))
    s = logit_scale * d_released / (norm + 1e-12)
    expected = {n: theta0[n].double() + s * theta0[n].double() ** 2 for n in g}

    rec = ParamRecorder(model)
    opt, tr = build_method("tram-released-x", model, lr=0.1, sigma=sigma, logit_scale=logit_scale,
                           base_optimizer=torch.optim.SGD)
    metrics = TrainStep(model, opt, trust_region=tr, seed=3)(batch)
    assert metrics.divergence == pytest.approx(d_released, rel=1e-4)
    assert metrics.radius == pytest.approx(logit_scale * d_released, rel=1e-4)
    eps_norm = s * math.sqrt(sum(float((theta0[n].double() ** 4).sum()) for n in g))
    assert metrics.eps_norm == pytest.approx(eps_norm, rel=1e-4)
    for n in expected:
        eps = (expected[n] - theta0[n].double()).abs()
        tol = 4 * torch.finfo(torch.float32).eps * expected[n].abs() + 1e-4 * eps + 1e-12
        err = (rec.seen[2][n].double() - expected[n]).abs()
        assert (err <= tol).all(), f"{n}: max err {err.max():.3e}"
    moved = [float((rec.seen[2][n].double() - theta0[n].double()).abs().max()) for n in g]
    assert max(moved) > 0  # the ascent is applied (every element moves up, |eps| = s theta^2)


def test_released_code_methods_bad_arguments():
    model = tiny_gpt2()
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="logit_scale must be a finite number >= 0"):
            build_method("tram-released-theta-prev", model, lr=1e-3, logit_scale=bad)
    with pytest.raises(ValueError, match="only tram-released-x, tram-released-theta-prev take it"):
        build_method("tram-x", model, lr=1e-3, logit_scale=10.0)
    with pytest.raises(ValueError, match="sized by logit_scale, not radius_scale"):
        build_method("tram-released-x", model, lr=1e-3, radius_scale=10.0)


class NaNOnGradForward(torch.nn.Module):
    """Wraps a model; the grad-enabled forward numbered ``bad`` (1: pass 1, 2: pass 2 with one
    micro-batch) gets a NaN loss (``what="loss"``) or an infinite gradient in one weight with a
    finite loss (``what="grad"``). No-grad target forwards are not counted."""

    def __init__(self, model, bad, what):
        super().__init__()
        self.model, self.bad, self.what, self.calls, self.armed = model, bad, what, 0, False
        weight = model.transformer.h[0].mlp.c_fc.weight
        weight.register_hook(lambda g: self._grad_hook(g))

    def _grad_hook(self, g):
        if self.armed:
            self.armed = False
            return g * float("inf")
        return g

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def forward(self, **kw):
        out = self.model(**kw)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.bad:
                if self.what == "loss":
                    out.loss = out.loss * float("nan")
                else:
                    self.armed = True
        return out


SKIP_CASES = [("adamw", 1, "loss"), ("adamw", 1, "grad"), ("sam", 2, "loss"), ("sam", 2, "grad"),
              ("tram-theta-prev", 1, "loss"), ("tram-theta-prev", 2, "grad"), ("trpo", 1, "grad"),
              ("asam+trpo", 2, "loss")]


@pytest.mark.parametrize("method,bad,what", SKIP_CASES)
def test_skip_nonfinite_skips_the_step_with_theta_restored_and_counts_it(method, bad, what):
    model = tiny_gpt2()
    wrapped = NaNOnGradForward(model, bad=-1, what=what)
    opt, tr = build_method(method, model, lr=1e-2)
    step = TrainStep(wrapped, opt, trust_region=tr, skip_nonfinite=True)
    assert not step(lm_batch(seed=0)).step_skipped  # AdamW has state from here on
    theta = params_of(model)
    base = getattr(opt, "base", opt)
    moments = {k: v.clone() for st in base.state.values() for k, v in st.items() if torch.is_tensor(v)}
    wrapped.calls, wrapped.bad = 0, bad
    m = step(lm_batch(seed=1))
    assert m.step_skipped and step.skipped_steps == 1
    assert all(torch.equal(p, theta[n]) for n, p in model.named_parameters())  # bit for bit
    assert all(p.grad is None for p in model.parameters())
    now = {k: v for st in base.state.values() for k, v in st.items() if torch.is_tensor(v)}
    assert now.keys() == moments.keys() and all(torch.equal(now[k], moments[k]) for k in now)
    wrapped.bad = -1
    m = step(lm_batch(seed=2))  # the run goes on
    assert not m.step_skipped and step.skipped_steps == 1 and math.isfinite(m.loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, theta[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("what", ["loss", "grad"])
def test_without_skip_nonfinite_the_same_step_writes_nan(what):
    """The control: what skip_nonfinite prevents (the run then stops on its NaN check)."""
    model = tiny_gpt2()
    opt, tr = build_method("sam", model, lr=1e-2)
    step = TrainStep(NaNOnGradForward(model, bad=2, what=what), opt, trust_region=tr)
    m = step(lm_batch())
    assert not m.step_skipped
    assert any(not torch.isfinite(p).all() for p in model.parameters())
