"""Engine tests: CPU + gloo, GPUs hidden; the helpers in engines_harness.py are importable
here and in the ranks these tests spawn."""
import os
import sys

# what the machine had before the CPU tests hid its GPUs (the FSDP1 tests need them back)
os.environ.setdefault("TRAM_TEST_CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"))
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
