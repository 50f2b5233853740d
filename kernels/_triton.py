"""Triton plumbing shared by the op files: import guard, interpreter switch, launch geometry,
multi-tensor tables, and the jit helpers every kernel uses (weights, loads, stores).

Nothing here is public; the op files (`sum_sq.py`, `perturb.py`, ...) are the API.
"""
from __future__ import annotations

import contextlib
import os
import sys
import types
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

try:  # a CPU-only install may have no triton at all; the torch reference then serves every call
    import triton
    import triton.language as tl
    TRITON_IMPORT_ERROR: Optional[BaseException] = None
except Exception as exc:  # ImportError, or a broken install that fails while importing
    triton = None
    # Only `tl.constexpr` is touched at import time (kernel signatures); bodies never run.
    tl = types.SimpleNamespace(constexpr=object)
    TRITON_IMPORT_ERROR = exc

HAS_TRITON = triton is not None

# Storage dtypes the kernels load and store; math is float32 whatever these are.
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Elements per program. Streaming ops need many bytes in flight per SM, not big tiles: 4096
# elements is 16 elements a thread at 8 warps (two 16-byte vectors per operand in bf16).
DEFAULT_BLOCK = 4096
MIN_BLOCK = 128      # one warp, 4 elements a thread: enough for tiny tensors (biases, norms)
MAX_BLOCK = 1 << 16  # refused above: no streaming op needs more (Triton's own limit is 2**20)

RULE_IDS = {"identity": 0, "adaptive": 1, "fisher": 2}


def block_size(numel: int, *, cap: int = DEFAULT_BLOCK) -> int:
    """Elements per program for a launch whose largest tensor has ``numel`` elements.

    The next power of two above ``numel``, between MIN_BLOCK and ``cap``; refuses a cap past
    MAX_BLOCK or one that is not a power of two (Triton's `tl.arange` needs one).
    """
    if cap > MAX_BLOCK or cap < MIN_BLOCK or cap & (cap - 1):
        raise ValueError(f"block cap must be a power of two in [{MIN_BLOCK}, {MAX_BLOCK}], got {cap}")
    n = max(int(numel), 1)
    return max(MIN_BLOCK, min(cap, 1 << (n - 1).bit_length()))


