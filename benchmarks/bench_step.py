"""Step time of TRAM against AdamW and SAM on one model, batch and engine, measured side by side.

Prints, for each method, the median step time, its ratio to an AdamW step and the floor
(3F + 2B) / (F + B) for TRAM (2F + 2B for SAM-style methods) computed from the measured
forward time F and backward time B, and the peak memory of the step.

    python benchmarks/bench_step.py                       # CPU, small GPT-2 config
    python benchmarks/bench_step.py --model gpt2 --device cuda --batch 8 --seq 1024 --dtype bf16
    python benchmarks/bench_step.py --model gpt2-xl --device cuda --batch 4 --seq 1024 --dtype bf16

Each method runs in a fresh process (``--only``) so that its peak memory is its own:
``torch.cuda.max_memory_allocated`` on a GPU, the process's peak RSS on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

METHODS = ["adamw", "sam", "asam", "fsam", "tram-x", "tram-theta-prev", "tram-theta0", "tram-fisher"]
FLOOR_PASSES = {"adamw": (1, 1), "tram-x": (3, 2), "tram-theta-prev": (3, 2), "tram-theta0": (3, 2)}


def build_model(name: str, device, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if name == "small":
        cfg = GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=8192, n_positions=256)
    else:  # a hub name or local path: the architecture only, random weights (no download needed offline)
        cfg = AutoConfig.from_pretrained(name)
    model = (GPT2LMHeadModel(cfg) if isinstance(cfg, GPT2Config) else AutoModelForCausalLM.from_config(cfg))
    return model.to(device=device, dtype=dtype)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup, repeat):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_one(args, method):
    from tram_dist import TrainStep, build_method

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = build_model(args.model, device, dtype)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids,
             "sample_index": torch.arange(args.batch)}
    inputs = {k: v for k, v in batch.items() if k != "sample_index"}
    result = {"method": method}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if method == "forward":
        with torch.no_grad():
            result["time"] = timed(lambda: model(**inputs), device, args.warmup, args.repeat)
    elif method == "forward_backward":
        def fb():
            model(**inputs).loss.backward()
            model.zero_grad(set_to_none=True)
        result["time"] = timed(fb, device, args.warmup, args.repeat)
    else:
        opt, tr = build_method(method, model, lr=1e-5, sigma=1e-5)
        step = TrainStep(model, opt, trust_region=tr)
        result["time"] = timed(lambda: step([batch]), device, args.warmup, args.repeat)
    if device.type == "cuda":
        result["peak_bytes"] = torch.cuda.max_memory_allocated()
    else:
        result["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", help="'small' (a config-built GPT-2) or a HF name/path")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default=None, help="JSON output (default benchmarks/results/step-<device>.json)")
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:
        print(json.dumps(run_one(args, args.only)))
        return
    rows = {}
    base_cmd = [sys.executable, __file__, "--model", args.model, "--device", args.device, "--dtype", args.dtype,
                "--batch", str(args.batch), "--seq", str(args.seq), "--warmup", str(args.warmup),
                "--repeat", str(args.repeat)]
    for method in ["forward", "forward_backward"] + args.methods.split(","):
        out = subprocess.run(base_cmd + ["--only", method], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"bench_step: {method} failed:\n{out.stderr[-2000:]}")
        rows[method] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  measured {method}: {rows[method]['time'] * 1e3:.1f} ms", file=sys.stderr)
    F = rows["forward"]["time"]
    B = rows["forward_backward"]["time"] - F
    adamw = rows.get("adamw", {}).get("time")
    hw = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    print(f"\nbench_step: model={args.model} dtype={args.dtype} batch={args.batch}x{args.seq} on {hw}")
    print(f"F = {F * 1e3:.1f} ms, B = {B * 1e3:.1f} ms")
    print(f"{'method':<18}{'step ms':>10}{'/ AdamW':>10}{'floor':>10}{'peak MiB':>11}")
    for method in args.methods.split(","):
        r = rows[method]
        nf, nb = FLOOR_PASSES.get(method, (2, 2))
        floor = (nf * F + nb * B) / (F + B)
        ratio = r["time"] / adamw if adamw else float("nan")
        print(f"{method:<18}{r['time'] * 1e3:>10.1f}{ratio:>10.2f}{floor:>10.2f}{r['peak_bytes'] / 2**20:>11.0f}")
    out_path = args.out or os.path.join(os.path.dirname(__file__), "results", f"step-{args.device}.json")
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump({"hardware": hw, "args": vars(args), "F": F, "B": B, "rows": rows}, f, indent=2)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
