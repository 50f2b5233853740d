"""One GPU check of tram_dist, run offline in under 8 minutes on one NVIDIA GPU (an H200).

    bash benchmarks/gpu_check.sh                      # full: CUDA, results in benchmarks/results/
    bash benchmarks/gpu_check.sh --smoke              # CPU plumbing check, tiny sizes, temp dir
    bash benchmarks/gpu_check.sh --only kernel_tests,bench_kernels --results-dir /tmp/gc

Parts, each a subprocess with its own timeout (its process group gets SIGINT when the time
is up, then SIGTERM, then SIGKILL), run in this order; a failed part does not stop the others, and the exit status is 1 if
any part failed or timed out:

  kernel_tests       pytest tests/kernels on CUDA: TRAM_KERNELS=triton, no TRITON_INTERPRET,
                     GPUs visible (tests/kernels/conftest.py adds a ``cuda`` device whenever
                     torch sees a GPU); the interpreted ``cpu`` cases are deselected
                     (-k "not cpu"). Fails unless some ``[cuda-...]`` test passed and none failed.
  fsdp1_tests        pytest tests/engines/test_engines_fsdp1.py (NCCL, one GPU per rank): as the
                     engine tests expect, the pytest process runs with its GPUs hidden (its
                     single-process reference is on CPU) and TRAM_TEST_CUDA_VISIBLE_DEVICES
                     names the GPUs its ranks get. Fails if every test was skipped.
  bench_kernels      benchmarks/bench_kernels.py --device cuda: fused ops as a fraction of the
                     copy bandwidth, and the unfused/fused speedup.
  bench_step_gpt2    benchmarks/bench_step.py, GPT-2 124M from benchmarks/configs/gpt2.json,
                     bf16, batch 8 x 1024 tokens, every method in one process.
  bench_step_gpt2xl  the same for GPT2-XL (benchmarks/configs/gpt2-xl.json, 1.56B), batch 4 x 1024.

Timeouts: every part has its own cap (kernel_tests 200 s, fsdp1_tests 120 s, bench_kernels
130 s, bench_step_gpt2 100 s, bench_step_gpt2xl 150 s), shortened where needed so that the
whole run fits in ``--budget`` (445 s) while every later part keeps its minimum (60, 45, 45,
40, 60 s): one hang costs its own part only, and the run ends in under 8 minutes.
bench_kernels gets ``--time-budget`` = its timeout less 30 s (no new size is started after
it; the sizes left out are listed as skipped).

Files in the results directory (``--results-dir``, else $GPU_CHECK_RESULTS, else
benchmarks/results/ for a full run and a fresh temporary directory for --smoke):
``gpu_check_<part>.json`` per part (status, seconds, timeout, command, the figures the part
produced), ``gpu_check_summary.json`` (hardware from nvidia-smi, torch / CUDA / triton
versions, every part's status), and under ``gpu_check_raw/`` the benchmarks' own JSON, the
pytest JUnit XML and each part's log. Every figure in them is one the part measured; a part
that failed or timed out has its status say so and carries only what was measured before.

--smoke runs every part on the CPU with tiny sizes (kernels through TRITON_INTERPRET=1, a
2-layer GPT-2 from benchmarks/configs/gpt2-tiny.json): it checks this script, not the GPU.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
DEFAULT_RESULTS = BENCH / "results"
FULL_BUDGET_S = 445  # every part's timeout fits in this; + at most 25 s of kill grace: < 8 minutes
SMOKE_BUDGET_S = 170
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error", "PYTHONUNBUFFERED": "1",
               "PYTHONDONTWRITEBYTECODE": "1"}


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------
# hardware and versions
# ------------------------------------------------------------------------------------------
def query_nvidia_smi(timeout: int = 30) -> Dict:
    """``nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv``, as printed and
    parsed; ``error`` when there is no nvidia-smi or it fails."""
    cmd = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return {"command": " ".join(cmd), "error": "nvidia-smi not found", "gpus": []}
    except subprocess.TimeoutExpired:
        return {"command": " ".join(cmd), "error": f"nvidia-smi did not answer in {timeout} s", "gpus": []}
    if out.returncode != 0:
        return {"command": " ".join(cmd), "error": (out.stderr or out.stdout).strip()[-500:] or
                f"exit status {out.returncode}", "gpus": []}
    lines = [line.strip() for line in out.stdout.strip().splitlines() if line.strip()]
    gpus = []
    for line in lines[1:]:  # the first line is the CSV header
        cells = [c.strip() for c in line.split(",")]
        if len(cells) >= 3:
            gpus.append({"name": cells[0], "memory_total": cells[1], "driver_version": cells[2]})
    return {"command": " ".join(cmd), "csv": lines, "gpus": gpus}


VERSIONS_CODE = r"""
import json, platform, sys
out = {"python": sys.version.split()[0], "platform": platform.platform()}
try:
    import torch
    out["torch"] = torch.__version__
    out["cuda"] = torch.version.cuda
    out["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        out["torch_device_name"] = torch.cuda.get_device_name(0)
        out["torch_device_count"] = torch.cuda.device_count()
        out["cudnn"] = torch.backends.cudnn.version()
except Exception as e:
    out["torch_error"] = repr(e)
from importlib import metadata  # installed versions, without importing the packages
for name, dists in (("triton", ("triton", "pytorch-triton")), ("transformers", ("transformers",)),
                    ("deepspeed", ("deepspeed",))):
    out[name] = None
    for dist in dists:
        try:
            out[name] = metadata.version(dist)
            break
        except metadata.PackageNotFoundError:
            pass
print(json.dumps(out))
"""


def query_versions(python: str, env: Dict[str, str], timeout: int = 120) -> Dict:
    try:
        out = subprocess.run([python, "-c", VERSIONS_CODE], capture_output=True, text=True,
                             timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"version query did not finish in {timeout} s"}
    if out.returncode != 0:
        return {"error": out.stderr.strip()[-1000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------
# parts
# ------------------------------------------------------------------------------------------
@dataclass
class Part:
    name: str
    cmd: List[str]
    cap_s: int                     # this part's own timeout at most
    min_s: int                     # what is kept in reserve for it while earlier parts run
    env: Dict[str, Optional[str]] = field(default_factory=dict)  # None: unset
    raw: Optional[str] = None      # the file the part writes (bench JSON / JUnit XML)
    analyze: Optional[Callable] = None  # (part, raw path, returncode, timed_out) -> (status, reason, result)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_part(part: Part, timeout: int, base_env: Dict[str, str], raw_dir: Path) -> Dict:
    env = dict(base_env)
    for k, v in part.env.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    log_path = raw_dir / f"{part.name}.log"
    raw = raw_dir / part.raw if part.raw else None
    if raw is not None and raw.exists():
        raw.unlink()  # an earlier run's file must never pass for this run's figures
    t0 = time.monotonic()
    status, returncode = None, None
    with open(log_path, "w") as log:
        log.write(f"$ {' '.join(part.cmd)}\n")
        log.flush()
        proc = subprocess.Popen(part.cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)  # its own process group: one kill ends all
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            status = "timeout"
            # SIGINT first: pytest then stops and still writes its JUnit XML (the counts so
            # far), the benchmarks stop (their JSON is rewritten after every case/method)
            for sig, grace in ((signal.SIGINT, 15), (signal.SIGTERM, 5)):
                _signal_group(proc.pid, sig)
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # whatever the part left behind in its process group (a rank, a background job) goes too
        _signal_group(proc.pid, signal.SIGKILL)
        returncode = proc.wait()
    seconds = time.monotonic() - t0
    try:
        a_status, reason, result = part.analyze(part, raw, returncode, status == "timeout")
    except Exception as e:  # a malformed output is the part's failure, not the driver's
        a_status, reason, result = "failed", f"could not read the part's output: {e!r}", {}
    if status == "timeout":
        reason = f"killed after its {timeout} s timeout" + (f"; {reason}" if reason else "")
    else:
        status = a_status
    tail = log_path.read_text(errors="replace").splitlines()[-40:]
    return {"status": status, "reason": reason, "returncode": returncode, "seconds": round(seconds, 2),
            "timeout_s": timeout, "command": part.cmd,
            "env": {k: v for k, v in part.env.items()},
            "log": os.path.relpath(log_path, raw_dir.parent),
            "raw": os.path.relpath(raw, raw_dir.parent) if raw else None,
            "result": result, "log_tail": tail if status != "passed" else []}


# --- pytest parts ---------------------------------------------------------------------------
def junit_counts(path: Path) -> Dict:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failed_ids, skipped_reasons, cuda_ran = [], {}, 0
    for suite in suites:
        for case in suite.iter("testcase"):
            counts["tests"] += 1
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            outcome = "passed"
            for child in case:
                if child.tag in ("failure", "error"):
                    outcome = "failed" if child.tag == "failure" else "errors"
                    break
                if child.tag == "skipped":
                    outcome = "skipped"
                    msg = (child.get("message") or "").strip()[:200]
                    skipped_reasons[msg] = skipped_reasons.get(msg, 0) + 1
            counts[outcome] += 1
            if outcome in ("failed", "errors"):
                failed_ids.append(name)
            # tests/kernels' device fixture comes first in every id: "[cuda-float32-...]";
            # "[cuda]" alone is also test_kernel_dispatch's TRAM_KERNELS="cuda" case, not a device
            if outcome == "passed" and "[cuda-" in name:
                cuda_ran += 1
    counts["cuda_passed"] = cuda_ran
    counts["failed_tests"] = failed_ids[:50]
    counts["skipped_reasons"] = skipped_reasons
    return counts


def analyze_pytest(require_cuda: bool, skipped_is_failure: bool):
    def analyze(part, raw, returncode, timed_out):
        if raw is None or not raw.exists():
            return "failed", f"pytest wrote no JUnit XML (exit status {returncode})", {}
        c = junit_counts(raw)
        if c["failed"] or c["errors"]:
            return "failed", f"{c['failed']} failed, {c['errors']} errors", c
        if returncode not in (0, None) and not timed_out:
            return "failed", f"pytest exit status {returncode}", c
        if c["passed"] == 0:
            if c["skipped"] and not skipped_is_failure:
                return "skipped", f"all {c['skipped']} tests skipped: {sorted(c['skipped_reasons'])}", c
            return "failed", (f"no test passed ({c['skipped']} skipped: {sorted(c['skipped_reasons'])})"
                              if c["skipped"] else "no test ran"), c
        if require_cuda and c["cuda_passed"] == 0:
            return "failed", "no [cuda-...] test ran: torch saw no GPU in the test process", c
        return "passed", None, c
    return analyze


# --- bench parts ------------------------------------------------------------------------------
def kernels_summary(data: Dict) -> Dict:
    """From bench_kernels' JSON: per (dtype, elements) the fused ops' fraction of the copy
    bandwidth and the unfused/fused speedups, and the README's GPU targets (>= 0.80 of copy
    from 1e8 elements, ascent speedup >= 3) checked on the measured rows."""
    cases: Dict[str, Dict] = {}
    for row in data.get("results", []):
        key = f"{row['dtype']}/g{row['grad_dtype']}/{row['elements']}"
        case = cases.setdefault(key, {"dtype": row["dtype"], "grad_dtype": row["grad_dtype"],
                                      "elements": row["elements"]})
        if row["variant"] == "speedup":
            case["speedup_ascent"] = row["ascent"]
            case["speedup_restore"] = row["restore"]
        else:
            case[f"{row['variant']}_fraction_of_copy"] = row["fraction_of_copy"]
            case[f"{row['variant']}_gbps"] = row["gbps"]
            case[f"{row['variant']}_ms"] = row["ms"]
    rows = list(cases.values())
    big = [c for c in rows if c["elements"] >= 10 ** 8 and "speedup_ascent" in c]
    targets = None
    if big:
        targets = {
            "rows_checked": len(big),
            "fused_ascent_of_copy_min": min(c["fused_ascent_fraction_of_copy"] for c in big),
            "fused_restore_of_copy_min": min(c["fused_restore_fraction_of_copy"] for c in big),
            "speedup_ascent_min": min(c["speedup_ascent"] for c in big),
        }
        targets["of_copy_ge_0.80"] = (targets["fused_ascent_of_copy_min"] >= 0.80
                                      and targets["fused_restore_of_copy_min"] >= 0.80)
        targets["speedup_ascent_ge_3"] = targets["speedup_ascent_min"] >= 3.0
    return {"device": data.get("device"), "backend": data.get("backend"), "complete": data.get("complete"),
            "cases": rows, "skipped": data.get("skipped", []), "targets_from_1e8": targets}


def analyze_bench_kernels(require_triton: bool):
    def analyze(part, raw, returncode, timed_out):
        if raw is None or not raw.exists():
            return "failed", f"bench_kernels wrote no JSON (exit status {returncode})", {}
        data = json.loads(raw.read_text())
        summary = kernels_summary(data)
        if not summary["cases"]:
            return "failed", "no case was measured", summary
        if require_triton and data.get("backend") != "triton":
            return "failed", f"kernels backend is {data.get('backend')!r}, not 'triton'", summary
        if returncode != 0 and not timed_out:
            return "failed", f"exit status {returncode}", summary
        return "passed", None, summary
    return analyze


def analyze_bench_step(require_cuda: bool):
    def analyze(part, raw, returncode, timed_out):
        if raw is None or not raw.exists():
            return "failed", f"bench_step wrote no JSON (exit status {returncode})", {}
        data = json.loads(raw.read_text())
        summary = {k: data.get(k) for k in ("hardware", "complete", "n_params", "F", "B", "table", "errors")}
        summary["F_ms"] = None if data.get("F") is None else data["F"] * 1e3
        summary["B_ms"] = None if data.get("B") is None else data["B"] * 1e3
        summary["args"] = {k: data.get("args", {}).get(k) for k in ("model", "device", "dtype", "batch", "seq",
                                                                   "warmup", "repeat", "in_process")}
        if data.get("errors"):
            return "failed", "methods failed: " + "; ".join(f"{m}: {e[:200]}" for m, e in data["errors"].items()), summary
        if returncode != 0 and not timed_out:
            return "failed", f"exit status {returncode}", summary
        if not data.get("complete") and not timed_out:
            return "failed", "bench_step stopped before the last method", summary
        if require_cuda and not str(data.get("args", {}).get("device", "")).startswith("cuda"):
            return "failed", "not measured on CUDA", summary
        return "passed", None, summary
    return analyze


# ------------------------------------------------------------------------------------------
# the plan
# ------------------------------------------------------------------------------------------
BUDGET_ARG = "{time-budget}"  # replaced by the part's timeout less 30 s when it starts
PART_NAMES = ["kernel_tests", "fsdp1_tests", "bench_kernels", "bench_step_gpt2", "bench_step_gpt2xl"]


def plan(python: str, smoke: bool, raw_dir: Path, gpus: str) -> List[Part]:
    pytest = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "console_output_style=classic"]
    bench_step = [python, str(BENCH / "bench_step.py"), "--in-process"]
    if smoke:
        cpu = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
        tiny = str(BENCH / "configs" / "gpt2-tiny.json")
        step_args = ["--device", "cpu", "--dtype", "fp32", "--batch", "2", "--seq", "16", "--warmup", "1",
                     "--repeat", "2", "--methods", "adamw,tram-theta-prev", "--divergence-fractions", "0.5"]
        return [
            Part("kernel_tests", pytest + ["tests/kernels/test_kernel_restore.py", "-k", "cpu and float32",
                                           "--junitxml", str(raw_dir / "kernel_tests.xml")],
                 60, 20, {**cpu, "TRAM_KERNELS": "triton", "TRITON_INTERPRET": "1"}, "kernel_tests.xml",
                 analyze_pytest(require_cuda=False, skipped_is_failure=True)),
            Part("fsdp1_tests", pytest + ["tests/engines/test_engines_fsdp1.py",
                                          "--junitxml", str(raw_dir / "fsdp1_tests.xml")],
                 60, 20, cpu, "fsdp1_tests.xml", analyze_pytest(require_cuda=False, skipped_is_failure=False)),
            Part("bench_kernels", [python, str(BENCH / "bench_kernels.py"), "--device", "cpu", "--sizes", "5000",
                                   "--dtypes", "fp32", "bf16", "--reps", "2",
                                   "--out", str(raw_dir / "bench_kernels.json")],
                 60, 20, {**cpu, "TRAM_KERNELS": "triton", "TRITON_INTERPRET": "1"}, "bench_kernels.json",
                 analyze_bench_kernels(require_triton=True)),
            Part("bench_step_gpt2", bench_step + ["--model", tiny, *step_args,
                                                  "--out", str(raw_dir / "bench_step_gpt2.json")],
                 60, 20, cpu, "bench_step_gpt2.json", analyze_bench_step(require_cuda=False)),
            Part("bench_step_gpt2xl", bench_step + ["--model", tiny, *step_args,
                                                    "--out", str(raw_dir / "bench_step_gpt2xl.json")],
                 60, 20, cpu, "bench_step_gpt2xl.json", analyze_bench_step(require_cuda=False)),
        ]
    gpu = {"CUDA_VISIBLE_DEVICES": gpus}
    return [
        # every [cuda-...] case of tests/kernels, compiled (no interpreter)
        Part("kernel_tests", pytest + ["tests/kernels", "-k", "not cpu", "--maxfail=50",
                                       "--junitxml", str(raw_dir / "kernel_tests.xml")],
             200, 60, {**gpu, "TRAM_KERNELS": "triton", "TRITON_INTERPRET": None}, "kernel_tests.xml",
             analyze_pytest(require_cuda=True, skipped_is_failure=True)),
        Part("fsdp1_tests", pytest + ["tests/engines/test_engines_fsdp1.py",
                                      "--junitxml", str(raw_dir / "fsdp1_tests.xml")],
             120, 45, {"CUDA_VISIBLE_DEVICES": "", "TRAM_TEST_CUDA_VISIBLE_DEVICES": gpus,
                       "TRITON_INTERPRET": None},
             "fsdp1_tests.xml", analyze_pytest(require_cuda=False, skipped_is_failure=True)),
        # default sizes (1e6 .. 1e9 and the GPT-2 / GPT2-XL slices), fp32 / bf16 / fp16
        Part("bench_kernels", [python, str(BENCH / "bench_kernels.py"), "--device", "cuda",
                               "--time-budget", BUDGET_ARG, "--out", str(raw_dir / "bench_kernels.json")],
             130, 45, {**gpu, "TRAM_KERNELS": "triton", "TRITON_INTERPRET": None}, "bench_kernels.json",
             analyze_bench_kernels(require_triton=True)),
        Part("bench_step_gpt2", bench_step + ["--model", str(BENCH / "configs" / "gpt2.json"), "--device", "cuda",
                                              "--dtype", "bf16", "--batch", "8", "--seq", "1024",
                                              "--warmup", "2", "--repeat", "5",
                                              "--methods", "adamw,sam,asam,fsam,tram-x,tram-theta-prev,"
                                              "tram-theta0,tram-fisher",
                                              "--divergence-fractions", "0.5,0.25",
                                              "--out", str(raw_dir / "bench_step_gpt2.json")],
             100, 40, {**gpu, "TRITON_INTERPRET": None}, "bench_step_gpt2.json",
             analyze_bench_step(require_cuda=True)),
        Part("bench_step_gpt2xl", bench_step + ["--model", str(BENCH / "configs" / "gpt2-xl.json"),
                                                "--device", "cuda", "--dtype", "bf16", "--batch", "4",
                                                "--seq", "1024", "--warmup", "2", "--repeat", "5",
                                                "--out", str(raw_dir / "bench_step_gpt2xl.json")],
             150, 60, {**gpu, "TRITON_INTERPRET": None}, "bench_step_gpt2xl.json",
             analyze_bench_step(require_cuda=True)),
    ]


def visible_gpus(smi: Dict) -> str:
    """The CUDA_VISIBLE_DEVICES the GPU parts get: the caller's, else every GPU nvidia-smi lists."""
    current = os.environ.get("CUDA_VISIBLE_DEVICES")
    if current:
        return current
    n = len(smi.get("gpus", []))
    return ",".join(str(i) for i in range(n)) if n else "0"


