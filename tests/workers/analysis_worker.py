"""One rank of the analysis equivalence test: epsilon-sharpness of a tiny GPT-2 under FSDP2
(fully_shard), DDP and as a plain replicated module, and CKA of an FSDP2 model against a plain
one, each rank holding half of every global batch.

Run by tests/test_analysis.py as `python analysis_worker.py OUT_DIR` with RANK / WORLD_SIZE /
MASTER_* set; writes OUT_DIR/rank{R}.json.
"""
import json
import os
import sys

os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tinymodels import lm_batch, split, tiny_gpt2  # noqa: E402
from tram_dist.analysis import epsilon_sharpness, representation_similarity  # noqa: E402

# small enough that most coordinates stay inside the box: the result depends on the gradient scale
SHARPNESS_KW = dict(epsilon=1e-3, lr=0.05, steps=2, accumulation_steps=2)
GLOBAL_BATCH = 4


def global_batches():
    """4 global batches; the last sample of each is part padding, so the ranks' token counts differ."""
    return [lm_batch(n=GLOBAL_BATCH, seq=10, seed=50 + s, pad_last=4, start_index=GLOBAL_BATCH * s)
            for s in range(4)]


def local_batches(rank, world):
    per_rank = GLOBAL_BATCH // world
    return [split(b, [per_rank] * world)[rank] for b in global_batches()]


def wrap(kind, model, world):
    if kind == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (world,))
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model)
    return model  # replicated plain module: analysis sums its gradients over the ranks


def local_data(model):
    return [(p.to_local() if hasattr(p, "to_local") else p).detach().clone() for p in model.parameters()]


def main():
    out_dir = sys.argv[1]
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    mine = local_batches(rank, world)
    result = {}
    models = {}
    for kind in ("fsdp2", "ddp", "replicated"):
        model = wrap(kind, tiny_gpt2(seed=0), world)
        before = local_data(model)
        result[f"sharpness_{kind}"] = epsilon_sharpness(model, mine, **SHARPNESS_KW)
        result[f"restored_{kind}"] = all(torch.equal(a, b) for a, b in zip(local_data(model), before))
        models[kind] = model
    result["cka_fsdp2_vs_plain"] = representation_similarity(models["fsdp2"], tiny_gpt2(seed=1), mine)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
