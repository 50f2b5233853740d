"""DeepSpeed on the CPU accelerator in tests: what it refuses here but runs on a GPU."""
import contextlib

import torch


def allow_fp16_on_cpu() -> None:
    """DeepSpeed's CPU accelerator refuses fp16 ("Type fp16 is not supported on your device")
    unless oneDNN reports AVX512-FP16 (this machine's CPUs do not); torch runs fp16 on any CPU, so
    the ranks declare it supported and DeepSpeed's fp16 path (its loss scaler, overflow checks)
    runs as on a GPU."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu" and not accelerator.is_fp16_supported():
        accelerator.is_fp16_supported = lambda: True
        accelerator.supported_dtypes = lambda: [torch.float32, torch.bfloat16, torch.float16]


@contextlib.contextmanager
def fp16_allowed_on_cpu():
    """``allow_fp16_on_cpu`` for the block only (in the test process itself, not a spawned rank)."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    allow_fp16_on_cpu()
    try:
        yield
    finally:
        for name in ("is_fp16_supported", "supported_dtypes"):
            accelerator.__dict__.pop(name, None)