def num_warps(block: int) -> int:
    """Warps for a streaming program of ``block`` elements: about 16 elements a thread."""
    return max(1, min(8, block // 512))


# ---------------------------------------------------------------------------------------------
# Interpreter switch
#
# Triton decides between compiling and interpreting when `@triton.jit` runs, i.e. when the op
# files are imported. In a full pytest run (or a notebook) TRITON_INTERPRET is often set after
# that import, so `jit` below records every plain function and `sync_mode` re-wraps all of them
# (kernels and the helpers they call, in every module of this package that holds them) when the
# variable has changed since. TRITON_INTERPRET is therefore read at launch time, like
# TRAM_KERNELS.
# ---------------------------------------------------------------------------------------------
_JIT_FNS: List[Callable] = []  # the plain functions, in definition order
# wrappers per mode (interpreted or not), kept so that switching back reuses compiled kernels
_JIT_WRAPPED: Dict[bool, Dict[Callable, object]] = {False: {}, True: {}}
_JIT_MODE: Optional[bool] = None  # the mode of the wrappers bound in the modules now


def interpret_enabled() -> bool:
    """Whether Triton would run kernels in its CPU interpreter right now (TRITON_INTERPRET)."""
    if not HAS_TRITON:
        return False
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4; older ones read the variable
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def jit(fn: Callable):
    """`triton.jit` for this package: records ``fn`` so `sync_mode` can re-wrap it."""
    global _JIT_MODE
    _JIT_FNS.append(fn)
    if not HAS_TRITON:
        return fn
    if _JIT_MODE is None:
        _JIT_MODE = interpret_enabled()
    return _wrap(fn, _JIT_MODE)


def _wrap(fn: Callable, mode: bool):
    cache = _JIT_WRAPPED[mode]
    if fn not in cache:
        if mode:
            from triton.runtime.interpreter import InterpretedFunction
            cache[fn] = InterpretedFunction(fn)
        else:
            cache[fn] = triton.runtime.jit.JITFunction(fn)
    return cache[fn]


def sync_mode() -> bool:
    """Re-bind every recorded jit function for the current TRITON_INTERPRET; returns the flag."""
    global _JIT_MODE
    mode = interpret_enabled()
    if mode == _JIT_MODE:
        return mode
    old = {id(w): fn for fn, w in _JIT_WRAPPED[_JIT_MODE].items()}
    prefix = __name__.rpartition(".")[0] + "."
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(prefix):
            continue
        for attr, value in list(vars(module).items()):
            fn = old.get(id(value))
            if fn is not None:
                setattr(module, attr, _wrap(fn, mode))
    _JIT_MODE = mode
    return mode


def prepare(device: torch.device) -> None:
    """Check that Triton can run on ``device`` now, re-wrapping kernels for the interpreter if
    TRITON_INTERPRET changed. Raises RuntimeError with the fix otherwise."""
    if not HAS_TRITON:
        raise RuntimeError(
            f"TRAM_KERNELS=triton but triton cannot be imported ({TRITON_IMPORT_ERROR!r}); "
            "install triton or set TRAM_KERNELS=torch (or auto)")
    interp = sync_mode()
    if device.type == "cpu" and not interp:
        raise RuntimeError(
            "the Triton kernels got CPU tensors but TRITON_INTERPRET is not set; set "
            "TRITON_INTERPRET=1 to run them in Triton's interpreter, or TRAM_KERNELS=torch")
    if device.type != "cpu" and interp:
        raise RuntimeError(
            f"TRITON_INTERPRET=1 with {device.type} tensors: the interpreter only runs these "
            "kernels on CPU tensors (multi-tensor tables hold raw addresses); unset it")


def launch_options(block: int) -> dict:
    # enable_fp_fusion=False: no mul+add -> fma contraction, so every fp32 operation rounds as
    # in the torch reference (which runs one op per kernel) and results match it bit for bit.
    return {"num_warps": num_warps(block), "enable_fp_fusion": False}


# ---------------------------------------------------------------------------------------------
# Launch plans: one launch per bucket of tensors that share a dtype combination
# ---------------------------------------------------------------------------------------------
@dataclass
class Launch:
    """One kernel launch over the tensors ``index`` of the op's lists.

    ``multi`` False: a single tensor addressed through the pointer arguments (``carriers``),
    ``numel`` elements, grid = cdiv(numel, block). ``multi`` True: ``table`` (int64, on the
    device) holds, for the T tensors, one row of data pointers per operand, then a row of numels,
    then a row of each tensor's first program id; a program finds its tensor by binary search
    over that last row (``log_t`` steps) and the carriers only give the pointee dtypes.
    """
    index: List[int]
    carriers: List[Tensor]
    numel: int
    grid: int
    block: int
    multi: bool
    table: Optional[Tensor]
    count: int
    log_t: int
    aligned: bool

    def meta(self) -> dict:
        return dict(MULTI=self.multi, LOG_T=self.log_t, ALIGNED=self.aligned, BLOCK=self.block,
                    **launch_options(self.block))

    def table_arg(self) -> Tensor:
        return self.table if self.table is not None else self.carriers[0]


# Tables are a pure function of (device, block, pointers, numels): cache them so a training loop
# that calls the op every step on the same parameters uploads its table once.
_TABLES: "OrderedDict[tuple, Tensor]" = OrderedDict()
_TABLES_MAX = 64


def _table(device: torch.device, rows: List[Tuple[int, ...]], numels: Tuple[int, ...],
           firsts: Tuple[int, ...]) -> Tensor:
    key = (str(device), tuple(rows), numels, firsts)
    tab = _TABLES.get(key)
    if tab is None:
        flat = [v for row in rows for v in row] + list(numels) + list(firsts)
        tab = torch.tensor(flat, dtype=torch.int64).to(device)
        _TABLES[key] = tab
        if len(_TABLES) > _TABLES_MAX:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    return tab


def plan(operands: Sequence[Sequence[Tensor]], *, cap: int = DEFAULT_BLOCK) -> List[Launch]:
    """Group the op's tensor lists (operands[k][i]: operand k of tensor i) into launches.

    Empty tensors are skipped; tensors are bucketed by their operands' dtypes in first-seen order
    (so launch order, and sum_sq's reduction order, is deterministic); a bucket of one tensor is
    a flat launch, a larger one a multi-tensor launch through a table.
    """
    buckets: "OrderedDict[tuple, List[int]]" = OrderedDict()
    for i in range(len(operands[0])):
        if operands[0][i].numel() == 0:
            continue
        key = tuple(op[i].dtype for op in operands)
        buckets.setdefault(key, []).append(i)
    launches = []
    for index in buckets.values():
        carriers = [op[index[0]] for op in operands]
        numels = tuple(operands[0][i].numel() for i in index)
        block = block_size(max(numels), cap=cap)
        if len(index) == 1:
            grid = triton.cdiv(numels[0], block)
            launches.append(Launch(index, carriers, numels[0], grid, block, False, None, 1, 0, True))
            continue
        blocks = [triton.cdiv(n, block) for n in numels]
        firsts, acc = [], 0
        for b in blocks:
            firsts.append(acc)
            acc += b
        rows = [tuple(op[i].data_ptr() for i in index) for op in operands]
        aligned = all(p % 16 == 0 for row in rows for p in row)
        table = _table(carriers[0].device, rows, numels, tuple(firsts))
        t = len(index)
        launches.append(Launch(index, carriers, 0, acc, block, True, table, t,
                               (t - 1).bit_length(), aligned))
    return launches


# ---------------------------------------------------------------------------------------------
# Shared jit helpers
# ---------------------------------------------------------------------------------------------
@jit
def _locate(tab, T, NUMEL_ROW: tl.constexpr, LOG_T: tl.constexpr, BLOCK: tl.constexpr):
    """(tensor index, first element of this program, tensor numel) for a multi-tensor launch."""
    pid = tl.program_id(0)
    first_row = tab + (NUMEL_ROW + 1) * T
    lo = 0
    hi = T
    for _ in tl.static_range(LOG_T):  # invariant: first[lo] <= pid < first[hi]
        mid = (lo + hi) // 2
        go = tl.load(first_row + mid) <= pid
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    start = (pid - tl.load(first_row + lo)).to(tl.int64) * BLOCK
    n = tl.load(tab + NUMEL_ROW * T + lo)
    return lo, start, n


@jit
def _table_ptr(tab, ROW: tl.constexpr, T, t, like, ALIGNED: tl.constexpr):
    """Data pointer of operand ROW of tensor t, typed like the carrier pointer ``like``."""
    ptr = tl.load(tab + ROW * T + t).to(like.dtype)
    if ALIGNED:  # the launcher checked every pointer of the table: lets Triton emit 16-byte ops
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@jit
def _load_f32(ptr, offs, mask, EVEN: tl.constexpr):
    """Load a block as float32; full blocks go unmasked so they vectorize."""
    if EVEN:
        x = tl.load(ptr + offs)
    else:
        x = tl.load(ptr + offs, mask=mask, other=0.0)
    return x.to(tl.float32)


@jit
def _load_raw(ptr, offs, mask, EVEN: tl.constexpr):
    if EVEN:
        x = tl.load(ptr + offs)
    else:
        x = tl.load(ptr + offs, mask=mask, other=0.0)
    return x


@jit
def _rtne_bf16(x):
    """float32 -> bfloat16, round to nearest even, NaN -> 0x7FC0, as torch rounds.

    Done on the bits because Triton's interpreter truncates in `.to(tl.bfloat16)` (and its
    "rtne" mode rounds half up), so `.to` would make the CPU-tested path differ from the GPU.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + (((bits >> 16) & 1) + 0x7FFF)
    bits = tl.where(x != x, 0x7FC00000, bits)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@jit
def _store(ptr, offs, x, mask, EVEN: tl.constexpr):
    """Store ``x`` cast to ptr's element type (exact if it already is; RTNE otherwise)."""
    dt: tl.constexpr = ptr.dtype.element_ty
    if x.dtype == dt:
        y = x
    elif dt == tl.bfloat16:
        y = _rtne_bf16(x.to(tl.float32))
    else:
        y = x.to(tl.float32).to(dt)
    if EVEN:
        tl.store(ptr + offs, y)
    else:
        tl.store(ptr + offs, y, mask=mask)


@jit
def _sum(x):
    """tl.sum over a 1-d block. `tl.sum` itself is a @triton.jit function of triton.language,
    wrapped for one mode when triton was imported, so it cannot follow `sync_mode`; the builtin
    `tl.reduce` with the stdlib's combine function can (and the interpreter sums it with numpy)."""
    return tl.reduce(x, 0, tl.standard._sum_combine)


@jit
def _scaled_weight(theta, g, s, eta, RULE: tl.constexpr):
    """s * w(theta, g) in float32, each product rounded in the reference's order."""
    if RULE == 1:  # adaptive: (|theta| + eta)^2
        t = tl.abs(theta) + eta
        w = s * (t * t)
    elif RULE == 2:  # fisher: 1 / (1 + eta g^2); IEEE division, as torch's reciprocal
        w = s * tl.math.div_rn(tl.full(g.shape, 1.0, tl.float32), 1.0 + (eta * g) * g)
    else:  # identity
        w = tl.full(g.shape, 1.0, tl.float32) * s
    return w


def device_guard(device: torch.device):
    """Launch on the tensors' GPU even if another one is current."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
