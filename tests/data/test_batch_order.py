"""Global batch order independent of world size; exact resume of the data position."""
import numpy as np
import pytest
import torch

from tram_dist.data import (DataError, DataPosition, EvalLoader, GlobalBatchSampler, TrainBlocks,
                            TrainLoader, batch_layout)


def blocks(n=64, size=4):
    return TrainBlocks(np.arange(n * size + 3, dtype=np.uint16), size)


def global_step(loaders):
    """Concatenate every rank's micro-batches of one step, in rank order."""
    out = []
    for ld in loaders:
        for mb in ld.next():
            out.append(mb)
    return {k: torch.cat([mb[k] for mb in out]) for k in out[0]}


@pytest.mark.parametrize("world,micro", [(2, 4), (4, 1), (8, 2)])
def test_same_global_blocks_at_any_world_size(world, micro):
    ds = blocks()
    single = TrainLoader(ds, 16, seed=3, rank=0, world_size=1)
    ranks = [TrainLoader(ds, 16, micro, seed=3, rank=r, world_size=world) for r in range(world)]
    assert ranks[0].grad_accum == 16 // (world * micro)
    for _ in range(9):  # crosses the epoch boundary (4 steps per epoch)
        a, b = global_step([single]), global_step(ranks)
        for k in ("input_ids", "labels", "attention_mask", "sample_index"):
            assert torch.equal(a[k], b[k]), k
        assert b["sample_index"].dtype == torch.int64
        # the block content is the block with that global index
        assert torch.equal(b["input_ids"][:, 0], b["sample_index"] * 4)


def test_epochs_are_permutations_and_seeded():
    s = GlobalBatchSampler(40, 8, seed=1)
    epoch0 = sum((s.batch(DataPosition(0, i)) for i in range(5)), [])
    epoch1 = sum((s.batch(DataPosition(1, i)) for i in range(5)), [])
    assert sorted(epoch0) == list(range(40)) and epoch0 != epoch1
    assert GlobalBatchSampler(40, 8, seed=1).batch(DataPosition(1, 2)) == s.batch(DataPosition(1, 2))
    assert GlobalBatchSampler(40, 8, seed=2).batch(DataPosition(0, 0)) != s.batch(DataPosition(0, 0))
    assert s.position_at(7) == DataPosition(1, 2)


def test_resume_restores_the_exact_position():
    ds = blocks()
    a = TrainLoader(ds, 16, 4, seed=5, rank=1, world_size=2)
    for _ in range(6):
        a.next()
    state = a.state_dict()
    assert state["epoch"] == 1 and state["step"] == 2
    b = TrainLoader(ds, 16, 4, seed=5, rank=1, world_size=2)
    b.load_state_dict(state)
    for _ in range(5):
        for x, y in zip(a.next(), b.next()):
            assert torch.equal(x["sample_index"], y["sample_index"])
    c = TrainLoader(ds, 16, 4, seed=6, rank=1, world_size=2)
    with pytest.raises(DataError, match="seed"):
        c.load_state_dict(state)


def test_batch_layout_and_its_errors():
    assert batch_layout(16, 1) == (16, 1)
    assert batch_layout(16, 4, micro_batch_size=2) == (2, 2)
    assert batch_layout(16, 2, grad_accum=4) == (2, 4)
    with pytest.raises(DataError) as e:
        batch_layout(16, 3, micro_batch_size=2)
    assert str(e.value).startswith("batch_size: 16 is not divisible by world size 3 x micro-batch 2")
    with pytest.raises(DataError, match="not divisible by world size 3"):
        batch_layout(16, 3)
    with pytest.raises(DataError, match="grad_accum 2 = 8; give only one of micro_batch_size"):
        batch_layout(16, 2, micro_batch_size=2, grad_accum=2)
    with pytest.raises(DataError, match="larger than the training split"):
        GlobalBatchSampler(10, 16)


def test_eval_loader_pads_are_marked_and_shards_equal():
    ds = blocks(n=5)
    loaders = [EvalLoader(ds, 2, rank=r, world_size=3) for r in range(3)]
    assert len({len(ld) for ld in loaders}) == 1
    seen = []
    for ld in loaders:
        for b in ld:
            seen += b["sample_index"][~b["is_pad"]].tolist()
    assert sorted(seen) == list(range(5))
