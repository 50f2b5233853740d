"""Fused ops of the TRAM hot path (installed as ``tram_dist.kernels``).

Contract (the core and every engine call exactly these; nothing else in the package does
this arithmetic). All ops take equal-length lists of tensors (a flat buffer is a list of one);
math is float32 whatever the storage dtype; empty lists are no-ops.

Per-element weight w(theta, g) by ``rule``:
  "identity": w = 1                       (SAM)
  "adaptive": w = (|theta| + eta)^2       (ASAM; TRAM is eta = 0, so T = |theta|)
  "fisher":   w = 1 / (1 + eta * g^2)     (Fisher-SAM, TRAM-Fisher; theta unused)

sum_sq(thetas, grads, rule, eta)                -> float32 0-d tensor: sum of w * g^2
       (with_eps_sq=True: float32 [2] tensor, [sum of w * g^2, sum of (w * g)^2], one pass)
perturb_(params, grads, scale, rule, eta,
         backups=None, sources=None)            theta = sources[i] or params[i];
                                                 backups[i] <- params[i] (exact copy) if given;
                                                 params[i] <- theta + scale * w * g
restore_(params, backups)                       params[i] <- backups[i], bit exact
swap_in_(params, targets, backups)              backups[i] <- params[i]; params[i] <- targets[i]
diff_sq(params, sources)                        float32 0-d tensor: sum of (params - sources)^2,
                                                 sources rounded to the params' dtype (a metric:
                                                 torch path only, see diff_sq.py)

All arguments after the lists are keyword-only. Storage: params float32/bfloat16/float16,
grads in the param dtype or float32, sources float32 or the param dtype; a store to another
dtype rounds to nearest even (as ``copy_``). ``scale`` may also be a one-element tensor on the
params' device (read there: no host sync). ``backups`` and ``sources`` together: ValueError.

Every path checks its arguments the same way (ValueError): equal list lengths, equal numel per
index, one device, contiguous tensors; a DTensor is refused (TypeError: pass ``to_local()``).

Dispatch, read at every call: ``TRAM_KERNELS`` = ``auto`` (default: Triton for CUDA tensors,
the torch reference elsewhere) | ``triton`` | ``torch``; ``backend(device)`` says which one a
call takes. On CPU, ``TRAM_KERNELS=triton TRITON_INTERPRET=1`` runs the kernels in Triton's
interpreter (how the tests check them).

Each op lives in its own file beside its torch reference (``sum_sq.py``: ``sum_sq_reference``,
``_sum_sq_kernel``...); ``tram_dist.kernels.reference`` re-exports the references under the
contract's names. The torch path works CHUNK = 2**20 elements at a time: ``scratch_bytes``
bounds what a call allocates besides its outputs (8 MiB on the torch path).
"""
from ._common import (BACKENDS, CHUNK, ENV_VAR, RULES, TORCH_SCRATCH_BYTES_MAX, backend,
                      scratch_bytes)
from .diff_sq import diff_sq
from .perturb import perturb_
from .restore import restore_
from .sum_sq import sum_sq
from .swap_in import swap_in_

__all__ = ["RULES", "sum_sq", "diff_sq", "perturb_", "restore_", "swap_in_", "backend", "scratch_bytes",
           "BACKENDS", "CHUNK", "ENV_VAR", "TORCH_SCRATCH_BYTES_MAX"]
