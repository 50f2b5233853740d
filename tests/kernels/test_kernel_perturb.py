"""perturb_ through the Triton kernels (interpreted on CPU) against perturb_reference."""
from __future__ import annotations

import pytest
import torch

from tram_dist.kernels import perturb_
from tram_dist.kernels.reference import perturb_ as perturb_ref

SCALE = 0.37  # big enough that the step moves most elements by many ulps


def _lists(kt, sizes, dtype, device, gen):
    return [kt.randn(n, dtype, device, gen) for n in sizes]


def _check_backup_form(kt, sizes, pdt, gdt, rule, eta, device, gen):
    params = _lists(kt, sizes, pdt, device, gen)
    grads = _lists(kt, sizes, gdt, device, gen)
    original = [p.clone() for p in params]
    expected = [p.clone() for p in params]
    backups = [kt.poison(torch.empty_like(p)) for p in params]
    perturb_ref(expected, grads, scale=SCALE, rule=rule, eta=eta)
    perturb_(params, grads, scale=SCALE, rule=rule, eta=eta, backups=backups)
    for i, (p, e, b, o) in enumerate(zip(params, expected, backups, original)):
        kt.assert_close(p, e, **kt.tol(pdt), name=f"params[{i}]")
        kt.assert_bits_equal(b, o, name=f"backups[{i}]")


def test_perturb_with_backup(device, dtypes, size, rule_eta, kt, gen):
    _check_backup_form(kt, [size], *dtypes, *rule_eta, device, gen)


@pytest.mark.parametrize("source_dtype", ["float32", "param"])
def test_perturb_from_sources(device, dtypes, rule_eta, source_dtype, kt, gen):
    pdt, gdt = dtypes
    rule, eta = rule_eta
    sdt = torch.float32 if source_dtype == "float32" else pdt
    sources = _lists(kt, [4097], sdt, device, gen)
    grads = _lists(kt, [4097], gdt, device, gen)
    keep = [s.clone() for s in sources]
    params = [kt.poison(torch.empty(4097, dtype=pdt, device=device))]
    expected = [kt.poison(p.clone()) for p in params]
    perturb_ref(expected, grads, scale=SCALE, rule=rule, eta=eta, sources=sources)
    perturb_(params, grads, scale=SCALE, rule=rule, eta=eta, sources=sources)
    kt.assert_close(params[0], expected[0], **kt.tol(pdt), name="params")
    kt.assert_bits_equal(sources[0], keep[0], name="sources (read only)")


def test_perturb_in_place_without_backup(device, dtypes, kt, gen):
    pdt, gdt = dtypes
    params = _lists(kt, [1025], pdt, device, gen)
    grads = _lists(kt, [1025], gdt, device, gen)
    expected = [p.clone() for p in params]
    perturb_ref(expected, grads, scale=SCALE, rule="adaptive", eta=0.0)
    perturb_(params, grads, scale=SCALE, rule="adaptive", eta=0.0)
    kt.assert_close(params[0], expected[0], **kt.tol(pdt), name="params")


@pytest.mark.parametrize("form", ["backups", "sources"])
def test_perturb_multi_tensor(device, dtypes, rule_eta, form, kt, gen):
    pdt, gdt = dtypes
    rule, eta = rule_eta
    sizes = kt.MIXED_SIZES
    if form == "backups":
        return _check_backup_form(kt, sizes, pdt, gdt, rule, eta, device, gen)
    sources = _lists(kt, sizes, torch.float32, device, gen)
    grads = _lists(kt, sizes, gdt, device, gen)
    params = [kt.poison(torch.empty(n, dtype=pdt, device=device)) for n in sizes]
    expected = [p.clone() for p in params]
    perturb_ref(expected, grads, scale=SCALE, rule=rule, eta=eta, sources=sources)
    perturb_(params, grads, scale=SCALE, rule=rule, eta=eta, sources=sources)
    for i, (p, e) in enumerate(zip(params, expected)):
        kt.assert_close(p, e, **kt.tol(pdt), name=f"params[{i}]")


def test_perturb_mixed_dtype_list(device, kt, gen):
    """One list, several dtype combinations: one launch per combination."""
    combos = [(kt.F32, kt.F32), (kt.BF16, kt.F32), (kt.F16, kt.F16), (kt.BF16, kt.F32),
              (kt.BF16, kt.BF16), (kt.F32, kt.F32)]
    sizes = [1025, 7, 4097, 1, 300, 2]
    params = [kt.randn(n, p, device, gen) for n, (p, _) in zip(sizes, combos)]
    grads = [kt.randn(n, g, device, gen) for n, (_, g) in zip(sizes, combos)]
    original = [p.clone() for p in params]
    expected = [p.clone() for p in params]
    backups = [kt.poison(torch.empty_like(p)) for p in params]
    perturb_ref(expected, grads, scale=SCALE, rule="adaptive", eta=0.0)
    perturb_(params, grads, scale=SCALE, rule="adaptive", eta=0.0, backups=backups)
    for i, (p, e, b, o) in enumerate(zip(params, expected, backups, original)):
        kt.assert_close(p, e, **kt.tol(p.dtype), name=f"params[{i}]")
        kt.assert_bits_equal(b, o, name=f"backups[{i}]")