def write_json(path: Path, data: Dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=True))
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: checks this script, not the GPU")
    ap.add_argument("--results-dir", default=None,
                    help="where the JSON goes (default $GPU_CHECK_RESULTS, else benchmarks/results/, "
                         "or a new temporary directory with --smoke)")
    ap.add_argument("--only", default=None, help=f"comma-separated parts of {PART_NAMES}")
    ap.add_argument("--budget", type=int, default=None,
                    help=f"seconds for the whole run (default {FULL_BUDGET_S}; {SMOKE_BUDGET_S} with --smoke)")
    ap.add_argument("--python", default=sys.executable, help="the interpreter the parts run with")
    args = ap.parse_args(argv)

    t_start = time.monotonic()
    started = now_iso()
    mode = "smoke" if args.smoke else "full"
    results = args.results_dir or os.environ.get("GPU_CHECK_RESULTS")
    if results:
        results_dir = Path(results).resolve()
    elif args.smoke:
        results_dir = Path(tempfile.mkdtemp(prefix="gpu_check_smoke_"))
    else:
        results_dir = DEFAULT_RESULTS
    if args.smoke and results_dir == DEFAULT_RESULTS.resolve():
        print("gpu_check: --smoke does not write into benchmarks/results/ (CPU figures are no GPU "
              "result); give another --results-dir", file=sys.stderr)
        return 2
    raw_dir = results_dir / "gpu_check_raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    only = PART_NAMES if not args.only else [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in only if p not in PART_NAMES]
    if unknown:
        print(f"gpu_check: unknown part(s) {unknown}; choose from {PART_NAMES}", file=sys.stderr)
        return 2
    budget = args.budget or (SMOKE_BUDGET_S if args.smoke else FULL_BUDGET_S)
    deadline = t_start + budget

    # tram_dist must be installed (pip install -e .: kernels/ becomes tram_dist.kernels); the
    # repository root is not put on the path (a top-level `kernels` would shadow HF's package)
    base_env = dict(os.environ)
    base_env.update(OFFLINE_ENV)

    print(f"gpu_check ({mode}): results in {results_dir}", flush=True)
    smi = query_nvidia_smi()
    gpus = "" if args.smoke else visible_gpus(smi)
    version_env = dict(base_env)
    if not args.smoke:
        version_env["CUDA_VISIBLE_DEVICES"] = gpus
    else:
        version_env["CUDA_VISIBLE_DEVICES"] = ""
    versions = query_versions(args.python, version_env)
    hardware = {"nvidia_smi": smi,
                "gpu": smi["gpus"][0]["name"] if smi.get("gpus") else None,
                "torch_device_name": versions.get("torch_device_name"),
                "cpu_count": os.cpu_count()}
    print(f"  hardware: {hardware['gpu'] or smi.get('error')}; torch {versions.get('torch')}, "
          f"cuda {versions.get('cuda')}, triton {versions.get('triton')}", flush=True)

    no_gpu = None
    if not args.smoke and not versions.get("cuda_available"):
        no_gpu = (f"torch in {args.python} sees no CUDA GPU (torch {versions.get('torch')}, cuda "
                  f"{versions.get('cuda')}, CUDA_VISIBLE_DEVICES={gpus!r}"
                  + (f", nvidia-smi: {smi['error']}" if smi.get("error") else "")
                  + "); nothing was run")
        print(f"  {no_gpu}", flush=True)

    parts = [p for p in plan(args.python, args.smoke, raw_dir, gpus) if p.name in only]
    statuses = {}
    for i, part in enumerate(parts):
        reserve = sum(p.min_s for p in parts[i + 1:])
        left = deadline - time.monotonic()
        timeout = int(max(min(part.min_s, left), min(part.cap_s, left - reserve)))
        if no_gpu:
            record = {"status": "failed", "reason": no_gpu, "returncode": None, "seconds": 0.0,
                      "timeout_s": timeout, "command": part.cmd, "result": {}}
        elif timeout < 5:
            record = {"status": "timeout", "reason": "no time left in the run's budget", "returncode": None,
                      "seconds": 0.0, "timeout_s": max(timeout, 0), "command": part.cmd, "result": {}}
        else:
            # bench_kernels starts no new size once its timeout less 30 s is spent
            part.cmd = [str(max(10, timeout - 30)) if c == BUDGET_ARG else c for c in part.cmd]
            print(f"  {part.name}: running (timeout {timeout} s)", flush=True)
            record = run_part(part, timeout, base_env, raw_dir)
        record = {"check": "gpu_check", "part": part.name, "mode": mode, "started": started,
                  "hardware": {"gpu": hardware["gpu"], "driver_version":
                               smi["gpus"][0]["driver_version"] if smi.get("gpus") else None,
                               "torch_device_name": hardware["torch_device_name"]},
                  **record}
        write_json(results_dir / f"gpu_check_{part.name}.json", record)
        statuses[part.name] = {k: record.get(k) for k in ("status", "reason", "seconds", "timeout_s")}
        print(f"  {part.name}: {record['status']} in {record['seconds']:.0f} s"
              + (f" ({record['reason']})" if record.get("reason") else ""), flush=True)

    ok = all(s["status"] in ("passed",) or (args.smoke and s["status"] == "skipped")
             for s in statuses.values())
    summary = {"check": "gpu_check", "mode": mode, "ok": ok, "started": started, "finished": now_iso(),
               "seconds": round(time.monotonic() - t_start, 2), "budget_s": budget,
               "results_dir": str(results_dir), "hardware": hardware, "versions": versions,
               "parts": statuses,
               "files": {name: f"gpu_check_{name}.json" for name in statuses}}
    write_json(results_dir / "gpu_check_summary.json", summary)
    failed = [n for n, s in statuses.items() if s["status"] not in ("passed", "skipped")
              or (not args.smoke and s["status"] == "skipped")]
    print(f"gpu_check ({mode}): {'all parts passed' if ok else 'FAILED: ' + ', '.join(failed)} "
          f"in {summary['seconds']:.0f} s; summary {results_dir / 'gpu_check_summary.json'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
