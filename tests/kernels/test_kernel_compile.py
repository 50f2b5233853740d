"""The kernels compile for a GPU, checked without one: ahead-of-time compilation to sm_90 PTX.

The interpreter runs Python, so code it accepts may not compile; this catches that in CPU CI
and checks the properties the benchmark targets rely on: full blocks use 16-byte vector loads
and stores (flat launches and aligned multi-tensor tables), no mul+add is contracted to an fma
(so results match the torch reference bit for bit), division is IEEE (div.rn).
"""
from __future__ import annotations

import importlib
import re

import pytest

triton = pytest.importorskip("triton")

try:
    from triton.backends import backends as _BACKENDS
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    HAS_NVIDIA = "nvidia" in _BACKENDS
except Exception:  # an older or trimmed triton
    HAS_NVIDIA = False

pytestmark = pytest.mark.skipif(not HAS_NVIDIA, reason="triton has no nvidia backend here")

M = {name: importlib.import_module(f"tram_dist.kernels.{name}")
     for name in ("sum_sq", "perturb", "restore", "swap_in")}


@pytest.fixture(autouse=True)
def compiled_mode(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from tram_dist.kernels import _triton
    _triton.sync_mode()


def _ptx(kernel, signature, constexprs):
    names = kernel.arg_names
    full = {n: signature.get(n, "constexpr") for n in names}
    # what the runtime specializes for 16-byte aligned tensors
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if full[n].startswith("*")}
    src = ASTSource(fn=kernel, signature=full, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"enable_fp_fusion": False, "num_warps": 8})
    return compiled.asm["ptx"]


def _ops(ptx):
    return set(re.findall(r"\b(ld\.global[.\w]*|st\.global[.\w]*|fma\.\w+\.f32|div\.\w+\.f32)", ptx))


META = [dict(MULTI=False, LOG_T=0, ALIGNED=True, BLOCK=4096),
        dict(MULTI=True, LOG_T=3, ALIGNED=True, BLOCK=4096)]
IDS = ["flat", "multi"]


@pytest.mark.parametrize("meta", META, ids=IDS)
def test_perturb_compiles_vectorized(meta):
    ops = _ops(_ptx(M["perturb"]._perturb_kernel,
                    {"p_ptr": "*bf16", "g_ptr": "*fp32", "x_ptr": "*bf16", "scale_ptr": "*fp32",
                     "n": "i64", "scale": "fp32", "eta": "fp32", "tab": "*i64", "T": "i32"},
                    dict(RULE=2, X_MODE=2, SCALE_IN_MEM=True, NROWS=3, **meta)))
    assert {"ld.global.v4.b32", "st.global.v4.b32", "div.rn.f32"} <= ops, ops
    assert not any(op.startswith("fma") for op in ops), ops


@pytest.mark.parametrize("meta", META, ids=IDS)
def test_sum_sq_compiles_vectorized(meta):
    ops = _ops(_ptx(M["sum_sq"]._sum_sq_kernel,
                    {"g_ptr": "*fp16", "th_ptr": "*fp16", "part_ptr": "*fp32", "part_off": "i32",
                     "part_row": "i32", "n": "i64", "eta": "fp32", "tab": "*i64", "T": "i32"},
                    dict(RULE=1, WITH_EPS=True, NROWS=2, **meta)))
    assert "ld.global.v4.b32" in ops and not any(op.startswith("fma") for op in ops), ops
    _ptx(M["sum_sq"]._sum_partials_kernel, {"part_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32"},
         dict(BLOCK=4096))


@pytest.mark.parametrize("meta", META, ids=IDS)
def test_restore_and_swap_in_compile_vectorized(meta):
    restore = _ptx(M["restore"]._restore_kernel,
                   {"p_ptr": "*bf16", "b_ptr": "*bf16", "n": "i64", "tab": "*i64", "T": "i32"}, meta)
    assert {"ld.global.v4.b32", "st.global.v4.b32"} <= _ops(restore)
    assert "32767" not in restore  # same dtype: a plain copy, no rounding code
    swap = _ptx(M["swap_in"]._swap_in_kernel,
                {"p_ptr": "*bf16", "t_ptr": "*fp32", "b_ptr": "*bf16", "n": "i64", "tab": "*i64",
                 "T": "i32"}, meta)
    assert {"ld.global.v4.b32", "st.global.v4.b32"} <= _ops(swap)
