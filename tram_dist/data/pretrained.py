"""The launcher's tiny GPT-2 and its pretrained checkpoint shipped with the package.

    from tram_dist.data.pretrained import TINY, PRETRAINED_TINY, tiny_config
    config = tiny_config(load_tokenizer("tiny"))       # GPT2Config sized to the shipped tokenizer
    AutoModelForCausalLM.from_pretrained(PRETRAINED_TINY)   # or --model PRETRAINED_TINY

`PRETRAINED_TINY` (``tram_dist/data/pretrained/tiny-gpt2-m2d2``) holds that architecture
pretrained on the six embedded domains' train splits by ``scripts/pretrain_tiny.py`` (its
README says how, and how to regenerate it byte for byte), in Hugging Face format (config,
safetensors weights, the shipped tokenizer) plus ``manifest.json`` (recipe, versions, sha256 of
every file, the evaluation figures).
"""
from __future__ import annotations

from pathlib import Path

# The launcher's `--model tiny` (about 1.1M parameters with the 2,291-token tokenizer).
TINY = dict(n_positions=256, n_embd=128, n_layer=4, n_head=4)

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
PRETRAINED_TINY = PRETRAINED_DIR / "tiny-gpt2-m2d2"
MANIFEST = "manifest.json"


def tiny_config(tokenizer, **overrides):
    """`GPT2Config` of the tiny model for `tokenizer` (vocabulary = the tokenizer's length, its
    EOS as BOS/EOS), exactly what ``launch/train_m2d2.py --model tiny`` builds."""
    from transformers import GPT2Config

    eos = tokenizer.eos_token_id
    return GPT2Config(vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos,
                      **{**TINY, **overrides})


__all__ = ["TINY", "PRETRAINED_DIR", "PRETRAINED_TINY", "MANIFEST", "tiny_config"]
