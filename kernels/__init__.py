"""Fused ops of the TRAM hot path (installed as ``tram_dist.kernels``).

Contract (the core and every engine call exactly these; nothing else in the package does
this arithmetic). All ops take equal-length lists of tensors (a flat buffer is a list of one);
math is float32 whatever the storage dtype; empty lists are no-ops.

Per-element weight w(theta, g) by ``rule``:
  "identity": w = 1                       (SAM)
  "adaptive": w = (|theta| + eta)^2       (ASAM; TRAM is eta = 0, so T = |theta|)
  "fisher":   w = 1 / (1 + eta * g^2)     (Fisher-SAM, TRAM-Fisher; theta unused)

sum_sq(thetas, grads, rule, eta)                -> float32 0-d tensor: sum of w * g^2
perturb_(params, grads, scale, rule, eta,
         backups=None, sources=None)            theta = sources[i] or params[i];
                                                 backups[i] <- params[i] (exact copy) if given;
                                                 params[i] <- theta + scale * w * g
restore_(params, backups)                       params[i] <- backups[i], bit exact
swap_in_(params, targets, backups)              backups[i] <- params[i]; params[i] <- targets[i]
"""
from .reference import perturb_, restore_, sum_sq, swap_in_

RULES = ("identity", "adaptive", "fisher")

__all__ = ["RULES", "sum_sq", "perturb_", "restore_", "swap_in_"]
