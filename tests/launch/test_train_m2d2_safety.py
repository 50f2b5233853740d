"""Nothing lost, nothing corrupt: diverging runs stop, used folders are refused, broken
checkpoints are skipped, changed settings are refused on resume, logs are not repeated.
Each test failed on the launcher before these checks existed."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("train_m2d2_safety", ROOT / "launch" / "train_m2d2.py")
train_m2d2 = importlib.util.module_from_spec(spec)
sys.modules["train_m2d2_safety"] = train_m2d2
spec.loader.exec_module(train_m2d2)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _args(tmp_path, *extra, steps=4):
    return ["--max-steps", str(steps), "--batch-size", "2", "--block-size", "32", "--eval-domains", "math",
            "--method", "sam", "--lr", "1e-3", "--save-interval", "1", "--keep-checkpoints", "3",
            "--output-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), *extra]


def _exit(argv, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train_m2d2.main(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert err.startswith("error: ") and "Traceback" not in err, err
    return e.value.code, err


def _steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_a_diverging_run_stops_and_exports_nothing(tmp_path, capsys):
    code, err = _exit(_args(tmp_path, "--lr", "inf"), capsys)
    assert code == 3 and "NaN or infinite" in err and "nothing was exported" in err, err
    out = tmp_path / "out"
    assert not (out / "final").exists() and not list(out.glob("checkpoint-*"))  # none holds NaN


def test_a_used_output_dir_is_refused_unless_overwrite(tmp_path, capsys):
    train_m2d2.main(_args(tmp_path))
    code, err = _exit(_args(tmp_path, steps=2), capsys)
    assert code == 2 and "already holds a run" in err and "--overwrite" in err
    train_m2d2.main(_args(tmp_path, "--overwrite", steps=2))
    out = tmp_path / "out"
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-00000001", "checkpoint-00000002"]
    assert _steps(out / "metrics.jsonl") == [1, 2]


def test_resume_skips_broken_checkpoints_and_does_not_repeat_the_log(tmp_path, capsys):
    train_m2d2.main(_args(tmp_path))
    out = tmp_path / "out"
    newest = sorted(out.glob("checkpoint-*"))[-1]
    (newest / "state.pt").write_bytes((newest / "state.pt").read_bytes()[:100])  # truncated
    (sorted(out.glob("checkpoint-*"))[-2] / "rng_rank0.pt").unlink()             # missing RNG
    capsys.readouterr()
    train_m2d2.main(_args(tmp_path, "--resume"))
    said = capsys.readouterr()
    text = said.out + said.err
    assert "skipping checkpoint-00000004: state.pt has 100 bytes" in text
    assert "skipping checkpoint-00000003: rng_rank0.pt is missing" in text
    assert _steps(out / "metrics.jsonl") == [1, 2, 3, 4]  # steps 3-4 redone once, not repeated


def test_resume_with_changed_settings_is_refused_or_recorded(tmp_path, capsys):
    train_m2d2.main(_args(tmp_path, steps=2))
    code, err = _exit(_args(tmp_path, "--resume", "--lr", "5e-4", steps=2), capsys)
    assert code == 2 and "lr was 0.001 when the checkpoint was written, and is 0.0005 now" in err
    train_m2d2.main(_args(tmp_path, "--resume", "--allow-config-change", "--lr", "5e-4", steps=3))
    out = tmp_path / "out"
    changes = [json.loads(line) for line in (out / "config_changes.jsonl").read_text().splitlines()]
    assert changes[-1]["changed"]["lr"] == [0.001, 0.0005]
    assert changes[-1]["changed"]["max_steps"] == [2, 3]
    rec = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert rec["step"] == 3 and rec["lr"] < 5e-4 + 1e-12  # the new peak lr drives the schedule
