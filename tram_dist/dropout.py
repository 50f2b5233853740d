"""Dropout and the trust-region distance d.

d compares the model's predictions at a target (noised inputs, or the previous / pretrained /
EMA parameters) with the pass-1 predictions. In train mode every forward draws fresh dropout
masks, so two forwards with *different* masks differ by the dropout noise itself (for GPT-2 at
p = 0.1 a per-token KL of ~1e-3), which swamps what d is meant to measure (~1e-6 between
consecutive steps). ``TrainStep(target_dropout=...)`` chooses how the target forward sees dropout:

* ``"shared"`` (default): the target forward replays the random state its pass-1 forward
  started from, so it draws the very same masks; d is then 0 when the target equals theta,
  and measures only the trust region otherwise.
* ``"off"``: the target forward runs in eval mode (no dropout), compared with the pass-1
  forward that had dropout: d then includes the dropout noise of pass 1.
* ``"independent"``: the target forward draws its own masks, as the authors' released code
  does implicitly: d includes the dropout noise of both forwards.

The replayed state covers the CPU generator and, on CUDA, the current device's generator; the
forward hooks and activation checkpointing of every engine consume it the same way in both
forwards (torch.utils.checkpoint restores it itself around its recomputation).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

TARGET_DROPOUT = ("shared", "off", "independent")


@dataclass
class RNGState:
    """The generators a dropout forward draws from, captured before that forward."""

    cpu: torch.Tensor
    cuda: Optional[torch.Tensor] = None
    cuda_device: Optional[int] = None

    @classmethod
    def capture(cls, device: torch.device) -> "RNGState":
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            return cls(torch.get_rng_state(), torch.cuda.get_rng_state(index), index)
        return cls(torch.get_rng_state())

    @contextlib.contextmanager
    def replayed(self) -> Iterator[None]:
        """Run the body from this state; the generators continue afterwards as if it never ran."""
        devices = [self.cuda_device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.cuda_device)
            yield


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """Every submodule in eval mode for the body, each back to its own mode afterwards
    (attention dropout in Hugging Face models reads the attention module's ``training``, so
    switching only ``nn.Dropout`` modules would not be enough)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


# The dropout probabilities of common Hugging Face configs (GPT-2, BERT/RoBERTa/XLM-R, OPT,
# Llama-style, T5). ``set_dropout`` sets every one the config has.
DROPOUT_FIELDS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout",
                  "hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout",
                  "dropout", "attention_dropout", "activation_dropout", "hidden_dropout",
                  "dropout_rate")


def set_dropout(config, p: float) -> list:
    """Set every dropout probability of a Hugging Face ``config`` to ``p``; returns the field
    names set. ValueError if p is outside [0, 1) or the config has no dropout field."""
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {p!r}")
    names = [n for n in DROPOUT_FIELDS if isinstance(getattr(config, n, None), (int, float))
             and not isinstance(getattr(config, n), bool)]
    if not names:
        raise ValueError(f"{type(config).__name__} has none of the dropout fields "
                         f"{', '.join(DROPOUT_FIELDS)}; set its dropout in the config instead")
    for n in names:
        setattr(config, n, float(p))
    return names
