"""Fixed-length blocks over a flat token stream (zero-copy views of the memory map).

Training (`TrainBlocks`): concatenate, then cut into ``len // block_size`` non-overlapping
blocks; the tail shorter than a block is dropped (as Hugging Face's run_clm does).

Evaluation (`EvalBlocks`): no token lost, none counted twice. Blocks start every
``block_size - 1`` tokens, so each block's first token is the previous block's last one and
serves only as context (a causal LM never predicts position 0 of its input). Every token of
the stream except the very first is therefore a prediction target exactly once: a split of N
tokens yields exactly N - 1 targets. The last block is right-padded (attention_mask 0,
labels -100). Non-overlapping blocks would instead leave every block's first token
unpredicted (N / block_size targets lost); with 1024-token blocks the two protocols differ in
about 0.1 % of the targets.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import DataError

IGNORE_INDEX = -100  # label value skipped by the loss (torch / Hugging Face convention)


def _as_long(view: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(view, dtype=np.int64))


class TrainBlocks(Dataset):
    """Non-overlapping `block_size` blocks; the incomplete tail is dropped."""

    def __init__(self, tokens: np.ndarray, block_size: int, name: str = "split"):
        if block_size < 2:
            raise DataError(f"block_size: {block_size} is too small; use at least 2 tokens")
        self.tokens, self.block_size, self.name = tokens, int(block_size), name
        self.num_blocks = len(tokens) // self.block_size
        if self.num_blocks == 0:
            raise DataError(f"{name} has {len(tokens)} tokens, fewer than one block of "
                            f"{block_size}; use a smaller block_size or more text")

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.num_blocks:
            raise IndexError(i)
        ids = _as_long(self.tokens[i * self.block_size:(i + 1) * self.block_size])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
                "sample_index": torch.tensor(i, dtype=torch.int64)}


class EvalBlocks(Dataset):
    """Blocks with a one-token overlap so that every token but the first is scored once."""

    def __init__(self, tokens: np.ndarray, block_size: int, pad_id: int = 0, name: str = "split"):
        if block_size < 2:
            raise DataError(f"block_size: {block_size} is too small; use at least 2 tokens")
        if len(tokens) < 2:
            raise DataError(f"{name} has {len(tokens)} token(s); perplexity needs at least 2")
        self.tokens, self.block_size, self.pad_id, self.name = tokens, int(block_size), pad_id, name
        self.stride = self.block_size - 1
        self.num_blocks = -(-(len(tokens) - 1) // self.stride)  # ceil((N - 1) / stride)

    @property
    def num_targets(self) -> int:
        return len(self.tokens) - 1

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.num_blocks:
            raise IndexError(i)
        start = i * self.stride
        ids = _as_long(self.tokens[start:start + self.block_size])
        n = ids.numel()
        input_ids = torch.full((self.block_size,), self.pad_id, dtype=torch.int64)
        input_ids[:n] = ids
        mask = torch.zeros(self.block_size, dtype=torch.int64)
        mask[:n] = 1
        labels = torch.full((self.block_size,), IGNORE_INDEX, dtype=torch.int64)
        labels[:n] = ids
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
                "sample_index": torch.tensor(i, dtype=torch.int64)}


def collate(samples: list[dict]) -> dict:
    """Stack sample dicts into a batch dict (every value is a tensor of the same shape)."""
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
