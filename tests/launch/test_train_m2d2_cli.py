"""launch/train_m2d2.py end to end on the tiny preset (single process), and exact resume."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "train_m2d2.py"
SMALL = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--batch-size", "4", "--block-size", "64",
         "--eval-batch-size", "32", "--warmup-steps", "1"]


def run(args, tmp_path):
    # one thread: on a shared 2-core machine two torch threads run up to 20x slower under contention
    env = {**os.environ, "TRAM_DIST_CACHE": str(tmp_path / "cache"), "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *SMALL, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tiny_run_writes_every_output_and_resumes_exactly(tmp_path):
    a = tmp_path / "a"
    r = run(["--method", "tram-x", "--max-steps", "4", "--eval-interval", "2", "--save-interval", "2",
             "--keep-checkpoints", "2", "--output-dir", str(a)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = metrics(a)
    assert [m["step"] for m in rows] == [1, 2, 3, 4]
    for key in ("loss", "perturbed_loss", "divergence", "grad_norm", "eps_norm", "lr",
                "tokens_per_s", "step_time_s", "peak_mem_mb"):
        assert rows[-1][key] is not None, key
    ev = json.loads((a / "eval.json").read_text())
    assert ev["train_domain"] == "math" and list(ev["domains"])[0] == "math"
    assert len(ev["domains"]) == 6 and ev["method"] == "tram-x"
    assert ev["zs_avg"] == pytest.approx(sum(v for k, v in ev["domains"].items() if k != "math") / 5)
    assert (a / "eval.md").read_text().startswith("# tiny on math")
    assert len((a / "evals.jsonl").read_text().splitlines()) == 2  # steps 2 and 4
    assert "eval step 2: math valid ppl" in r.stderr + r.stdout
    assert sorted(p.name for p in a.glob("checkpoint-*")) == ["checkpoint-00000002", "checkpoint-00000004"]
    assert "method: tram-x" in (a / "config.yaml").read_text()
    assert (a / "final" / "model.safetensors").is_file() and (a / "final" / "tokenizer.json").is_file()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(a / "final")
    assert AutoTokenizer.from_pretrained(a / "final").eos_token == "<|endoftext|>"

    # resume from step 2 elsewhere: steps 3 and 4 repeat bit for bit (data, noise, dropout, lr)
    b = tmp_path / "b"
    r = run(["--method", "tram-x", "--max-steps", "4", "--eval-interval", "2",
             "--resume", str(a / "checkpoint-00000002"), "--output-dir", str(b)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    again = metrics(b)
    assert [m["step"] for m in again] == [3, 4]
    for x, y in zip(rows[2:], again):
        for key in ("loss", "perturbed_loss", "divergence", "lr"):
            assert x[key] == y[key], (key, x[key], y[key])
