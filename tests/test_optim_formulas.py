"""Each perturbation against a float64 reference written from the paper's equations.

References (theta, g in float64; sums over every parameter with a gradient):
  SAM (Foret et al.):       eps = rho g / ||g||_2
  ASAM (Eq. 2, Kwon et al.): eps = rho T^2 g / ||T g||_2,  T = |theta| + eta
  TRAM (Eq. 7):              eps = (d + nu) theta^2 g / ||theta g||_2
  FSAM (Eq. 8, Kim et al.):  eps = rho f^-1 g / sqrt(g^T f^-1 g),  f = 1 + eta g^2
"""
import math

import pytest
import torch

from tram_dist import ASAM, SAM, TRAM, FisherSAM, TRAMFisher

from tinymodels import lm_batch, params_of, tiny_gpt2


def ref_eps(kind, thetas, grads, *, rho=None, eta=0.0, d=None, nu=None):
    th = [t.double() for t in thetas]
    g = [x.double() for x in grads]
    if kind == "sam":
        norm = math.sqrt(sum(float((x * x).sum()) for x in g))
        return [rho * x / norm for x in g]
    if kind in ("asam", "tram"):
        T = [t.abs() + eta for t in th]
        norm = math.sqrt(sum(float(((Ti * x) ** 2).sum()) for Ti, x in zip(T, g)))
        radius = rho if kind == "asam" else d + nu
        return [radius * Ti * Ti * x / norm for Ti, x in zip(T, g)]
    if kind == "fisher":
        finv_g = [x / (1.0 + eta * x * x) for x in g]
        denom = math.sqrt(sum(float((x * fx).sum()) for x, fx in zip(g, finv_g)))
        return [rho * fx / denom for fx in finv_g]
    raise AssertionError(kind)


def make_params(seed=0, shapes=((5, 3), (7,), (2, 2, 2))):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)
    return ps


def assert_params_close(p, expected64):
    """float32 parameters hold theta + eps rounded once: allow 4 float32 ulps of the value."""
    got = p.detach().double()
    tol = 4 * torch.finfo(torch.float32).eps * expected64.abs() + 1e-12
    bad = (got - expected64).abs() > tol
    assert not bad.any(), f"{int(bad.sum())} elements off; max err {(got - expected64).abs().max():.3e}"


CASES = [
    ("sam", lambda ps: SAM(ps, torch.optim.SGD, rho=0.05, lr=0.1), dict(rho=0.05)),
    ("asam", lambda ps: ASAM(ps, torch.optim.SGD, rho=0.5, eta=0.01, lr=0.1), dict(rho=0.5, eta=0.01)),
    ("tram", lambda ps: TRAM(ps, torch.optim.SGD, nu=1e-5, lr=0.1), dict(d=0.37, nu=1e-5)),
    ("fisher", lambda ps: FisherSAM(ps, torch.optim.SGD, rho=0.1, eta=0.1, lr=0.1), dict(rho=0.1, eta=0.1)),
    ("fisher", lambda ps: TRAMFisher(ps, torch.optim.SGD, rho=0.1, eta=0.1, lr=0.1), dict(rho=0.1, eta=0.1)),
]


@pytest.mark.parametrize("kind,make,hp", CASES, ids=["sam", "asam", "tram", "fsam", "tram-fisher"])
def test_first_step_matches_paper(kind, make, hp):
    ps = make_params()
    theta0 = [p.detach().clone() for p in ps]
    grads = [p.grad.clone() for p in ps]
    opt = make(ps)
    opt.first_step(hp["d"] if kind == "tram" else None, zero_grad=False)
    expected = ref_eps(kind, theta0, grads, rho=hp.get("rho"), eta=hp.get("eta", 0.0), d=hp.get("d"), nu=hp.get("nu"))
    for p, t0, e in zip(ps, theta0, expected):
        assert_params_close(p, t0.double() + e)
    m = opt.last_ascent
    if kind == "sam":
        assert m["eps_norm"] == pytest.approx(0.05, rel=1e-5)
    ref_norm = math.sqrt(sum(float((e * e).sum()) for e in expected))
    assert m["eps_norm"] == pytest.approx(ref_norm, rel=1e-5)


def test_tram_norm_is_global_over_groups_and_groups_keep_own_hyperparameters():
    ps = make_params(seed=3)
    theta0 = [p.detach().clone() for p in ps]
    grads = [p.grad.clone() for p in ps]
    groups = [{"params": ps[:1], "eta": 0.2}, {"params": ps[1:]}]
    opt = ASAM(groups, torch.optim.SGD, rho=0.3, eta=0.01, lr=0.1)
    opt.first_step(zero_grad=False)
    # one norm over both groups; group 0 uses its own eta
    T = [theta0[0].double().abs() + 0.2] + [t.double().abs() + 0.01 for t in theta0[1:]]
    norm = math.sqrt(sum(float(((Ti * g.double()) ** 2).sum()) for Ti, g in zip(T, grads)))
    for p, t0, Ti, g in zip(ps, theta0, T, grads):
        assert_params_close(p, t0.double() + 0.3 * Ti * Ti * g.double() / norm)


def test_frozen_and_gradless_parameters_are_neither_perturbed_nor_backed_up():
    ps = make_params(seed=4)
    frozen = torch.nn.Parameter(torch.randn(4), requires_grad=False)
    ps[1].grad = None  # trainable but no gradient this step
    before = [p.detach().clone() for p in ps]
    frozen_before = frozen.detach().clone()
    opt = TRAM(ps + [frozen], torch.optim.SGD, lr=0.1)
    opt.first_step(0.5, zero_grad=False)
    assert torch.equal(ps[1], before[1]) and torch.equal(frozen, frozen_before)
    assert "backup" not in opt.state[ps[1]] and "backup" not in opt.state[frozen]
    assert not torch.equal(ps[0], before[0])
    # the norm excludes the gradless parameter
    norm = math.sqrt(sum(float(((t.double() * p.grad.double()) ** 2).sum()) for t, p in ((before[0], ps[0]), (before[2], ps[2]))))
    assert opt.last_ascent["grad_norm"] == pytest.approx(norm, rel=1e-6)


def test_tied_gpt2_embedding_is_one_parameter_perturbed_once():
    model = tiny_gpt2()
    assert model.transformer.wte.weight is model.lm_head.weight
    batch = lm_batch()
    batch.pop("sample_index")
    model(**batch).loss.backward()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt = TRAM(model.parameters(), torch.optim.AdamW, nu=1e-5, lr=1e-3)
    opt.first_step(0.2, zero_grad=False)
    names = list(theta0)  # named_parameters() lists the tied tensor once
    eps = ref_eps("tram", [theta0[n] for n in names], [grads[n] for n in names], d=0.2, nu=1e-5)
    for n, e in zip(names, eps):
        assert_params_close(dict(model.named_parameters())[n], theta0[n].double() + e)
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)
