"""Batch order: a global, world-size-independent sequence of optimizer steps.

For optimizer step ``(epoch, step)`` the sampler yields the GLOBAL list of `B` block indices
(a seeded permutation of the epoch, cut into consecutive groups of `B`; the incomplete last
group is dropped). Rank r takes the contiguous share ``[r * B/W, (r+1) * B/W)`` and splits it
into micro-batches. So one optimizer step sees the same B blocks at any world size, and the
``sample_index`` carried by each sample (the global block index) lets the training step seed
per-sample input noise identically at world size 1 and 8.

Resume: the data position is ``(epoch, step)``, the next step to be served; `state_dict()`
holds it together with what must not change between runs (seed, B, number of blocks).
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Iterator

import torch

from .blocks import collate
from .distributed import dist_info
from .errors import DataError


def batch_layout(global_batch_size: int, world_size: int, micro_batch_size: int | None = None,
                 grad_accum: int | None = None) -> tuple[int, int]:
    """(micro_batch_size, grad_accum) per device such that micro * accum * world == B.

    Given neither, each device takes its whole share in one micro-batch (accumulation 1).
    """
    B, W = int(global_batch_size), int(world_size)
    if B < 1:
        raise DataError(f"batch_size: {B} must be a positive number of blocks")
    if micro_batch_size is not None and micro_batch_size < 1:
        raise DataError(f"micro_batch_size: {micro_batch_size} must be at least 1")
    if grad_accum is not None and grad_accum < 1:
        raise DataError(f"grad_accum: {grad_accum} must be at least 1")
    if micro_batch_size is not None and grad_accum is not None:
        if micro_batch_size * grad_accum * W != B:
            raise DataError(
                f"batch_size: {B} != world size {W} x micro_batch_size {micro_batch_size} x "
                f"grad_accum {grad_accum} = {W * micro_batch_size * grad_accum}; "
                "give only one of micro_batch_size / grad_accum, or make the product match")
        return micro_batch_size, grad_accum
    if micro_batch_size is not None:
        if B % (W * micro_batch_size):
            raise DataError(
                f"batch_size: {B} is not divisible by world size {W} x micro-batch "
                f"{micro_batch_size} = {W * micro_batch_size}; use a multiple of "
                f"{W * micro_batch_size} or another micro_batch_size")
        return micro_batch_size, B // (W * micro_batch_size)
    if grad_accum is not None:
        if B % (W * grad_accum):
            raise DataError(
                f"batch_size: {B} is not divisible by world size {W} x grad-accum {grad_accum} "
                f"= {W * grad_accum}; use a multiple of {W * grad_accum} or another grad_accum")
        return B // (W * grad_accum), grad_accum
    if B % W:
        raise DataError(f"batch_size: {B} is not divisible by world size {W}; use a multiple "
                        f"of {W}")
    return B // W, 1


def _stream_seed(seed: int, epoch: int) -> int:
    """Independent 63-bit seed per (seed, epoch), stable across platforms and versions."""
    digest = hashlib.sha256(f"tram_dist.sampler:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class DataPosition:
    """The next optimizer step to be served: `step` counts steps within `epoch`."""

    epoch: int = 0
    step: int = 0


class GlobalBatchSampler:
    """Deterministic global batches of `global_batch_size` indices per optimizer step."""

    def __init__(self, num_samples: int, global_batch_size: int, seed: int = 0,
                 shuffle: bool = True):
        self.num_samples, self.global_batch_size = int(num_samples), int(global_batch_size)
        self.seed, self.shuffle = int(seed), shuffle
        self.steps_per_epoch = self.num_samples // self.global_batch_size
        if self.steps_per_epoch == 0:
            raise DataError(f"batch_size: {global_batch_size} is larger than the training split "
                            f"({num_samples} blocks); use a smaller batch_size or block_size")
        self._order: tuple[int, torch.Tensor] | None = None

    def order(self, epoch: int) -> torch.Tensor:
        """The epoch's permutation of all block indices (cached for the current epoch)."""
        if self._order is None or self._order[0] != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(_stream_seed(self.seed, epoch))
                perm = torch.randperm(self.num_samples, generator=g)
            else:
                perm = torch.arange(self.num_samples)
            self._order = (epoch, perm)
        return self._order[1]

    def batch(self, pos: DataPosition) -> list[int]:
        """The global block indices of optimizer step `pos`."""
        if not 0 <= pos.step < self.steps_per_epoch:
            raise IndexError(pos)
        b = self.global_batch_size
        return self.order(pos.epoch)[pos.step * b:(pos.step + 1) * b].tolist()

    def advance(self, pos: DataPosition) -> DataPosition:
        if pos.step + 1 < self.steps_per_epoch:
            return DataPosition(pos.epoch, pos.step + 1)
        return DataPosition(pos.epoch + 1, 0)

    def position_at(self, global_step: int) -> DataPosition:
        """The position of the `global_step`-th optimizer step counted from the start."""
        return DataPosition(global_step // self.steps_per_epoch, global_step % self.steps_per_epoch)

    def __iter__(self) -> Iterator[list[int]]:
        pos = DataPosition()
        while True:
            yield self.batch(pos)
            pos = self.advance(pos)


def rank_share(global_batch: list[int], rank: int, world_size: int,
               micro_batch_size: int) -> list[list[int]]:
    """This rank's contiguous share of a global batch, split into micro-batches."""
    per_rank = len(global_batch) // world_size
    if per_rank * world_size != len(global_batch) or per_rank % micro_batch_size:
        raise DataError(f"batch_size: {len(global_batch)} is not divisible by world size "
                        f"{world_size} x micro-batch {micro_batch_size}")
    mine = global_batch[rank * per_rank:(rank + 1) * per_rank]
    return [mine[i:i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]


class TrainLoader:
    """Serves, per optimizer step, this rank's micro-batch dicts (input_ids, attention_mask,
    labels, sample_index) and keeps the data position for exact resume."""

    def __init__(self, dataset, global_batch_size: int, micro_batch_size: int | None = None,
                 grad_accum: int | None = None, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, shuffle: bool = True):
        if rank is None or world_size is None:
            rank, world_size, _ = dist_info()
        self.dataset, self.rank, self.world_size = dataset, rank, world_size
        self.micro_batch_size, self.grad_accum = batch_layout(
            global_batch_size, world_size, micro_batch_size, grad_accum)
        self.sampler = GlobalBatchSampler(len(dataset), global_batch_size, seed, shuffle)
        self.position = DataPosition()

    @property
    def global_batch_size(self) -> int:
        return self.sampler.global_batch_size

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def micro_batches(self, pos: DataPosition) -> list[dict]:
        """This rank's micro-batches of optimizer step `pos` (does not move the position)."""
        shares = rank_share(self.sampler.batch(pos), self.rank, self.world_size,
                            self.micro_batch_size)
        return [collate([self.dataset[i] for i in idx]) for idx in shares]

    def next(self) -> list[dict]:
        batches = self.micro_batches(self.position)
        self.position = self.sampler.advance(self.position)
        return batches

    def __iter__(self) -> Iterator[list[dict]]:
        while True:
            yield self.next()

    def state_dict(self) -> dict:
        return {**asdict(self.position), "seed": self.sampler.seed,
                "global_batch_size": self.global_batch_size, "num_samples": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        for field, now in (("seed", self.sampler.seed), ("global_batch_size", self.global_batch_size),
                           ("num_samples", len(self.dataset))):
            if state[field] != now:
                raise DataError(f"cannot resume: the checkpoint's data has {field}={state[field]} "
                                f"but this run has {now}; resume with the same data, seed, "
                                "batch_size and block_size")
        self.position = DataPosition(int(state["epoch"]), int(state["step"]))


class EvalLoader:
    """This rank's evaluation batches: contiguous shards, padded with marked duplicates.

    Every rank gets ``ceil(N / W)`` samples so that all ranks run the same number of forward
    passes (required under FSDP / ZeRO-3, whose forward is collective). Padding samples repeat
    real blocks and carry ``is_pad = True``; evaluate.py never counts their tokens. Re-iterable.
    """

    def __init__(self, dataset, batch_size: int, rank: int | None = None,
                 world_size: int | None = None):
        if rank is None or world_size is None:
            rank, world_size, _ = dist_info()
        if batch_size < 1:
            raise DataError(f"evaluation batch size {batch_size} must be at least 1")
        self.dataset, self.batch_size = dataset, batch_size
        n = len(dataset)
        per_rank = -(-n // world_size)
        start = rank * per_rank
        self.indices = [(start + k) % n for k in range(per_rank)]
        self.is_pad = [start + k >= n for k in range(per_rank)]

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        for i in range(0, len(self.indices), self.batch_size):
            batch = collate([self.dataset[j] for j in self.indices[i:i + self.batch_size]])
            batch["is_pad"] = torch.tensor(self.is_pad[i:i + self.batch_size], dtype=torch.bool)
            yield batch
