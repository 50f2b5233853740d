"""sum_sq through the Triton kernels (interpreted on CPU) against sum_sq_reference, and both
against an independent float64 formula."""
from __future__ import annotations

import torch

from tram_dist.kernels import sum_sq
from tram_dist.kernels.reference import sum_sq as sum_sq_ref

RTOL = 1e-5  # reduction order differs (program tree sums vs torch.sum over chunks)


def _f64(thetas, grads, rule, eta):
    """[sum of w g^2, sum of (w g)^2] in float64, written from the rules' definitions
    independently of both paths."""
    total, eps = 0.0, 0.0
    for th, g in zip(thetas, grads):
        g = g.double().cpu()
        if rule == "identity":
            total += float((g * g).sum())
            eps += float((g * g).sum())
        elif rule == "adaptive":
            total += float((((th.double().cpu().abs() + eta) * g) ** 2).sum())
            eps += float(((th.double().cpu().abs() + eta) ** 2 * g).square().sum())
        else:
            total += float((g * g / (1.0 + eta * g * g)).sum())
            eps += float((g / (1.0 + eta * g * g)).square().sum())
    return torch.tensor([total, eps], dtype=torch.float64)


def _check(kt, sizes, pdt, gdt, rule, eta, device, gen, rtol=RTOL):
    thetas = [kt.randn(n, pdt, device, gen) for n in sizes]
    grads = [kt.randn(n, gdt, device, gen) for n in sizes]
    out = sum_sq(thetas, grads, rule=rule, eta=eta)
    ref = sum_sq_ref(thetas, grads, rule=rule, eta=eta)
    assert out.dtype == torch.float32 and out.shape == () and out.device.type == device.type
    assert not torch.isnan(out), "sum_sq returned NaN"
    kt.assert_close(out, ref, rtol=rtol, atol=1e-30, name="sum_sq vs reference")
    f64 = _f64(thetas, grads, rule, eta)
    kt.assert_close(out, f64[0], rtol=rtol, atol=1e-30, name="sum_sq vs float64 formula")
    both = sum_sq(thetas, grads, rule=rule, eta=eta, with_eps_sq=True)
    assert both.dtype == torch.float32 and both.shape == (2,)
    kt.assert_bits_equal(both[0], out, name="with_eps_sq: first sum")
    kt.assert_close(both, sum_sq_ref(thetas, grads, rule=rule, eta=eta, with_eps_sq=True),
                    rtol=rtol, atol=1e-30, name="with_eps_sq vs reference")
    kt.assert_close(both, f64.float(), rtol=rtol, atol=1e-30, name="with_eps_sq vs float64")
    return thetas, grads, out


def test_sum_sq_flat(device, dtypes, size, rule_eta, kt, gen):
    _check(kt, [size], *dtypes, *rule_eta, device, gen)


def test_sum_sq_multi_tensor(device, dtypes, rule_eta, kt, gen):
    _check(kt, kt.MIXED_SIZES, *dtypes, *rule_eta, device, gen)


def test_sum_sq_mixed_dtype_list(device, kt, gen):
    combos = [(kt.F32, kt.F32), (kt.BF16, kt.F32), (kt.F16, kt.F16), (kt.BF16, kt.F32),
              (kt.BF16, kt.BF16)]
    sizes = [1025, 7, 4097, 1, 300]
    thetas = [kt.randn(n, p, device, gen) for n, (p, _) in zip(sizes, combos)]
    grads = [kt.randn(n, g, device, gen) for n, (_, g) in zip(sizes, combos)]
    out = sum_sq(thetas, grads, rule="adaptive", eta=0.1)
    kt.assert_close(out, sum_sq_ref(thetas, grads, rule="adaptive", eta=0.1), rtol=RTOL,
                    atol=1e-30, name="sum_sq")


def test_sum_sq_large_against_float64(device, kt, gen):
    _check(kt, [kt.LARGE], kt.BF16, kt.F32, "adaptive", 0.0, device, gen)


def test_sum_sq_is_deterministic(device, kt, gen):
    thetas = [kt.randn(n, kt.BF16, device, gen) for n in kt.MIXED_SIZES]
    grads = [kt.randn(n, kt.F32, device, gen) for n in kt.MIXED_SIZES]
    first = sum_sq(thetas, grads, rule="fisher", eta=0.5)
    again = sum_sq(thetas, grads, rule="fisher", eta=0.5)
    kt.assert_bits_equal(again, first, name="second run")


def test_sum_sq_does_not_write_its_inputs(device, kt, gen):
    thetas = [kt.randn(n, kt.BF16, device, gen) for n in (4097, 7)]
    grads = [kt.randn(n, kt.BF16, device, gen) for n in (4097, 7)]
    keep = [t.clone() for t in thetas + grads]
    sum_sq(thetas, grads, rule="adaptive", eta=0.1)
    for i, (t, k) in enumerate(zip(thetas + grads, keep)):
        kt.assert_bits_equal(t, k, name=f"input {i}")


def test_sum_sq_empty(device, kt):
    out = sum_sq([], [], rule="adaptive", device=device)
    assert out.dtype == torch.float32 and out.shape == () and out.device.type == device.type
    assert float(out) == 0.0
    zero = [torch.empty(0, device=device)]
    assert float(sum_sq(zero, zero, rule="identity")) == 0.0
    both = sum_sq([], [], rule="fisher", device=device, with_eps_sq=True)
    assert both.shape == (2,) and both.device.type == device.type and not both.any()
    assert not sum_sq(zero, zero, rule="adaptive", with_eps_sq=True).any()
