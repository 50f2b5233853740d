"""One rank of the DDP equivalence test: every method, 3 steps, this rank's share of the batch.

Run by tests/test_ddp.py as `python ddp_worker.py OUT_DIR` with RANK/WORLD_SIZE/MASTER_* set.
"""
import os
import sys

os.environ["CUDA_VISIBLE_DEVICES"] = ""
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from tram_dist import METHODS, TrainStep, build_method
from tinymodels import lm_batch, split, tiny_gpt2

GLOBAL_BATCH = 4
STEPS = 3


def global_batch(step):
    return lm_batch(n=GLOBAL_BATCH, seed=100 + step, pad_last=5, start_index=GLOBAL_BATCH * step)


def run(method, world, rank, out_dir):
    model = tiny_gpt2()
    ddp = DDP(model) if world > 1 else model
    opt, tr = build_method(method, model, lr=0.1, sigma=0.05, base_optimizer=torch.optim.SGD)
    step = TrainStep(ddp, opt, trust_region=tr, seed=7)
    per_rank = GLOBAL_BATCH // world
    log = []
    for s in range(STEPS):
        mine = split(global_batch(s), [per_rank] * world)[rank]
        m = step(split(mine, [1] * per_rank) if world > 1 else [mine])
        log.append([m.divergence, m.grad_norm, m.loss, m.perturbed_loss, m.eps_applied, m.radius])
    if rank > 0:
        torch.save(log, os.path.join(out_dir, f"{method}-world{world}-rank{rank}-log.pt"))
    if rank == 0:
        torch.save({"params": {n: p.detach() for n, p in model.named_parameters()}, "log": log},
                   os.path.join(out_dir, f"{method}-world{world}.pt"))


def main():
    out_dir = sys.argv[1]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    for method in METHODS:
        run(method, world, rank, out_dir)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
