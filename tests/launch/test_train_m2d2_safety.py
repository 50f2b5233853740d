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


pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_an_infinite_lr_is_refused_before_any_work(tmp_path, capsys):
    code, err = _exit(_args(tmp_path, "--lr", "inf"), capsys)
    assert code == 2 and err == "error: lr: inf must be a finite number > 0", err
    assert not (tmp_path / "out").exists()


def test_a_diverging_run_stops_and_exports_nothing(tmp_path, capsys):
    code, err = _exit(_args(tmp_path, "--lr", "1e6"), capsys)
    assert code == 3 and "training stopped and nothing was exported" in err, err
    out = tmp_path / "out"
    assert not (out / "final").exists()
    kept = sorted(out.glob("checkpoint-*"))
    assert f"Last good checkpoint: {kept[-1]}" in err if kept else "Last good checkpoint: none" in err
    for folder in kept:  # none holds NaN
        state = torch.load(folder / "state.pt", weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_a_used_output_dir_is_refused_unless_overwrite(tmp_path, capsys):
    train_m2d2.main(_args(tmp_path))
    code, err = _exit(_args(tmp_path, steps=2), capsys)
    assert code == 2 and "already holds a run" in err and "set overwrite" in err
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


def test_a_truncated_weights_file_is_one_line(tmp_path, capsys):
    import shutil

    from tram_dist.data.pretrained import PRETRAINED_TINY

    model = tmp_path / "model"
    shutil.copytree(PRETRAINED_TINY, model)
    weights = model / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    code, err = _exit(_args(tmp_path, "--model", str(model)), capsys)
    assert code == 2 and err.startswith(f"error: model: cannot load {str(model)!r}"), err
    assert "truncated or damaged weights file" in err and not (tmp_path / "out" / "final").exists()


def test_an_output_dir_that_cannot_be_written_is_one_line_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, err = _exit(_args(tmp_path, "--output-dir", str(blocker)), capsys)
    assert code == 2 and err == f"error: output_dir {blocker} is a file; pass a folder", err
    code, err = _exit(_args(tmp_path, "--output-dir", str(blocker / "run")), capsys)
    assert code == 2 and err.startswith(f"error: output_dir {blocker / 'run'} cannot be written"), err
    assert not (tmp_path / "cache").exists()  # nothing tokenized


def test_a_full_disk_during_a_save_leaves_no_temporary_folder(tmp_path, capsys, monkeypatch):
    import errno

    import tram_dist.run.checkpoints as ckpt

    def full(folder):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "write_manifest", full)
    code, err = _exit(_args(tmp_path), capsys)
    assert code == 2 and "writing checkpoint" in err and "No space left on device" in err, err
    out = tmp_path / "out"
    assert not list(out.glob(".checkpoint-*")) and not list(out.glob("checkpoint-*"))


def test_too_little_room_for_the_rotation_is_refused_at_the_first_save(tmp_path, capsys, monkeypatch):
    import shutil as real_shutil

    import tram_dist.run.checkpoints as ckpt

    usage = real_shutil.disk_usage(tmp_path)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    code, err = _exit(_args(tmp_path), capsys)  # keeps 3: 4 checkpoints exist while one is written
    assert code == 2 and "GiB free, but keeping 3 checkpoints" in err and "lower keep_checkpoints" in err, err
    assert [p.name for p in (tmp_path / "out").glob("checkpoint-*")] == ["checkpoint-00000001"]


def _poisoned_run(tmp_path, name, bad_forwards, **fields):
    """A Run of SAM on the tiny model whose grad-enabled forwards numbered in ``bad_forwards``
    (SAM: two per step, so 3 is step 2's pass 1) give NaN logits."""
    from tram_dist import Run, RunConfig

    config = RunConfig.from_yaml(ROOT / "configs" / "tiny.yaml", output_dir=str(tmp_path / name),
                                 cache_dir=str(tmp_path / "cache"), method="sam", lr=1e-3, batch_size=2,
                                 block_size=32, eval_domains=["math"], eval_batch_size=4, eval_interval=0,
                                 save_interval=1, keep_checkpoints=5, warmup_steps=0, **fields)
    run = Run(config).build()
    calls = {"n": 0}

    def poison(module, args, output):
        if not torch.is_grad_enabled():
            return output  # evaluation
        calls["n"] += 1
        return output * float("nan") if calls["n"] in bad_forwards else output

    run.engine_run.module.lm_head.register_forward_hook(poison)
    return run


def _model(folder):
    return torch.load(folder / "state.pt", weights_only=True)["model"]


def test_nonfinite_skip_skips_a_nan_step_and_the_run_goes_on(tmp_path):
    from tram_dist.run.run import NonFiniteRun

    run = _poisoned_run(tmp_path, "skip", {3}, max_steps=3, nonfinite="skip")
    run.train()
    out = tmp_path / "skip"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step_skipped"] for r in records] == [False, True, False]
    assert [r["skipped_steps"] for r in records] == [0, 1, 1]
    assert json.loads((out / "eval.json").read_text())["skipped_steps"] == 1
    one, two, three = (_model(out / f"checkpoint-0000000{i}") for i in (1, 2, 3))
    assert all(torch.equal(one[k], two[k]) for k in one)  # the skipped step changed nothing
    assert any(not torch.equal(two[k], three[k]) for k in two) and all(torch.isfinite(t).all() for t in three.values())
    assert (out / "final" / "model.safetensors").is_file()
    # the default stops on the same NaN, exporting nothing
    with pytest.raises(NonFiniteRun, match="step 2: the loss is nan"):
        _poisoned_run(tmp_path, "stop", {3}, max_steps=3).train()
    assert not (tmp_path / "stop" / "final").exists()


def test_nonfinite_skip_stops_after_max_skipped_steps_in_a_row(tmp_path):
    from tram_dist.run.run import NonFiniteRun

    run = _poisoned_run(tmp_path, "diverged", set(range(3, 100)), max_steps=6, nonfinite="skip",
                        max_skipped_steps=2)
    with pytest.raises(NonFiniteRun, match="step 3: 2 steps in a row skipped"):
        run.train()
    out = tmp_path / "diverged"
    assert not (out / "final").exists()
    assert [p.name for p in sorted(out.glob("checkpoint-*"))][-1] == "checkpoint-00000002"
