"""restore_ through the Triton kernels (interpreted on CPU): params <- backups, bit exact."""
from __future__ import annotations

import pytest
import torch

from tram_dist.kernels import restore_
from tram_dist.kernels.reference import restore_ as restore_ref


def _check(kt, sizes, dtype, device, gen):
    backups = [kt.random_bits(n, dtype, device, gen) for n in sizes]
    keep = [b.clone() for b in backups]
    params = [kt.poison(torch.empty(n, dtype=dtype, device=device)) for n in sizes]
    restore_(params, backups)
    for i, (p, b, k) in enumerate(zip(params, backups, keep)):
        kt.assert_bits_equal(p, b, name=f"params[{i}]")
        kt.assert_bits_equal(b, k, name=f"backups[{i}] (read only)")


def test_restore_bit_exact(device, dtype, size, kt, gen):
    """Random bit patterns (NaN payloads, infs, subnormals, -0) come back unchanged."""
    _check(kt, [size], dtype, device, gen)


def test_restore_multi_tensor(device, dtype, kt, gen):
    _check(kt, kt.MIXED_SIZES, dtype, device, gen)


def test_restore_mixed_dtype_list(device, kt, gen):
    dtypes = [kt.F32, kt.BF16, kt.F16, kt.BF16, kt.F32]
    sizes = [1025, 7, 4097, 1, 300]
    backups = [kt.random_bits(n, d, device, gen) for n, d in zip(sizes, dtypes)]
    params = [kt.poison(torch.empty_like(b)) for b in backups]
    restore_(params, backups)
    for i, (p, b) in enumerate(zip(params, backups)):
        kt.assert_bits_equal(p, b, name=f"params[{i}]")


@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_restore_from_float32_backup_casts_like_copy(device, param_dtype, kt, gen):
    backups = [kt.randn(n, kt.F32, device, gen, scale=3.0) for n in (4097, 7)]
    params = [kt.poison(torch.empty(b.numel(), dtype=param_dtype, device=device)) for b in backups]
    expected = [p.clone() for p in params]
    restore_ref(expected, backups)
    restore_(params, backups)
    for i, (p, e) in enumerate(zip(params, expected)):
        kt.assert_bits_equal(p, e, name=f"params[{i}]")


def test_restore_large(device, kt, gen):
    _check(kt, [kt.LARGE], kt.BF16, device, gen)


def test_restore_empty_and_errors(device, kt, gen):
    restore_([], [])
    p = [torch.empty(8, device=device)]
    with pytest.raises(ValueError, match="equal lengths"):
        restore_(p, [])
    with pytest.raises(ValueError, match="elements"):
        restore_(p, [torch.empty(9, device=device)])
