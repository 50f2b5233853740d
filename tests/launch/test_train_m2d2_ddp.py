"""launch/train_m2d2.py under torchrun with 2 gloo ranks (DDP): evaluation equals the single
process exactly, and a DDP training run with accumulation writes its outputs once."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "train_m2d2.py"
SMALL = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--batch-size", "4", "--block-size", "64",
         "--eval-batch-size", "8", "--warmup-steps", "1", "--eval-domains", "math", "art"]


def launch(args, tmp_path, nproc=None):
    env = {**os.environ, "TRAM_DIST_CACHE": str(tmp_path / "cache"), "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1"}
    prefix = [sys.executable]
    if nproc:
        prefix += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    r = subprocess.run([*prefix, str(SCRIPT), *SMALL, *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_ddp_eval_matches_single_process_and_trains(tmp_path):
    launch(["--max-steps", "0", "--output-dir", str(tmp_path / "one")], tmp_path)
    launch(["--max-steps", "0", "--output-dir", str(tmp_path / "two")], tmp_path, nproc=2)
    one = json.loads((tmp_path / "one" / "eval.json").read_text())
    two = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert one["method"] == "zero-shot"
    for name in ("math", "art"):
        assert two["domains"][name] == pytest.approx(one["domains"][name], rel=1e-6)

    out = tmp_path / "ddp"
    r = launch(["--max-steps", "2", "--micro-batch-size", "1", "--save-interval", "2",
                "--output-dir", str(out)], tmp_path, nproc=2)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == [1, 2]  # rank 0 only
    cfg = (out / "config.yaml").read_text()
    assert "engine: ddp" in cfg and "world_size: 2" in cfg and "grad_accum: 2" in cfg
    assert (out / "checkpoint-00000002" / "rng_rank1.pt").is_file()
    assert (out / "final" / "model.safetensors").is_file()
    assert (r.stdout + r.stderr).count("done: ") == 1  # one summary line: rank 0 only