def test_perturb_writes_only_its_tensors(device, kt, gen):
    """Tensors carved from one buffer at odd offsets (not 16-byte aligned: the unaligned
    multi-tensor path) with gaps between them: the gaps must come back untouched."""
    sizes, gap = [1023, 7, 4097, 1], 5
    total = sum(sizes) + gap * (len(sizes) + 1)
    pbuf = kt.randn(total, kt.BF16, device, gen)
    gbuf = kt.randn(total, kt.F32, device, gen)
    bbuf = kt.randn(total, kt.BF16, device, gen)
    before = [pbuf.clone(), bbuf.clone()]
    views, at = [], gap
    for n in sizes:
        views.append(slice(at, at + n))
        at += n + gap
    params = [pbuf[s] for s in views]
    grads = [gbuf[s] for s in views]
    backups = [bbuf[s] for s in views]
    expected = [p.clone() for p in params]
    original = [p.clone() for p in params]
    perturb_ref(expected, grads, scale=SCALE, rule="fisher", eta=0.5)
    perturb_(params, grads, scale=SCALE, rule="fisher", eta=0.5, backups=backups)
    inside = torch.zeros(total, dtype=torch.bool, device=device)
    for i, s in enumerate(views):
        inside[s] = True
        kt.assert_close(params[i], expected[i], **kt.tol(kt.BF16), name=f"params[{i}]")
        kt.assert_bits_equal(backups[i], original[i], name=f"backups[{i}]")
    kt.assert_bits_equal(pbuf[~inside], before[0][~inside], name="params buffer gaps")
    kt.assert_bits_equal(bbuf[~inside], before[1][~inside], name="backups buffer gaps")


def test_perturb_large(device, kt, gen):
    _check_backup_form(kt, [kt.LARGE], kt.BF16, kt.F32, "adaptive", 0.0, device, gen)


def test_perturb_scale_tensor(device, kt, gen):
    """A one-element device tensor scale (no host sync) gives the float-scale result."""
    params = _lists(kt, [4097, 7], kt.BF16, device, gen)
    grads = _lists(kt, [4097, 7], kt.F32, device, gen)
    expected = [p.clone() for p in params]
    perturb_ref(expected, grads, scale=SCALE, rule="adaptive", eta=0.1)
    perturb_(params, grads, scale=torch.tensor(SCALE, device=device), rule="adaptive", eta=0.1)
    for i, (p, e) in enumerate(zip(params, expected)):
        kt.assert_close(p, e, **kt.tol(kt.BF16), name=f"params[{i}]")


def test_perturb_matches_reference_bit_for_bit(device, dtypes, rule_eta, kt, gen):
    """Stronger than the 1-ulp matrix: with fp fusion off and IEEE division the kernel does the
    reference's float32 operations in the reference's order, so the outputs are identical."""
    pdt, gdt = dtypes
    rule, eta = rule_eta
    params = _lists(kt, [4097], pdt, device, gen)
    grads = _lists(kt, [4097], gdt, device, gen)
    expected = [p.clone() for p in params]
    perturb_ref(expected, grads, scale=SCALE, rule=rule, eta=eta)
    perturb_(params, grads, scale=SCALE, rule=rule, eta=eta)
    kt.assert_bits_equal(params[0], expected[0], name="params")


def test_perturb_empty_lists_are_no_ops(device):
    assert perturb_([], [], scale=1.0, rule="adaptive") is None
    assert perturb_([], [], scale=1.0, rule="identity", backups=[]) is None
    with pytest.raises(ValueError, match="unknown perturbation rule|rule"):  # still validated
        perturb_([], [], scale=1.0, rule="sideways")


def test_perturb_rejects_bad_arguments(device, kt, gen):
    p = [kt.randn(8, kt.F32, device, gen)]
    g = [kt.randn(8, kt.F32, device, gen)]
    with pytest.raises(ValueError, match="not both"):
        perturb_(p, g, scale=1.0, rule="adaptive", backups=[p[0].clone()], sources=[p[0].clone()])
    with pytest.raises(ValueError, match="unknown perturbation rule"):
        perturb_(p, g, scale=1.0, rule="sam")
    with pytest.raises(ValueError, match="equal lengths"):
        perturb_(p, g + g, scale=1.0, rule="identity")
    with pytest.raises(ValueError, match="elements"):
        perturb_(p, [g[0][:4]], scale=1.0, rule="identity")
    with pytest.raises(ValueError, match="contiguous"):
        m = kt.randn(16, kt.F32, device, gen).view(4, 4)
        perturb_([m.t()], [m.clone()], scale=1.0, rule="identity")
    with pytest.raises(ValueError, match="one-element"):
        perturb_(p, g, scale=torch.ones(2, device=device), rule="identity")
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        perturb_([p[0].double()], [g[0].double()], scale=1.0, rule="identity")
