"""The trust-region regularizers of Table 3 (TRPO, R3F, MESA, alone and under ASAM) against
float64 references written from the papers: loss + lambda * KL, the KL summed over the
vocabulary and averaged over the labelled tokens; SGD as the base so a step is theta - lr g."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from tram_dist import TrainStep, build_method
from tram_dist.regularizers import TrustRegionPenalty, kl_sum, symmetric_kl_sum
from tram_dist.trust_region import NoisyInputs, PreviousParams

from tinymodels import lm_batch, split, tiny_gpt2

LR = 0.2
SEED = 7


def _batch(step):
    return lm_batch(n=4, seq=10, seed=50 + step, pad_last=3, start_index=4 * step)


# ------------------------------------------------------------------ float64 reference pieces
def _log_probs64(logits):
    return F.log_softmax(logits.double(), dim=-1)


def _mask(batch):
    m = torch.zeros(batch["labels"].shape, dtype=torch.bool)
    m[:, :-1] = (batch["labels"][:, 1:] != -100) & batch["attention_mask"][:, 1:].bool()
    return m


def _ce64(logits, batch):
    lp = _log_probs64(logits)[:, :-1]
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    return -(lp[keep].gather(-1, labels[keep][:, None]).squeeze(-1)).mean()


def _kl64(p_logits, q_logits, mask):
    """mean over the masked tokens of sum_v P (log P - log Q)."""
    lp, lq = _log_probs64(p_logits)[mask], _log_probs64(q_logits)[mask]
    return (lp.exp() * (lp - lq)).sum(-1).mean()


def _forward64(model, batch, params, z=None):
    """Logits of ``model`` (float64 copy) at ``params`` (name -> tensor), inputs x (+ z)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(params[n])
    ids = batch["input_ids"]
    emb = model.transformer.wte(ids)
    if z is not None:
        emb = emb + z.double()
    return model(inputs_embeds=emb, attention_mask=batch["attention_mask"]).logits


def _grad64(model, batch, params, lam, kind, target=None, z=None):
    """(loss, KL, gradient by name) of CE + lam * KL in float64."""
    model.zero_grad(set_to_none=True)
    logits = _forward64(model, batch, params)
    mask = _mask(batch)
    if kind == "r3f":
        noisy = _forward64_keep(model, batch, z)
        kl = _kl64(logits, noisy, mask) + _kl64(noisy, logits, mask)
    else:
        kl = _kl64(target.detach(), logits, mask)
    ce = _ce64(logits, batch)
    (ce + lam * kl).backward()
    return float(ce.detach()), float(kl.detach()), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _forward64_keep(model, batch, z):
    emb = model.transformer.wte(batch["input_ids"]) + z.double()
    return model(inputs_embeds=emb, attention_mask=batch["attention_mask"]).logits


def _noise(step, sigma):
    b = _batch(step)
    return NoisyInputs(sigma).sample((4, 10, 32), seed=SEED, step=step, sample_index=b["sample_index"],
                                     device="cpu", dtype=torch.float32)


def _reference(kind, lam, steps, *, asam=False, decay=0.999, sigma=1e-2, rho=0.05, eta=0.01):
    """theta after ``steps`` SGD steps on CE + lam * KL (ASAM's ascent first when asam)."""
    model32 = tiny_gpt2()
    model = copy.deepcopy(model32).double()
    theta = {n: p.detach().double().clone() for n, p in model32.named_parameters()}
    prev, ema = dict(theta), dict(theta)
    out = []
    for t in range(steps):
        batch = _batch(t)
        z = _noise(t, sigma) if kind == "r3f" else None
        target = None
        if kind in ("trpo", "mesa"):
            with torch.no_grad():
                target = _forward64(model, batch, prev if kind == "trpo" else ema).clone()
        ce, kl, g = _grad64(model, batch, theta, lam, kind, target, z)
        if asam:
            tg = {n: (theta[n].abs() + eta) * g[n] for n in theta}
            norm = math.sqrt(sum(float((v ** 2).sum()) for v in tg.values()))
            eps = {n: rho * (theta[n].abs() + eta) ** 2 * g[n] / norm for n in theta}
            _, _, g = _grad64(model, batch, {n: theta[n] + eps[n] for n in theta}, lam, kind, target, z)
        out.append({"loss": ce, "penalty": kl})
        new = {n: theta[n] - LR * g[n] for n in theta}
        prev = theta
        ema = {n: decay * ema[n] + (1 - decay) * theta[n] for n in theta}
        theta = new
    return theta, out


def _run(method, steps, **kw):
    model = tiny_gpt2()
    opt, pen = build_method(method, model, lr=LR, base_optimizer=torch.optim.SGD, **kw)
    step = TrainStep(model, opt, trust_region=pen, seed=SEED)
    ms = [step(split(_batch(t), [1, 3])) for t in range(steps)]  # two micro-batches, unequal tokens
    return {n: p.detach().double() for n, p in model.named_parameters()}, ms


