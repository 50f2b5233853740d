"""Plain-torch reference ops under the contract's names: the test oracle and the CPU path.

Each lives beside its kernel (``sum_sq.py``, ``perturb.py``, ...); this module re-exports them
so ``tram_dist.kernels.reference.<op>`` always means "the torch reference", whatever
``TRAM_KERNELS`` says.
"""
from .perturb import perturb_reference as perturb_
from .restore import restore_reference as restore_
from .sum_sq import sum_sq_reference as sum_sq
from .swap_in import swap_in_reference as swap_in_

__all__ = ["sum_sq", "perturb_", "restore_", "swap_in_"]
