"""Fused TRAM kernels against the unfused torch chain and a device-to-device copy.

For each size and dtype, in one run: a copy (the bandwidth ceiling), the fused ascent
(``sum_sq`` + ``perturb_`` with backup), the unfused ascent a straightforward implementation
runs (clone, abs*grad, norm, pow, mul, mul, add_), the fused ``restore_`` and the unfused one
(``copy_``). Prints milliseconds, GB/s over the bytes each variant must move, the fraction of
the copy's GB/s, and the unfused/fused speedup; writes everything as JSON.

  python benchmarks/bench_kernels.py                                  # CUDA: 1e6 .. 1e9 elements
  python benchmarks/bench_kernels.py --device cpu --max-size 1e7      # torch path, ~1 minute
  python benchmarks/bench_kernels.py --sizes 1e8 --dtypes bf16 --out /tmp/k.json

CUDA timings: ``triton.testing.do_bench`` (median of repeats, L2 flushed between them).
CPU timings: median of ``--reps`` wall-clock runs; on CPU the "fused" ops are the torch
reference (TRAM_KERNELS=auto), so the CPU figures check the script, not the kernels.
See benchmarks/README.md for the byte counts and the GPU targets.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

import tram_dist.kernels as K

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GPT2 = 124_439_808       # GPT-2 small parameters
GPT2_XL = 1_557_611_200  # GPT2-XL parameters
SHARDS = (8, 4, 1)       # per-rank slices under ZeRO/FSDP on 8, 4 and 1 ranks
RHO = 0.05


def default_sizes():
    sizes = {10 ** 6, 10 ** 7, 10 ** 8, 10 ** 9}
    sizes.update(total // s for total in (GPT2, GPT2_XL) for s in SHARDS)
    return sorted(sizes)


def parse_size(text: str) -> int:
    return int(float(text))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def timer(device: torch.device, reps: int):
    """fn -> median milliseconds."""
    if device.type == "cuda":
        import triton.testing

        def bench(fn):
            fn()
            torch.cuda.synchronize(device)
            return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
        return bench

    def bench(fn):
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return bench


def peak_extra(device: torch.device, fn) -> int | None:
    """Bytes a call allocates on top of what is live (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


# Bytes each variant must move for n elements (p: param bytes, g: grad bytes, pg: bytes of the
# promoted dtype of p * g, the dtype of the unfused chain's temporaries). Floors for the fused
# ops; for the unfused chain, what its kernels read and write.
def bytes_copy(n, p, g, pg):
    return 2 * n * p                        # read src, write dst


def bytes_fused_ascent(n, p, g, pg):
    return n * (p + g) + n * (p + g) + 2 * n * p  # sum_sq reads (theta, g); perturb_ reads
    #                                               (theta, g), writes (theta, backup)


def bytes_unfused_ascent(n, p, g, pg):
    return n * (2 * p                 # old_p = p.clone()
                + 2 * p               # t = p.abs()
                + p + g + pg          # t * g
                + pg                  # .norm()
                + 2 * p               # torch.pow(p, 2)
                + p + g + pg          # * g
                + 2 * pg              # * scale
                + p + pg + p)         # p.add_(e_w)


def bytes_restore(n, p, g, pg):
    return 2 * n * p                        # read backup, write params


def run_case(n, dtype, grad_dtype, rule, device, bench):
    torch.manual_seed(0)
    p = (torch.randn(n, device=device) * 0.02).to(dtype)
    g = (torch.randn(n, device=device) * 1e-3).to(grad_dtype)
    b = torch.empty_like(p)
    sp, sg = p.element_size(), g.element_size()
    spg = torch.promote_types(dtype, grad_dtype).itemsize
    params, grads, backups = [p], [g], [b]

    def copy():
        b.copy_(p)

    def fused_ascent():
        s = K.sum_sq(params, grads, rule=rule)
        scale = RHO / (s.sqrt() + 1e-12)  # stays on the device: no host sync
        K.perturb_(params, grads, scale=scale, rule=rule, backups=backups)

    def fused_restore():
        K.restore_(params, backups)

    state = {}

    def unfused_ascent():  # as a straightforward ASAM implementation writes it
        state["old_p"] = p.clone()
        grad_norm = (torch.abs(p) * g).norm(p=2)
        scale = RHO / (grad_norm + 1e-12)
        e_w = torch.pow(p, 2) * g * scale.to(p)
        p.add_(e_w)

    def unfused_restore():
        p.copy_(state["old_p"])

    unfused_ascent()  # creates old_p for unfused_restore
    variants = [("copy", copy, bytes_copy),
                ("fused_ascent", fused_ascent, bytes_fused_ascent),
                ("unfused_ascent", unfused_ascent, bytes_unfused_ascent),
                ("fused_restore", fused_restore, bytes_restore),
                ("unfused_restore", unfused_restore, bytes_restore)]
    rows = {}
    for name, fn, nbytes in variants:
        ms = bench(fn)
        moved = nbytes(n, sp, sg, spg)
        rows[name] = dict(ms=ms, bytes=moved, gbps=moved / ms / 1e6,
                          peak_extra_bytes=peak_extra(device, fn))
    copy_gbps = rows["copy"]["gbps"]
    for row in rows.values():
        row["fraction_of_copy"] = row["gbps"] / copy_gbps
    speedup = {"ascent": rows["unfused_ascent"]["ms"] / rows["fused_ascent"]["ms"],
               "restore": rows["unfused_restore"]["ms"] / rows["fused_restore"]["ms"]}
    del p, g, b, state
    return rows, speedup


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", type=parse_size, nargs="*", default=None,
                    help="element counts (default: 1e6..1e9 and GPT-2 / GPT2-XL over 8, 4, 1 shards)")
    ap.add_argument("--max-size", type=parse_size, default=10 ** 9, help="skip larger sizes")
    ap.add_argument("--dtypes", nargs="*", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--grads", default="param", choices=["param", "fp32"],
                    help="grad dtype: the param dtype, or fp32")
    ap.add_argument("--rule", default="adaptive", choices=list(K.RULES))
    ap.add_argument("--reps", type=int, default=5, help="CPU repeats (CUDA uses do_bench)")
    ap.add_argument("--out", default=None,
                    help="JSON path (default benchmarks/results/kernels-<device>.json)")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds: start no new size after this (the rest is listed as skipped)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    device = torch.device(args.device)
    name = device_name(device)
    backend = K.backend(device)
    sizes = [s for s in (args.sizes or default_sizes()) if s <= args.max_size]
    slug = "cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    out = Path(args.out or Path(__file__).parent / "results" / f"kernels-{slug}.json")
    bench = timer(device, args.reps)

    print(f"device: {name} ({device}); kernels: {backend}; torch {torch.__version__}"
          + (f"; triton {__import__('triton').__version__}" if backend == "triton" else ""))
    if device.type == "cpu":
        what = "Triton's interpreter" if backend == "triton" else "the torch reference"
        print(f"note: on CPU the fused ops are {what}; these figures check the script, not the kernels")
    head = (f"{'elements':>13} {'dtype':>9} {'variant':>16} {'ms':>10} {'GB/s':>9} "
            f"{'of copy':>8} {'extra MB':>9}")
    results, skipped = [], []

    def write(complete):
        out.parent.mkdir(parents=True, exist_ok=True)
        record = dict(device=name, device_type=device.type, backend=backend, rule=args.rule,
                      torch=torch.__version__, cuda=torch.version.cuda, python=sys.version.split()[0],
                      timer="triton.testing.do_bench median" if device.type == "cuda"
                      else f"median of {args.reps} perf_counter runs",
                      env={k: os.environ[k] for k in ("TRAM_KERNELS", "TRITON_INTERPRET") if k in os.environ},
                      complete=complete, results=results, skipped=skipped)
        if backend == "triton":
            record["triton"] = __import__("triton").__version__
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, out)  # rewritten after every case: a run cut short keeps what it measured

    for dname in args.dtypes:
        dtype = DTYPES[dname]
        gdtype = dtype if args.grads == "param" else torch.float32
        label = dname if args.grads == "param" else f"{dname}/g32"
        for n in sizes:
            elt = max(dtype.itemsize, torch.promote_types(dtype, gdtype).itemsize)
            need = n * (3 * dtype.itemsize + gdtype.itemsize + 3 * elt)  # p, b, old_p, g, temps
            if need > 0.9 * free_bytes(device):
                skipped.append(dict(elements=n, dtype=label, need_bytes=need, reason="memory"))
                print(f"skip {n} {label}: needs ~{need / 2**30:.1f} GiB")
                continue
            if args.time_budget is not None and time.perf_counter() - t_start > args.time_budget:
                skipped.append(dict(elements=n, dtype=label, reason="time budget"))
                print(f"skip {n} {label}: --time-budget {args.time_budget:g} s spent")
                continue
            rows, speedup = run_case(n, dtype, gdtype, args.rule, device, bench)
            print(head)
            for variant, r in rows.items():
                extra = "" if r["peak_extra_bytes"] is None else f"{r['peak_extra_bytes'] / 2**20:9.1f}"
                print(f"{n:>13,} {label:>9} {variant:>16} {r['ms']:>10.3f} {r['gbps']:>9.1f} "
                      f"{r['fraction_of_copy']:>8.2f} {extra:>9}")
                results.append(dict(elements=n, dtype=dname, grad_dtype=str(gdtype).split(".")[-1],
                                    variant=variant, **r))
            print(f"{'':>13} {'':>9} speedup unfused/fused: ascent {speedup['ascent']:.2f}x, "
                  f"restore {speedup['restore']:.2f}x")
            results.append(dict(elements=n, dtype=dname, grad_dtype=str(gdtype).split(".")[-1],
                                variant="speedup", ascent=speedup["ascent"],
                                restore=speedup["restore"]))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            write(complete=False)

    write(complete=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