def _rel(a, b):
    num = max(float((a[k] - b[k]).abs().max()) for k in b)
    return num / max(float(b[k].abs().max()) for k in b)


CASES = [  # method, reference kind, steps, options
    ("trpo", "trpo", 2, {"lam": 5.0}),
    ("mesa", "mesa", 3, {"lam": 5.0, "decay": 0.5}),
    ("r3f", "r3f", 2, {"lam": 50.0, "sigma": 1e-2}),
    ("asam+trpo", "trpo", 2, {"lam": 5.0}),
    ("asam+mesa", "mesa", 3, {"lam": 5.0, "decay": 0.5}),
    ("asam+r3f", "r3f", 2, {"lam": 50.0, "sigma": 1e-2}),
]


@pytest.mark.parametrize("method,kind,steps,options", CASES, ids=[c[0] for c in CASES])
def test_regularized_steps_equal_the_float64_reference(method, kind, steps, options):
    asam = method.startswith("asam+")
    ref_opts = {k: v for k, v in options.items() if k in ("decay", "sigma")}
    theta_ref, ref_metrics = _reference(kind, options["lam"], steps, asam=asam, rho=0.05 if asam else 0,
                                        **ref_opts)
    extra = {"rho": 0.05} if asam else {}
    theta, ms = _run(method, steps, **options, **extra)
    assert _rel(theta, theta_ref) < 2e-5
    # the penalty matters: without it (lam = 0) the parameters end elsewhere by far more
    theta0, _ = _reference(kind, 0.0, steps, asam=asam, rho=0.05 if asam else 0, **ref_opts)
    assert _rel(theta0, theta_ref) > 100 * 2e-5
    for m, r in zip(ms, ref_metrics):  # global token means, as the reference
        assert m.loss == pytest.approx(r["loss"], rel=1e-5)
        assert m.penalty == pytest.approx(r["penalty"], rel=1e-3, abs=1e-9)
    assert ms[-1].penalty > 1e-6


def test_kl_sums_against_float64():
    torch.manual_seed(0)
    a, b = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    mask = torch.rand(3, 5) > 0.3
    ref = (_kl64(a, b, mask) * mask.sum()).item()
    assert kl_sum(a, b, mask).item() == pytest.approx(ref, rel=1e-5)
    sym = ((_kl64(a, b, mask) + _kl64(b, a, mask)) * mask.sum()).item()
    assert symmetric_kl_sum(a, b, mask).item() == pytest.approx(sym, rel=1e-5)


def test_kl_sum_gradient_against_float64():
    torch.manual_seed(1)
    p, q = torch.randn(2, 4, 7), torch.randn(2, 4, 7, requires_grad=True)
    mask = torch.ones(2, 4, dtype=torch.bool)
    kl_sum(p, q, mask).backward()
    q64 = q.detach().double().requires_grad_()
    (_kl64(p, q64, mask) * mask.sum()).backward()
    torch.testing.assert_close(q.grad.double(), q64.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bad", [-0.1, float("inf"), float("nan")])
def test_bad_lambda_and_decay_name_the_argument(bad):
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="lambda"):
        build_method("trpo", model, lr=1e-3, lam=bad)
    with pytest.raises(ValueError, match="decay must be a number in"):
        build_method("mesa", model, lr=1e-3, decay=bad if bad != -0.1 else 1.0)
    with pytest.raises(ValueError, match="sigma"):
        build_method("r3f", model, lr=1e-3, sigma=bad if bad != float("inf") else 0.0)


def test_regularizer_with_a_plain_optimizer_or_tram_is_one_clear_error():
    model = tiny_gpt2()
    pen = TrustRegionPenalty(PreviousParams(), 0.1, name="trpo")
    with pytest.raises(ValueError, match="wrap AdamW in tram_dist.optim.Descent"):
        TrainStep(model, torch.optim.AdamW(model.parameters(), lr=1e-3), trust_region=pen)
    tram, _ = build_method("tram-x", model, lr=1e-3)
    with pytest.raises(ValueError, match="is a regularizer of the loss"):
        TrainStep(model, tram, trust_region=pen)
    with pytest.raises(ValueError, match="lam is the weight of a regularizer"):
        build_method("sam", model, lr=1e-3, lam=0.1)


def test_regularizer_steps_restore_on_an_exception():
    model = tiny_gpt2()
    opt, pen = build_method("asam+trpo", model, lr=LR, base_optimizer=torch.optim.SGD)
    step = TrainStep(model, opt, trust_region=pen)
    step(_batch(0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    bad = dict(_batch(1))
    bad["labels"] = bad["labels"].clone()
    bad["labels"][0, 3] = 10_000  # out of the vocabulary: the loss raises in the first forward
    with pytest.raises(Exception):
        step(bad)
    assert opt._phase == "idle"
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
