"""Peak host memory per rank of building a ZeRO-3 run, with and without deepspeed.zero.Init.

    python benchmarks/zero_init_memory.py            # GPT-2-medium shape, 2 CPU ranks (gloo)
    python benchmarks/zero_init_memory.py --layers 4 # smaller, quicker

Saves a randomly initialised model of the shape once (safetensors, in --work), then, for each
mode, starts 2 ranks with torchrun that each load it with ``from_pretrained`` (as the launcher
does) and build the TRAM ZeRO-3 engine (``tram_dist.runs.build_run``); every rank reports its
peak resident set size (``ru_maxrss``) after the build. Without zero.Init every rank first
builds and loads the whole fp32 model; with it, parameters are partitioned as they are created
and the weights are copied into the partitions. Writes benchmarks/results/zero_init_memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rank_main(folder: str, zero_init: bool, out: str) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    import torch.distributed as dist

    from tram_dist import RunConfig
    from tram_dist.run.distributed import init_distributed
    from tram_dist.run.model import build_model, model_config
    from tram_dist.runs import build_run

    d = init_distributed(sharded=True)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "train_batch_size": d.world_size, "gradient_clipping": 0.0,
                 "zero_optimization": {"stage": 3}, "bf16": {"enabled": False}}
    config = model_config(folder, None)
    model = build_model(folder, config, seed=0, zero3_config=ds_config if zero_init else None)
    after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    run = build_run("deepspeed", model, dist=d, args=RunConfig(method="tram-theta-prev", lr=1e-5),
                    method_kwargs={}, ds_config=ds_config)
    after_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    parts = [float(after_load), float(after_build)]
    gathered = [None] * d.world_size
    dist.all_gather_object(gathered, parts)
    if d.main:
        Path(out).write_text(json.dumps(gathered))
    del run
    dist.destroy_process_group()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=24, help="GPT-2 medium: 24 layers, width 1024")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--work", default="/tmp/tram_zero_init_memory")
    args = p.parse_args()
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = Path(args.work) / f"gpt2-{args.layers}x{args.width}"
    if not (folder / "model.safetensors").is_file():
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=args.width // 64))
        model.save_pretrained(folder)
        del model
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        numel = sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())
    results = {"model": f"GPT-2 shape, {args.layers} layers, width {args.width}", "parameters": numel,
               "fp32_model_gib": numel * 4 / 2**30, "ranks": args.ranks, "device": "cpu (gloo)"}
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    for mode in ("without_zero_init", "with_zero_init"):
        out = Path(args.work) / f"{mode}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(args.ranks), __file__, "--rank-main", str(folder), str(mode == "with_zero_init"), str(out)]
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
        per_rank = json.loads(out.read_text())
        results[mode] = {"peak_rss_gib_after_load": [r[0] for r in per_rank],
                         "peak_rss_gib_after_engine": [r[1] for r in per_rank]}
        print(f"{mode}: peak RSS per rank after load {[f'{r[0]:.2f}' for r in per_rank]} GiB, "
              f"after the ZeRO-3 engine {[f'{r[1]:.2f}' for r in per_rank]} GiB", flush=True)
    dest = ROOT / "benchmarks" / "results" / "zero_init_memory.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {dest}")
    return 0


def _prod(shape) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rank-main":
        rank_main(sys.argv[2], sys.argv[3] == "True", sys.argv[4])
    else:
        sys.exit(main())
