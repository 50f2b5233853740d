"""benchmarks/gpu_check.sh: its CPU smoke run writes every JSON file it promises, with the
fields present and the numbers finite; a failing or hanging part is recorded and the run goes
on and exits non-zero. (The full run needs an NVIDIA GPU; this checks the script.)"""
from __future__ import annotations

import importlib.util
import shutil
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
PARTS = ["kernel_tests", "fsdp1_tests", "bench_kernels", "bench_step_gpt2", "bench_step_gpt2xl"]


def _load_driver():
    """benchmarks/gpu_check.py as a module (registered in sys.modules: its dataclass needs it)."""
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


def _numbers(node, path=""):
    """Every int/float leaf of a JSON value, with its path."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield path, node


def _finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check_smoke")
    results = ROOT / "benchmarks" / "results"
    before = sorted(p.name for p in results.iterdir()) if results.is_dir() else []
    env = {k: v for k, v in os.environ.items() if k not in ("TRAM_KERNELS", "TRITON_INTERPRET")}
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT), "--smoke"], env={**env, "GPU_CHECK_RESULTS": str(out)},
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    seconds = time.monotonic() - t0
    after = sorted(p.name for p in results.iterdir()) if results.is_dir() else []
    return {"dir": out, "proc": proc, "seconds": seconds, "results_untouched": before == after}


def _load(smoke, name):
    path = smoke["dir"] / f"gpu_check_{name}.json"
    assert path.is_file(), f"{path} missing; stdout:\n{smoke['proc'].stdout}\nstderr:\n{smoke['proc'].stderr}"
    data = json.loads(path.read_text())
    bad = [(p, v) for p, v in _numbers(data) if not math.isfinite(v)]
    assert not bad, f"{name}: non-finite numbers {bad[:5]}"
    return data


def test_smoke_run_passes_and_stays_out_of_benchmarks_results(smoke):
    proc = smoke["proc"]
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert smoke["results_untouched"], "the smoke run wrote into benchmarks/results/"
    assert "gpu_check (smoke): all parts passed" in proc.stdout


def test_summary_fields(smoke):
    s = _load(smoke, "summary")
    assert s["check"] == "gpu_check" and s["mode"] == "smoke" and s["ok"] is True
    assert _finite_number(s["seconds"]) and s["seconds"] > 0
    smi = s["hardware"]["nvidia_smi"]
    assert smi["command"] == "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv"
    assert "gpus" in smi and ("csv" in smi or "error" in smi)
    v = s["versions"]
    for key in ("python", "torch", "cuda", "triton", "transformers"):
        assert key in v, key
    assert isinstance(v["torch"], str) and v["torch"]
    assert list(s["parts"]) == PARTS
    for name, part in s["parts"].items():
        assert part["status"] in ("passed", "skipped"), (name, part)
        assert _finite_number(part["seconds"]) and _finite_number(part["timeout_s"]), name
        assert (smoke["dir"] / s["files"][name]).is_file()


def test_every_part_file_has_its_fields(smoke):
    for name in PARTS:
        d = _load(smoke, name)
        assert d["part"] == name and d["mode"] == "smoke" and d["status"] in ("passed", "skipped")
        assert isinstance(d["command"], list) and d["command"]
        assert _finite_number(d["seconds"]) and d["timeout_s"] > 0 and d["returncode"] == 0
        assert "gpu" in d["hardware"]
        assert (smoke["dir"] / d["log"]).is_file(), name


def test_kernel_tests_part(smoke):
    r = _load(smoke, "kernel_tests")["result"]
    assert r["passed"] > 0 and r["failed"] == 0 and r["errors"] == 0
    # without a GPU the FSDP1 tests skip (FSDP1 refuses CPU); the smoke run says so
    f = _load(smoke, "fsdp1_tests")
    assert f["status"] == "skipped" or f["result"]["passed"] > 0
    assert f["result"]["tests"] > 0


def test_bench_kernels_part(smoke):
    d = _load(smoke, "bench_kernels")
    r = d["result"]
    assert r["backend"] == "triton" and r["complete"] is True  # the interpreter ran the kernels
    assert r["cases"], r
    for case in r["cases"]:
        for key in ("fused_ascent_fraction_of_copy", "fused_restore_fraction_of_copy", "speedup_ascent",
                    "speedup_restore", "copy_gbps", "fused_ascent_ms"):
            assert _finite_number(case[key]) and case[key] > 0, (key, case)
    raw = json.loads((smoke["dir"] / d["raw"]).read_text())
    assert raw["env"] == {"TRAM_KERNELS": "triton", "TRITON_INTERPRET": "1"}


@pytest.mark.parametrize("name", ["bench_step_gpt2", "bench_step_gpt2xl"])
def test_bench_step_parts(smoke, name):
    r = _load(smoke, name)["result"]
    assert r["complete"] is True and r["args"]["model"].endswith("benchmarks/configs/gpt2-tiny.json")
    assert r["args"]["in_process"] is True and r["n_params"] > 0
    assert _finite_number(r["F_ms"]) and r["F_ms"] > 0
    assert set(r["table"]) == {"adamw", "tram-theta-prev", "tram-theta-prev@0.5"}  # d on half the rows
    for method, row in r["table"].items():
        for key in ("step_ms", "ratio_to_adamw", "floor"):
            assert _finite_number(row[key]) and row[key] > 0, (method, key, row)
        assert row["peak_mib"] is None  # CPU in one process: no per-method peak, none invented


def test_smoke_refuses_benchmarks_results():
    proc = subprocess.run(["bash", str(SCRIPT), "--smoke", "--results-dir", str(ROOT / "benchmarks" / "results")],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and "does not write into benchmarks/results/" in proc.stderr


def test_failed_and_hung_parts_are_recorded(tmp_path):
    """run_part: a failing command is 'failed' with its exit status, a hanging one is killed at
    its timeout (its whole process group) and 'timeout'; neither raises."""
    gc = _load_driver()
    raw = tmp_path / "gpu_check_raw"
    raw.mkdir()

    def analyze(part, path, returncode, timed_out):
        return ("passed", None, {}) if returncode == 0 else ("failed", f"exit status {returncode}", {})

    env = dict(os.environ)
    stale = raw / "boom.json"
    stale.write_text('{"an": "earlier run"}')
    failed = gc.run_part(gc.Part("boom", [sys.executable, "-c", "import sys; print('x'); sys.exit(3)"], 30, 5,
                                 raw="boom.json", analyze=analyze), 30, env, raw)
    assert failed["status"] == "failed" and failed["returncode"] == 3 and "exit status 3" in failed["reason"]
    assert not stale.exists()  # an earlier run's output never stands in for this run's
    assert failed["log_tail"][-1] == "x"
    t0 = time.monotonic()
    pid_file = tmp_path / "bg.pid"
    hung = gc.run_part(gc.Part("hang", ["bash", "-c", f"sleep 120 & echo $! > {pid_file}; sleep 120; wait"],
                               30, 5, analyze=analyze), 2, env, raw)
    assert time.monotonic() - t0 < 30
    assert hung["status"] == "timeout" and "2 s timeout" in hung["reason"]
    bg = int(pid_file.read_text())  # a background job ignores SIGINT: the group's SIGKILL ends it
    for _ in range(50):
        if not Path(f"/proc/{bg}").exists() or "Z" in Path(f"/proc/{bg}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"background process {bg} of the timed-out part still runs")


def test_junit_counts_and_analysis(tmp_path):
    gc = _load_driver()
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="4">'
        '<testcase classname="t" name="test_a[cuda-float32]"/>'
        '<testcase classname="t" name="test_b[cpu]"/>'
        '<testcase classname="t" name="test_c"><skipped message="no GPU"/></testcase>'
        '<testcase classname="t" name="test_d[cuda]"><failure message="boom"/></testcase>'
        '</testsuite></testsuites>')
    c = gc.junit_counts(xml)
    assert (c["tests"], c["passed"], c["failed"], c["skipped"], c["cuda_passed"]) == (4, 2, 1, 1, 1)
    assert c["failed_tests"] == ["t::test_d[cuda]"]
    status, reason, _ = gc.analyze_pytest(True, True)(None, xml, 1, False)
    assert status == "failed" and "1 failed" in reason
    xml.write_text('<testsuites><testsuite><testcase classname="t" name="test_e">'
                   '<skipped message="FSDP1 needs CUDA"/></testcase></testsuite></testsuites>')
    assert gc.analyze_pytest(False, True)(None, xml, 0, False)[0] == "failed"   # full run: skip = fail
    assert gc.analyze_pytest(False, False)(None, xml, 0, False)[0] == "skipped"  # smoke: reported
    xml.write_text('<testsuites><testsuite><testcase classname="t" name="test_f[cpu]"/>'
                   '</testsuite></testsuites>')
    status, reason, _ = gc.analyze_pytest(True, True)(None, xml, 0, False)
    assert status == "failed" and "no [cuda-...] test ran" in reason
    # test_kernel_dispatch's TRAM_KERNELS="cuda" case is no CUDA test
    xml.write_text('<testsuites><testsuite><testcase classname="t" name="test_invalid_value[cuda]"/>'
                   '</testsuite></testsuites>')
    assert gc.analyze_pytest(True, True)(None, xml, 0, False)[0] == "failed"


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine: the full run would run")
def test_full_run_without_gpu_fails_fast_with_every_part_recorded(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "--results-dir", str(tmp_path)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "gpu_check_summary.json").read_text())
    assert summary["mode"] == "full" and summary["ok"] is False and list(summary["parts"]) == PARTS
    for name in PARTS:
        part = json.loads((tmp_path / f"gpu_check_{name}.json").read_text())
        assert part["status"] == "failed" and "sees no CUDA GPU" in part["reason"], part
        assert part["result"] == {}  # nothing measured, nothing written
