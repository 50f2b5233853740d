"""What the HSDP test's spawned ranks run (importable by the children): FSDP2 on a 2-D
(replicate, shard) mesh, built by ``tram_dist.runs.build_run`` with ``hsdp_replicas`` exactly
as ``engines_harness.Run`` builds plain FSDP2 (which has no HSDP option)."""
from __future__ import annotations

import time
from typing import Dict, Optional

import torch
import torch.distributed as dist

import engines_harness as H


class HSDPRun(H.Run):
    """``engines_harness.Run`` for engine "fsdp2" with ``RunConfig(hsdp_replicas=replicas)``;
    ``micro_batches``, ``train`` and ``full_params`` are the harness's (DTensor parameters)."""

    def __init__(self, method: str, world: int, replicas: int, step_kwargs: Optional[dict] = None):
        from tram_dist import RunConfig
        from tram_dist.run.distributed import Dist
        from tram_dist.runs import build_run

        self.kind, self.method, self.world, self.accum = "fsdp2", method, world, 1
        cls, hp, tr = H.method_spec(method)
        hyper = {**hp, "on_nonfinite": "skip"} if cls is not None else {}
        spec = (cls, hyper, tr() if tr else None)
        config = RunConfig(method=method, lr=H.LR, betas=H.BASE["betas"], weight_decay=H.BASE["weight_decay"],
                           sigma=H.SIGMA, seed=H.SEED, hsdp_replicas=replicas)
        rank = dist.get_rank()
        self.run = build_run("fsdp", H.tiny_gpt2(), dist=Dist(rank, world, rank), args=config,
                             method_kwargs={}, spec=spec,
                             step_overrides={"autocast_dtype": None, "seed": H.SEED, **(step_kwargs or {})})
        self.model, self.inner = self.run.model, self.run.module
        self.optimizer, self.step = self.run.step.optimizer, self.run.step
        self.engine = self.step.engine


def _replicas_identical(run: HSDPRun, replicas: int) -> float:
    """max |difference| between the replicas' local shards (the replicas must stay identical):
    each rank's shards all-gathered over the whole world, compared with the shard rank of the
    first replica group."""
    local = torch.cat([p.to_local().detach().reshape(-1) for p in run.inner.parameters()])
    everyone = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, local)
    shard = dist.get_world_size() // replicas
    return max(float((everyone[r] - everyone[r % shard]).abs().max()) for r in range(len(everyone)))


def hsdp_jobs(rank: int, world: int, replicas: int, jobs, steps: int) -> Dict:
    """Per ``(method, step_kwargs or None)``: metrics (losses as global token means), the full
    fp32 parameters, the mesh, the largest difference between replicas, and the time."""
    out = {}
    for method, step_kwargs in jobs:
        t0 = time.perf_counter()
        run = HSDPRun(method, world, replicas, step_kwargs)
        p = next(iter(run.inner.parameters()))
        metrics = run.train(steps)
        key = (method,) + tuple(sorted(step_kwargs or ()))
        out[key] = {"metrics": metrics, "params": run.full_params(),
                    "mesh": tuple(p.device_mesh.shape), "placements": [(type(x).__name__, getattr(x, "dim", None)) for x in p.placements],
                    "engine_world": run.engine.world_size,
                    "replica_diff": _replicas_identical(run, replicas),
                    "seconds": time.perf_counter() - t0}
        del run
    return out
