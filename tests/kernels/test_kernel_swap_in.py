"""swap_in_ through the Triton kernels (interpreted on CPU): backups <- params (bit exact),
params <- targets (cast to the params' dtype exactly as ``copy_`` rounds)."""
from __future__ import annotations

import pytest
import torch

from tram_dist.kernels import swap_in_
from tram_dist.kernels.reference import swap_in_ as swap_in_ref

# float32 -> float16 overflow is part of the test; numpy (Triton's interpreter) warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")

TARGET_KINDS = ["same", "float32"]


def _check(kt, sizes, pdt, tdt, device, gen):
    params = [kt.random_bits(n, pdt, device, gen) for n in sizes]
    if tdt == pdt:
        targets = [kt.random_bits(n, tdt, device, gen) for n in sizes]
    else:  # fp32 over its whole exponent range: rounding, overflow, subnormals, infs
        targets = [torch.ldexp(kt.randn(n, tdt, device, gen),
                               torch.randint(-150, 129, (n,), generator=gen).to(device))
                   for n in sizes]
    original = [p.clone() for p in params]
    keep = [t.clone() for t in targets]
    backups = [kt.poison(torch.empty_like(p)) for p in params]
    expected = [kt.poison(torch.empty_like(p)) for p in params]
    swap_in_ref(expected, targets, [torch.empty_like(p) for p in params])
    swap_in_(params, targets, backups)
    for i in range(len(sizes)):
        kt.assert_bits_equal(backups[i], original[i], name=f"backups[{i}]")
        kt.assert_bits_equal(params[i], expected[i], name=f"params[{i}]", any_nan=True)
        kt.assert_bits_equal(targets[i], keep[i], name=f"targets[{i}] (read only)")


@pytest.mark.parametrize("target", TARGET_KINDS)
def test_swap_in(device, dtype, size, target, kt, gen):
    _check(kt, [size], dtype, dtype if target == "same" else kt.F32, device, gen)


@pytest.mark.parametrize("target", TARGET_KINDS)
def test_swap_in_multi_tensor(device, dtype, target, kt, gen):
    _check(kt, kt.MIXED_SIZES, dtype, dtype if target == "same" else kt.F32, device, gen)


@pytest.mark.parametrize("dtype_", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_swap_in_rounds_like_torch(device, dtype_, kt):
    """float32 -> bf16/fp16 casts at the edges: halfway ties (to even), the largest finite
    values, overflow, subnormals, signed zeros, inf and NaN, bit for bit as ``copy_``."""
    info = torch.finfo(dtype_)
    mant = {torch.bfloat16: 7, torch.float16: 10}[dtype_]
    one_ulp = 2.0 ** -mant
    vals = [1.0 + one_ulp / 2, 1.0 + 3 * one_ulp / 2, -(1.0 + one_ulp / 2),
            1.0 + one_ulp / 2 + 2.0 ** -22, 1.0 + one_ulp / 2 - 2.0 ** -22,
            info.max, -info.max, info.max * (1 + one_ulp / 4), info.max * (1 + one_ulp),
            info.tiny, info.tiny / 3, -info.tiny / 5, info.smallest_normal * one_ulp / 2,
            0.0, -0.0, float("inf"), float("-inf"), 3.0e38, -3.0e38, 1e-45]
    targets = [torch.tensor(vals, dtype=torch.float32, device=device)]
    params = [torch.zeros(len(vals), dtype=dtype_, device=device)]
    backups = [torch.empty_like(params[0])]
    swap_in_(params, targets, backups)
    kt.assert_bits_equal(params[0], targets[0].to(dtype_), name="rounded params")
    nan = [torch.tensor([float("nan")], device=device)]
    p = [torch.zeros(1, dtype=dtype_, device=device)]
    swap_in_(p, nan, [torch.empty_like(p[0])])
    assert torch.isnan(p[0]).all()


def test_swap_in_large(device, kt, gen):
    _check(kt, [kt.LARGE], kt.BF16, kt.F32, device, gen)


def test_swap_in_empty_and_errors(device):
    swap_in_([], [], [])
    p = [torch.empty(8, device=device)]
    with pytest.raises(ValueError, match="equal lengths"):
        swap_in_(p, p, [])
