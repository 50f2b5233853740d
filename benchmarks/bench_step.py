"""Step time of TRAM against AdamW and SAM on one model, batch and engine, measured side by side.

Prints, for each method, the median step time, its ratio to an AdamW step and the floor
(3F + 2B) / (F + B) for TRAM (2F + 2B for SAM-style methods) computed from the measured
forward time F and backward time B, and the peak memory of the step.

    python benchmarks/bench_step.py                       # CPU, small GPT-2 config
    python benchmarks/bench_step.py --model gpt2 --device cuda --batch 8 --seq 1024 --dtype bf16
    python benchmarks/bench_step.py --model gpt2-xl --device cuda --batch 4 --seq 1024 --dtype bf16
    # offline: the architecture from a local config file (random weights, nothing downloaded)
    python benchmarks/bench_step.py --model benchmarks/configs/gpt2-xl.json --device cuda \
        --batch 4 --seq 1024 --dtype bf16 --in-process

``--model`` is ``small`` (a 4-layer GPT-2 built here), a local config file (``*.json``, e.g.
``benchmarks/configs/gpt2.json``: ``AutoConfig.for_model`` of its ``model_type``), or a hub
name / local folder (``AutoConfig.from_pretrained``). The model is built directly on
``--device`` (``AutoModelForCausalLM.from_config`` under ``torch.device``), then cast to
``--dtype``.

Each method runs in a fresh process (``--only``) so that its peak memory is its own:
``torch.cuda.max_memory_allocated`` on a GPU, the process's peak RSS on CPU. ``--in-process``
runs them one after another in this process instead (no interpreter start and model import
per method): on a GPU each method's model is freed and the peak counter reset before the
next, so peaks stay per method; on CPU the peak RSS of one process covers all methods, so
``peak_bytes`` is recorded as null. The JSON is rewritten after every method
(``"complete": false`` until the last), so a run cut short keeps what it measured.
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


def load_config(name: str):
    """The model config of ``--model`` (see the module docstring); no network access for
    ``small`` and local files."""
    from transformers import AutoConfig, GPT2Config

    if name == "small":
        return GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=8192, n_positions=256)
    if name.endswith(".json") and os.path.isfile(name):
        with open(name) as f:
            fields = json.load(f)
        fields = {k: v for k, v in fields.items() if not k.startswith("_")}
        model_type = fields.pop("model_type", None)
        if model_type is None:
            sys.exit(f"bench_step: {name} has no model_type field (e.g. \"gpt2\")")
        return AutoConfig.for_model(model_type, **fields)
    # a hub name or local folder: the architecture only, random weights
    return AutoConfig.from_pretrained(name)


def build_model(name: str, device, dtype):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = load_config(name)
    with torch.device(device):  # parameters are created (and initialised) on the device
        model = AutoModelForCausalLM.from_config(cfg)
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
        name, _, fraction = method.partition("@")  # "tram-x@0.5": divergence_fraction 0.5
        opt, tr = build_method(name, model, lr=1e-5, sigma=1e-5)
        step = TrainStep(model, opt, trust_region=tr, divergence_fraction=float(fraction or 1.0))
        result["time"] = timed(lambda: step([batch]), device, args.warmup, args.repeat)
    if device.type == "cuda":
        result["peak_bytes"] = torch.cuda.max_memory_allocated()
    elif args.in_process:
        result["peak_bytes"] = None  # one process's peak RSS covers every method run so far
    else:
        result["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["n_params"] = sum(p.numel() for p in model.parameters())
    return result


def run_in_process(args, method):
    """``run_one`` here, then everything it built freed (the next method's peak is its own).
    A method that raises gives a row with its ``error`` (no figures); the others still run."""
    import gc
    import traceback

    try:
        result = run_one(args, method)
    except Exception as e:  # noqa: BLE001 - recorded, and the exit status says so
        traceback.print_exc()
        result = {"method": method, "error": f"{type(e).__name__}: {e}"[:2000]}
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return result


def run_subprocess(args, method):
    cmd = [sys.executable, __file__, "--model", args.model, "--device", args.device, "--dtype", args.dtype,
           "--batch", str(args.batch), "--seq", str(args.seq), "--warmup", str(args.warmup),
           "--repeat", str(args.repeat), "--only", method]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"bench_step: {method} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows, methods):
    """Per method: step time, ratio to AdamW and the floor from the measured F and B (None
    where a needed row is missing)."""
    if any("time" not in rows.get(k, {}) for k in ("forward", "forward_backward")):
        return {}
    F = rows["forward"]["time"]
    B = rows["forward_backward"]["time"] - F
    adamw = rows.get("adamw", {}).get("time")
    out = {}
    for method in methods:
        if "time" not in rows.get(method, {}):  # not run yet, or failed
            continue
        r = rows[method]
        base, _, fraction = method.partition("@")
        nf, nb = FLOOR_PASSES.get(base, (2, 2))
        if fraction and base in FLOOR_PASSES and nf == 3:
            # d on a fraction f of the rows: with shared dropout masks (the default) the subset
            # needs its own forward at theta besides the target forward: 2f forwards for d
            nf = 2 + 2 * float(fraction)
        out[method] = {"step_ms": r["time"] * 1e3,
                       "ratio_to_adamw": r["time"] / adamw if adamw else None,
                       "floor": (nf * F + nb * B) / (F + B),
                       "peak_mib": None if r.get("peak_bytes") is None else r["peak_bytes"] / 2 ** 20}
    return out


def write_record(path, hw, args, rows, methods, complete):
    record = {"hardware": hw, "args": vars(args), "complete": complete, "torch": torch.__version__,
              "cuda": torch.version.cuda, "rows": rows, "table": table(rows, methods)}
    if all("time" in rows.get(k, {}) for k in ("forward", "forward_backward")):
        record["F"] = rows["forward"]["time"]
        record["B"] = rows["forward_backward"]["time"] - rows["forward"]["time"]
    record["n_params"] = next((r["n_params"] for r in rows.values() if "n_params" in r), None)
    record["errors"] = {m: r["error"] for m, r in rows.items() if "error" in r}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, path)


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
    ap.add_argument("--in-process", action="store_true",
                    help="run every method in this process (on CPU peak_bytes is then null)")
    ap.add_argument("--divergence-fractions", default="", help="also time each TRAM-d method with "
                    "TrainStep(divergence_fraction=f) for these f, e.g. 0.5,0.25 (rows 'method@f')")
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:
        print(json.dumps(run_one(args, args.only)))
        return
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    fractions = [f for f in args.divergence_fractions.split(",") if f and float(f) != 1.0]
    methods += [f"{m}@{f}" for m in methods if m.startswith("tram-") and m not in ("tram-fisher",)
                and not m.startswith("tram-released") for f in fractions]
    if unknown:
        sys.exit(f"bench_step: unknown method(s) {unknown}; choose from {METHODS}")
    hw = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    out_path = args.out or os.path.join(os.path.dirname(__file__), "results", f"step-{args.device}.json")
    rows = {}
    for method in ["forward", "forward_backward"] + methods:
        rows[method] = run_in_process(args, method) if args.in_process else run_subprocess(args, method)
        if "error" in rows[method]:
            print(f"  {method} FAILED: {rows[method]['error'][:300]}", file=sys.stderr)
        else:
            print(f"  measured {method}: {rows[method]['time'] * 1e3:.1f} ms", file=sys.stderr)
        write_record(out_path, hw, args, rows, methods, complete=False)
    failed = [m for m, r in rows.items() if "error" in r]
    write_record(out_path, hw, args, rows, methods, complete=not failed)
    if failed:
        sys.exit(f"bench_step: {', '.join(failed)} failed (see above); wrote {out_path}")
    F = rows["forward"]["time"]
    B = rows["forward_backward"]["time"] - F
    print(f"\nbench_step: model={args.model} dtype={args.dtype} batch={args.batch}x{args.seq} on {hw}")
    print(f"F = {F * 1e3:.1f} ms, B = {B * 1e3:.1f} ms")
    print(f"{'method':<18}{'step ms':>10}{'/ AdamW':>10}{'floor':>10}{'peak MiB':>11}")
    for method, r in table(rows, methods).items():
        ratio = float("nan") if r["ratio_to_adamw"] is None else r["ratio_to_adamw"]
        peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        print(f"{method:<18}{r['step_ms']:>10.1f}{ratio:>10.2f}{r['floor']:>10.2f}{peak:>11}")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
