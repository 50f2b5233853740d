"""Trust-region targets: noise, previous / pretrained / EMA parameters held beside each slice."""
import pytest
import torch

from tram_dist import EMAParams, NoisyInputs, PretrainedParams, PreviousParams, TRAM, TrainStep
from tram_dist.trust_region import TARGET

from tinymodels import lm_batch, params_of, split, tiny_gpt2


def test_noise_depends_on_seed_step_and_sample_only():
    noise = NoisyInputs(0.5)
    a = noise.sample((4, 3, 2), seed=1, step=2, sample_index=torch.tensor([10, 11, 12, 13]), device="cpu", dtype=torch.float32)
    b = noise.sample((2, 3, 2), seed=1, step=2, sample_index=torch.tensor([12, 13]), device="cpu", dtype=torch.float32)
    assert torch.equal(a[2:], b)  # the same sample gets the same noise in any batch split
    c = noise.sample((2, 3, 2), seed=1, step=3, sample_index=torch.tensor([12, 13]), device="cpu", dtype=torch.float32)
    assert not torch.equal(b, c)
    assert 0.3 < float(a.std()) < 0.7
    u = NoisyInputs(0.5, kind="uniform").sample((64, 16, 8), seed=0, step=0, sample_index=torch.arange(64),
                                                 device="cpu", dtype=torch.float32)
    assert float(u.abs().max()) <= 0.5 and float(u.std()) == pytest.approx(0.5 / 3 ** 0.5, rel=0.05)


def test_noisy_inputs_add_z_to_embeddings_without_touching_the_batch():
    model = tiny_gpt2()
    batch = lm_batch()
    ids = batch["input_ids"].clone()
    inputs = {k: v for k, v in batch.items() if k != "sample_index"}
    noise = NoisyInputs(0.1)
    with torch.no_grad():
        clean = model(**inputs).logits
        with noise.applied(model, seed=0, step=0, sample_index=batch["sample_index"]):
            noisy = model(**inputs).logits
        # the same forward by hand: inputs_embeds = E[x] + z
        z = noise.sample((4, 12, 32), seed=0, step=0, sample_index=batch["sample_index"], device="cpu", dtype=torch.float32)
        by_hand = model(inputs_embeds=model.get_input_embeddings()(ids) + z,
                        attention_mask=inputs["attention_mask"]).logits
        after = model(**inputs).logits  # the hook is gone
    assert torch.equal(batch["input_ids"], ids) and set(batch) == {"input_ids", "attention_mask", "labels", "sample_index"}
    assert not torch.allclose(clean, noisy)
    torch.testing.assert_close(noisy, by_hand)
    assert torch.equal(clean, after)


@pytest.mark.parametrize("bad", [dict(sigma=0.0), dict(sigma=-1), dict(sigma=float("nan")), dict(sigma=1, kind="laplace")])
def test_noisy_inputs_rejects_bad_options(bad):
    with pytest.raises(ValueError):
        NoisyInputs(**bad)


def test_ema_decay_must_be_in_range():
    with pytest.raises(ValueError, match="decay"):
        EMAParams(1.0)


def run_steps(target, n_steps=3, lr=5e-2):
    model = tiny_gpt2()
    opt = TRAM(model.parameters(), torch.optim.SGD, lr=lr)
    step = TrainStep(model, opt, trust_region=target)
    history = [params_of(model)]
    metrics = []
    for s in range(n_steps):
        metrics.append(step(lm_batch(seed=s)))
        history.append(params_of(model))
    return model, opt, history, metrics


def d_ref(model_params, target_params, batch):
    """Eq. 4 in float64: mean over labelled tokens of KL(p(x; target) || p(x; theta))."""
    m = tiny_gpt2().double()
    inputs = {k: v for k, v in batch.items() if k != "sample_index"}
    with torch.no_grad():
        m.load_state_dict({k: v.double() for k, v in target_params.items()}, strict=False)
        lp = torch.log_softmax(m(**inputs).logits, -1)
        m.load_state_dict({k: v.double() for k, v in model_params.items()}, strict=False)
        lq = torch.log_softmax(m(**inputs).logits, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)[:, :-1]
    return float(kl.mean())


def test_previous_params_target_is_theta_t_minus_1():
    model, opt, history, metrics = run_steps(PreviousParams())
    assert metrics[0].divergence == pytest.approx(0.0, abs=1e-9)  # theta_{-1} := theta_0
    for t in (1, 2):
        ref = d_ref(history[t], history[t - 1], lm_batch(seed=t))
        assert metrics[t].divergence == pytest.approx(ref, rel=2e-3, abs=1e-9)
    # after the run the buffer holds theta_{T-1}, the parameters before the last update
    for n, p in model.named_parameters():
        assert torch.equal(opt.state[p][TARGET], history[-2][n]), n


def test_pretrained_params_target_stays_theta_0():
    model, opt, history, metrics = run_steps(PretrainedParams())
    for t in (1, 2):
        ref = d_ref(history[t], history[0], lm_batch(seed=t))
        assert metrics[t].divergence == pytest.approx(ref, rel=2e-3)
    for n, p in model.named_parameters():
        assert torch.equal(opt.state[p][TARGET], history[0][n])


def test_ema_with_zero_decay_equals_previous_params_and_ema_update_formula():
    _, _, h_prev, m_prev = run_steps(PreviousParams())
    _, _, h_ema, m_ema = run_steps(EMAParams(0.0))
    for a, b in zip(h_prev, h_ema):
        for n in a:
            assert torch.equal(a[n], b[n]), n
    model, opt, history, _ = run_steps(EMAParams(0.5), n_steps=2)
    for n, p in model.named_parameters():  # ema_2 = 0.5 (0.5 th0 + 0.5 th0) + 0.5 th1
        ref = 0.5 * history[0][n].double() + 0.5 * history[1][n].double()
        torch.testing.assert_close(opt.state[p][TARGET].double(), ref, rtol=1e-6, atol=1e-7)


def test_previous_params_hold_exactly_one_buffer_beyond_the_backup():
    model, opt, _, _ = run_steps(PreviousParams(), n_steps=2)
    n_params = sum(1 for _ in model.parameters())
    tensors = [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    assert len(tensors) == 2 * n_params  # backup + target per parameter, nothing else
    # never a copy of the model: every buffer is parameter-shaped and beside its parameter
    for p in model.parameters():
        assert set(k for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)) == {"backup", TARGET}
        assert opt.state[p][TARGET].shape == p.shape


def test_target_swap_and_perturbation_keep_parameters_after_restore():
    # lr = 0: after any number of steps the parameters are the originals bit for bit
    model = tiny_gpt2()
    before = params_of(model)
    opt = TRAM(model.parameters(), torch.optim.SGD, lr=0.0)
    step = TrainStep(model, opt, trust_region=PreviousParams())
    for s in range(2):
        m = step(split(lm_batch(seed=s), [2, 2]))
        assert not m.ascent_skipped and m.divergence >= 0
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
