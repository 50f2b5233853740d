"""tram_dist: Trust Region Aware Minimization (Sherborne et al., ICLR 2024) for sharded fine-tuning.

`kernels/` is installed as the subpackage `tram_dist.kernels`, never as a top-level `kernels`
module: transformers probes for Hugging Face's own `kernels` package and a top-level module of
that name would shadow it.
"""
import platform

from setuptools import find_packages, setup

# Users with a CUDA torch get these; on a CPU-only machine install torch==2.13.0 first (see README)
# so that this range is already satisfied and pip never pulls a CUDA build.
install_requires = [
    "torch>=2.4",
    "transformers>=4.45",
    "huggingface_hub>=0.24",
    "safetensors",
    "tokenizers",
    "pyyaml",
    "tqdm",
    "numpy",
]
if platform.system() == "Linux":
    install_requires.append("triton>=3.0")

setup(
    name="tram_dist",
    version="0.1.0",
    description="TRAM and the SAM family as sharded, fused optimizers for large-model fine-tuning",
    python_requires=">=3.10",
    # every subpackage of tram_dist/ (run, engines, data, integrations, ...) plus kernels/
    packages=["tram_dist", *(f"tram_dist.{name}" for name in find_packages("tram_dist")), "tram_dist.kernels"],
    package_dir={"tram_dist": "tram_dist", "tram_dist.kernels": "kernels"},
    package_data={"tram_dist.data": ["corpus/*/*.txt", "corpus/*.json", "tokenizer/*", "pretrained/*/*"]},
    install_requires=install_requires,
    # DeepSpeed must be installed with --no-build-isolation after torch (its build imports torch).
    # accelerate: what transformers.Trainer and `accelerate launch` need (tram_dist itself does
    # not import it); matplotlib: the comparison's plot (launch/compare.py).
    # accelerate in the deepspeed extra: transformers' zero.Init path (ZeRO-3 builds) needs it
    extras_require={"deepspeed": ["deepspeed>=0.15", "accelerate>=1.1"], "trainer": ["accelerate>=1.1"],
                    "plot": ["matplotlib"],
                    "tensorboard": ["tensorboard"], "wandb": ["wandb"], "dev": ["pytest>=8", "pytest-timeout"]},
)
