"""TRAM_KERNELS dispatch, the TRITON_INTERPRET switch, and a Python without triton."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import tram_dist.kernels as K
from tram_dist.kernels import _triton

OP_MODULES = {name: importlib.import_module(f"tram_dist.kernels.{name}")
              for name in ("sum_sq", "perturb", "restore", "swap_in")}


def _run_every_op():
    p, g, b = [torch.randn(10)], [torch.randn(10)], [torch.empty(10)]
    K.sum_sq(p, g, rule="adaptive")
    K.perturb_(p, g, scale=0.1, rule="adaptive", backups=b)
    K.restore_(p, b)
    K.swap_in_(p, g, b)


def _forbid(monkeypatch, template):
    """Make every op's ``template.format(op)`` function fail the test if it is called."""
    for name, module in OP_MODULES.items():
        attr = template.format(name)

        def boom(*args, _attr=attr, **kwargs):
            raise AssertionError(f"{_attr} must not run here")
        monkeypatch.setattr(module, attr, boom)


@pytest.mark.parametrize("value", ["cuda", "1", "trit0n"])
def test_invalid_value_raises_naming_the_choices(monkeypatch, value):
    monkeypatch.setenv("TRAM_KERNELS", value)
    with pytest.raises(ValueError, match="auto, triton, torch"):
        K.backend("cpu")
    for op in (lambda: K.sum_sq([torch.ones(2)], [torch.ones(2)], rule="identity"),
               lambda: K.restore_([torch.ones(2)], [torch.ones(2)])):
        with pytest.raises(ValueError, match="TRAM_KERNELS"):
            op()


def test_backend_choice(monkeypatch):
    monkeypatch.delenv("TRAM_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert K.backend("cpu") == "torch"
    assert K.backend("cuda") == ("triton" if _triton.HAS_TRITON else "torch")
    assert K.backend("cuda", [torch.float64]) == "torch"  # no fp64 kernels: auto falls back
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert K.backend("cuda") == "torch"  # the interpreter cannot run CUDA tensors' tables
    monkeypatch.setenv("TRAM_KERNELS", " Torch ")
    assert K.backend("cuda") == "torch"
    monkeypatch.setenv("TRAM_KERNELS", "triton")
    assert K.backend("cpu") == "triton"
    monkeypatch.setenv("TRAM_KERNELS", "")
    assert K.backend("cpu") == "torch"


def test_torch_forced_never_launches_triton(monkeypatch):
    monkeypatch.setenv("TRAM_KERNELS", "torch")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _forbid(monkeypatch, "_{}_triton")
    _run_every_op()


def test_auto_on_cpu_runs_torch(monkeypatch):
    monkeypatch.delenv("TRAM_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _forbid(monkeypatch, "_{}_triton")
    _run_every_op()


@pytest.mark.skipif(not _triton.HAS_TRITON, reason="needs triton")
def test_triton_forced_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRAM_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        K.restore_([torch.ones(2)], [torch.ones(2)])


@pytest.mark.skipif(not _triton.HAS_TRITON, reason="needs triton")
def test_triton_forced_really_runs_the_interpreter(monkeypatch):
    """The kernel tests' setting takes effect: with the references disabled every op still
    works, and the kernels in use are the interpreter's (set after triton was imported)."""
    monkeypatch.setenv("TRAM_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _forbid(monkeypatch, "{}_reference")
    _run_every_op()
    from triton.runtime.interpreter import InterpretedFunction
    for name, module in OP_MODULES.items():
        assert isinstance(getattr(module, f"_{name}_kernel"), InterpretedFunction), name
    monkeypatch.delenv("TRITON_INTERPRET")
    _triton.sync_mode()  # and back: compiled kernels again once the variable is gone
    for name, module in OP_MODULES.items():
        assert isinstance(getattr(module, f"_{name}_kernel"), triton_jit_type()), name


def triton_jit_type():
    from triton.runtime.jit import JITFunction
    return JITFunction


def _python(code: str, **env):
    full_env = {k: v for k, v in os.environ.items() if k not in ("TRAM_KERNELS", "TRITON_INTERPRET")}
    full_env.update(env)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done.stdout


@pytest.mark.skipif(not _triton.HAS_TRITON, reason="needs triton")
def test_interpreter_set_before_the_first_import():
    out = _python("""
        import sys, torch
        import tram_dist.kernels as K
        from tram_dist.kernels.reference import perturb_ as ref
        from triton.runtime.interpreter import InterpretedFunction
        assert isinstance(sys.modules["tram_dist.kernels.perturb"]._perturb_kernel, InterpretedFunction)
        p, g = [torch.randn(5000).bfloat16()], [torch.randn(5000)]
        e = [p[0].clone()]
        K.perturb_(p, g, scale=0.3, rule="adaptive")
        ref(e, g, scale=0.3, rule="adaptive")
        assert torch.equal(p[0], e[0])
        print("ok")
        """, TRITON_INTERPRET="1", TRAM_KERNELS="triton")
    assert out.strip() == "ok"


def test_without_triton_auto_falls_back_and_triton_explains():
    out = _python("""
        import os, sys, torch
        sys.modules["triton"] = None  # import triton now raises ImportError
        import tram_dist.kernels as K
        from tram_dist.kernels import _triton
        assert not _triton.HAS_TRITON
        assert K.backend("cuda") == "torch"
        p, g, b = [torch.randn(10)], [torch.randn(10)], [torch.empty(10)]
        K.perturb_(p, g, scale=0.1, rule="adaptive", backups=b)
        K.restore_(p, b)
        os.environ["TRAM_KERNELS"] = "triton"
        try:
            K.restore_(p, b)
        except RuntimeError as e:
            assert "triton cannot be imported" in str(e), e
            print("ok")
        """)
    assert out.strip() == "ok"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="measures CUDA allocations")
def test_torch_path_scratch_is_bounded(monkeypatch):
    monkeypatch.setenv("TRAM_KERNELS", "torch")
    n = 3 * K.CHUNK + 5
    p = [torch.randn(n, device="cuda").bfloat16()]
    g = [torch.randn(n, device="cuda").bfloat16()]
    b = [torch.empty_like(p[0])]
    for op in (lambda: K.sum_sq(p, g, rule="fisher", eta=0.1),
               lambda: K.sum_sq(p, g, rule="adaptive", with_eps_sq=True),
               lambda: K.perturb_(p, g, scale=0.1, rule="adaptive", backups=b)):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        op()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        assert extra <= K.scratch_bytes(n) + 4096, (extra, K.scratch_bytes(n))
