"""The torch references: chunking keeps the unchunked semantics, the re-exports, the scratch
bound and the block-size helper."""
from __future__ import annotations

import importlib

import pytest
import torch

import tram_dist.kernels as K
from tram_dist.kernels import _triton, reference


def _w(theta, g32, rule, eta):  # the package's original, unchunked reference
    if rule == "identity":
        return torch.ones_like(g32)
    if rule == "adaptive":
        t = theta.float().abs() + eta
        return t * t
    return 1.0 / (1.0 + eta * g32 * g32)


def _perturb_unchunked(params, grads, *, scale, rule, eta, backups=None, sources=None):
    for i, (p, g) in enumerate(zip(params, grads)):
        theta = sources[i] if sources is not None else p
        g32 = g.float()
        new = theta.float() + scale * _w(theta, g32, rule, eta) * g32
        if backups is not None:
            backups[i].copy_(p)
        p.copy_(new)


def _sum_sq_unchunked(thetas, grads, *, rule, eta):
    total = torch.zeros((), dtype=torch.float32)
    for theta, g in zip(thetas, grads):
        g32 = g.float()
        total += (_w(theta, g32, rule, eta) * g32 * g32).sum()
    return total


def _eps_sq_unchunked(thetas, grads, *, rule, eta):
    total = torch.zeros((), dtype=torch.float32)
    for theta, g in zip(thetas, grads):
        g32 = g.float()
        total += ((_w(theta, g32, rule, eta) * g32) ** 2).sum()
    return total


def test_references_are_reexported():
    for name, op in (("sum_sq", "sum_sq"), ("perturb", "perturb_"), ("restore", "restore_"),
                     ("swap_in", "swap_in_")):
        module = importlib.import_module(f"tram_dist.kernels.{name}")
        assert getattr(reference, op) is getattr(module, f"{name}_reference")


@pytest.mark.parametrize("rule,eta", [("identity", 0.0), ("adaptive", 0.1), ("fisher", 0.5)])
@pytest.mark.parametrize("form", ["backups", "sources"])
def test_chunked_reference_keeps_the_unchunked_results(rule, eta, form, kt, gen):
    """Over CHUNK boundaries the memory-lean reference is bit-identical to the original."""
    n = 2 * K.CHUNK + 3
    params = [kt.randn(n, kt.BF16, "cpu", gen), kt.randn(5, kt.F16, "cpu", gen)]
    grads = [kt.randn(n, kt.F32, "cpu", gen), kt.randn(5, kt.F16, "cpu", gen)]
    extra = ([kt.randn(n, kt.F32, "cpu", gen), kt.randn(5, kt.F32, "cpu", gen)]
             if form == "sources" else [torch.empty_like(p) for p in params])
    kw = {form: extra}
    mine, theirs = [p.clone() for p in params], [p.clone() for p in params]
    if form == "backups":
        kw_theirs = {form: [torch.empty_like(p) for p in params]}
    else:
        kw_theirs = kw
    reference.perturb_(mine, grads, scale=0.37, rule=rule, eta=eta, **kw)
    _perturb_unchunked(theirs, grads, scale=0.37, rule=rule, eta=eta, **kw_theirs)
    for a, b in zip(mine, theirs):
        kt.assert_bits_equal(a, b, name="params")
    if form == "backups":
        for a, b in zip(kw["backups"], kw_theirs["backups"]):
            kt.assert_bits_equal(a, b, name="backups")
    s = reference.sum_sq(params, grads, rule=rule, eta=eta)
    kt.assert_close(s, _sum_sq_unchunked(params, grads, rule=rule, eta=eta), rtol=1e-6,
                    atol=0.0, name="sum_sq")
    both = reference.sum_sq(params, grads, rule=rule, eta=eta, with_eps_sq=True)
    expected = torch.stack([_sum_sq_unchunked(params, grads, rule=rule, eta=eta),
                            _eps_sq_unchunked(params, grads, rule=rule, eta=eta)])
    kt.assert_close(both, expected, rtol=1e-6, atol=0.0, name="sum_sq with_eps_sq")


def test_reference_accepts_any_layout(kt, gen):
    """The oracle is general (the ops insist on contiguous tensors, on every path)."""
    m = kt.randn(64, kt.F32, "cpu", gen).view(8, 8).t()
    g = kt.randn(64, kt.F32, "cpu", gen).view(8, 8)
    expected = m.clone()
    _perturb_unchunked([expected], [g], scale=0.5, rule="adaptive", eta=0.0)
    reference.perturb_([m], [g], scale=0.5, rule="adaptive", eta=0.0)
    kt.assert_bits_equal(m.contiguous(), expected.contiguous(), name="params")


def test_scratch_bytes():
    assert K.TORCH_SCRATCH_BYTES_MAX == 8 * 2 ** 20
    assert K.scratch_bytes(10) == 2 * 4 * 10
    assert K.scratch_bytes(10 ** 9) == K.TORCH_SCRATCH_BYTES_MAX
    assert K.scratch_bytes([10, 10 ** 9]) == K.TORCH_SCRATCH_BYTES_MAX
    assert K.scratch_bytes(4096 * 3, backend="triton") == 2 * 4 * 3
    assert K.scratch_bytes([4096, 1], backend="triton") == 2 * 4 * 2 + 8 * 5 * 2
    with pytest.raises(ValueError):
        K.scratch_bytes(1, backend="cuda")


def test_block_size_helper():
    assert _triton.block_size(1) == _triton.MIN_BLOCK
    assert _triton.block_size(1025) == 2048
    assert _triton.block_size(10 ** 9) == _triton.DEFAULT_BLOCK
    assert _triton.block_size(10 ** 9, cap=1 << 16) == 1 << 16
    for bad in (1 << 17, 3000, 64):
        with pytest.raises(ValueError, match="power of two"):
            _triton.block_size(10, cap=bad)
