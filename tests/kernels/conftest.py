"""Fixtures for the kernel tests: each op through its Triton kernels against its torch reference.

On CPU the kernels run in Triton's interpreter: the ``device`` fixture sets TRAM_KERNELS=triton
and TRITON_INTERPRET=1 for the test (monkeypatch, so nothing leaks into other tests), and
``tram_dist.kernels`` reads both at call time, whenever it was imported. test_kernel_dispatch.py
checks that this really runs the interpreter, and that setting TRITON_INTERPRET before the
first import works too. With a visible GPU every test also runs compiled on CUDA (tests/conftest.py
hides GPUs unless CUDA_VISIBLE_DEVICES is set: set it to run them).

Tolerances (``tol``): the kernels and the reference both do float32 math in the same operation
order (fp fusion off in the kernels, IEEE division), so they should agree bit for bit; the
allowed slack is the one rounding that a last-bit float32 difference could flip, the store to
the output dtype: 1 ulp of the storage dtype (rtol = its eps: 2**-23 fp32, 2**-7 bf16, 2**-10
fp16; atol = its smallest normal, for results near zero). sum_sq reduces in a different order
than torch.sum: rtol 1e-5 (float32 tree sums of 2.5M terms are good to ~1e-6).
"""
from __future__ import annotations

import types
import zlib

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# (param dtype, grad dtype): grads in the param dtype or float32
DTYPE_PAIRS = [(F32, F32), (BF16, BF16), (BF16, F32), (F16, F16), (F16, F32)]
SIZES = [0, 1, 7, 1023, 1025, 4097]  # 4097 crosses the 4096-element program boundary
LARGE = 2_500_003                    # 611 programs, three torch-reference chunks, odd tail
MIXED_SIZES = [1025, 7, 0, 4097, 1, 1023, 8192, 3]  # one multi-tensor launch, mixed sizes
RULE_ETAS = [("identity", 0.0), ("adaptive", 0.0), ("adaptive", 0.1), ("fisher", 0.0),
             ("fisher", 0.5)]


def _name(dtype):
    return str(dtype).replace("torch.", "")


def pytest_generate_tests(metafunc):
    """The shared test matrix, by argument name (a test takes the axes it crosses):
    ``dtypes`` (param, grad) pairs, ``dtype`` storage dtypes, ``size`` flat sizes,
    ``rule_eta`` rules with eta 0 and > 0."""
    axes = {
        "dtypes": (DTYPE_PAIRS, [f"{_name(p)}-g{_name(g)}" for p, g in DTYPE_PAIRS]),
        "dtype": ([F32, BF16, F16], [_name(d) for d in (F32, BF16, F16)]),
        "size": (SIZES, [f"n{n}" for n in SIZES]),
        "rule_eta": (RULE_ETAS, [f"{r}-eta{e:g}" for r, e in RULE_ETAS]),
    }
    for arg, (values, ids) in axes.items():
        if arg in metafunc.fixturenames:
            metafunc.parametrize(arg, values, ids=ids)


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch):
    """The test's device, with the ops forced through the Triton kernels: interpreted on CPU,
    compiled on CUDA."""
    monkeypatch.setenv("TRAM_KERNELS", "triton")
    if request.param == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return torch.device(request.param)


@pytest.fixture
def gen(request):
    """A generator seeded from the test id: fresh inputs per test, reproducible per test."""
    g = torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
    return g


def randn(n, dtype, device, gen, scale=1.0):
    return (torch.randn(n, generator=gen) * scale).to(dtype).to(device)


def random_bits(n, dtype, device, gen):
    """Every bit pattern of the dtype is fair game: NaN payloads, infs, subnormals, -0."""
    bits = {F32: torch.int32, BF16: torch.int16, F16: torch.int16}[dtype]
    info = torch.iinfo(bits)
    raw = torch.randint(info.min, info.max, (n,), dtype=torch.int64, generator=gen).to(bits)
    return raw.view(dtype).to(device)


def poison(t):
    return t.fill_(float("nan"))


def tol(dtype):
    info = torch.finfo(dtype)
    return dict(rtol=info.eps, atol=info.tiny)


def _flat64(t):
    return t.detach().reshape(-1).to("cpu", torch.float64)


def assert_close(actual, expected, *, rtol, atol, name="tensor"):
    """allclose that treats NaN == NaN, and on failure reports how many elements differ, the
    first bad index with both values, and the NaN / inf counts on each side."""
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    a, e = _flat64(actual), _flat64(expected)
    both_nan = torch.isnan(a) & torch.isnan(e)
    ok = both_nan | (a == e) | ((a - e).abs() <= atol + rtol * e.abs())
    if not bool(ok.all()):
        bad = (~ok).nonzero().flatten()
        i = int(bad[0])
        raise AssertionError(
            f"{name}: {bad.numel()} of {a.numel()} elements differ (rtol={rtol:g}, atol={atol:g}); "
            f"first at index {i}: actual {a[i].item()!r}, expected {e[i].item()!r}; "
            f"NaN actual/expected {int(torch.isnan(a).sum())}/{int(torch.isnan(e).sum())}, "
            f"inf actual/expected {int(torch.isinf(a).sum())}/{int(torch.isinf(e).sum())}")


def assert_bits_equal(actual, expected, *, name="tensor", any_nan=False):
    """Bit-for-bit equality (NaN payloads and -0 included); reports the first differing index.

    ``any_nan``: a NaN matches any NaN, for casts: torch itself gives 0x7FC0 (scalar code),
    0xFFFF (CPU vector code) or 0x7FFF (CUDA) for a float32 NaN stored as bfloat16."""
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    bits = {8: torch.int64, 4: torch.int32, 2: torch.int16}[actual.element_size()]
    a = actual.detach().reshape(-1).view(bits).cpu()
    e = expected.detach().reshape(-1).view(bits).cpu()
    differ = a != e
    if any_nan:
        differ &= ~(torch.isnan(actual.detach().reshape(-1).cpu())
                    & torch.isnan(expected.detach().reshape(-1).cpu()))
    diff = differ.nonzero().flatten()
    if diff.numel():
        i = int(diff[0])
        raise AssertionError(
            f"{name}: {diff.numel()} of {a.numel()} elements differ bitwise; first at index {i}: "
            f"actual {actual.reshape(-1)[i].item()!r} (0x{int(a[i]) & 0xFFFFFFFF:x}), "
            f"expected {expected.reshape(-1)[i].item()!r} (0x{int(e[i]) & 0xFFFFFFFF:x})")


@pytest.fixture
def kt():
    """The helpers above, as a fixture (works under any pytest import mode)."""
    return types.SimpleNamespace(
        randn=randn, random_bits=random_bits, poison=poison, tol=tol, assert_close=assert_close,
        assert_bits_equal=assert_bits_equal, F32=F32, BF16=BF16, F16=F16, LARGE=LARGE,
        MIXED_SIZES=MIXED_SIZES)
