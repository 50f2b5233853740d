"""tram_dist.Run: the launcher's job from Python, and its steps one by one."""
import importlib.machinery
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tram_dist import Run, RunConfig

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("train_m2d2_api", ROOT / "launch" / "train_m2d2.py")
train_m2d2 = importlib.util.module_from_spec(spec)
sys.modules["train_m2d2_api"] = train_m2d2
spec.loader.exec_module(train_m2d2)

real_find_spec = importlib.util.find_spec
SMALL = dict(max_steps=3, warmup_steps=1, batch_size=2, block_size=32, eval_domains=["math", "cs"], method="tram-x",
             eval_interval=0, save_interval=0, eval_batch_size=4)


pytestmark = pytest.mark.usefixtures("one_thread")


def _flags(values: dict) -> list:
    out = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        out += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    return out


def test_the_python_script_runs_the_launchers_job(tmp_path):
    cache = str(tmp_path / "cache")
    train_m2d2.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--cache-dir", cache,
                     "--output-dir", str(tmp_path / "cli"), *_flags(SMALL)])
    config = RunConfig.from_yaml(ROOT / "configs" / "tiny.yaml", output_dir=str(tmp_path / "py"),
                                 cache_dir=cache, **SMALL)
    summary = Run(config).train()
    cli = json.loads((tmp_path / "cli" / "eval.json").read_text())
    assert summary["zs_avg"] == cli["zs_avg"] and summary["in_domain_ppl"] == cli["in_domain_ppl"]
    a = load_file(tmp_path / "cli" / "final" / "model.safetensors")
    b = load_file(tmp_path / "py" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_steps_one_by_one_resume_bit_exactly(tmp_path):
    base = RunConfig.from_yaml(ROOT / "configs" / "tiny.yaml", cache_dir=str(tmp_path / "cache"),
                               **{**SMALL, "max_steps": 4, "save_interval": 2, "method": "tram-theta-prev"})
    whole = Run(base.replace(output_dir=str(tmp_path / "whole")))
    whole.train()
    first = Run(base.replace(output_dir=str(tmp_path / "parts"), max_steps=4))
    first.build()
    assert first.save_checkpoint().name == "checkpoint-00000000"
    record = first.evaluate()
    assert record["step"] == 0 and set(record["domains"]) == {"math", "cs"}
    second = Run(base.replace(output_dir=str(tmp_path / "parts"), resume="latest"))
    assert second.resume_from.name == "checkpoint-00000000"
    second.train()
    a = load_file(tmp_path / "whole" / "final" / "model.safetensors")
    b = load_file(tmp_path / "parts" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    exported = second.export(tmp_path / "copy")
    assert (exported / "model.safetensors").is_file() and not list(tmp_path.glob(".copy.tmp"))
    steps = [json.loads(x)["step"] for x in (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_gradient_checkpointing_changes_nothing(tmp_path):
    base = RunConfig.from_yaml(ROOT / "configs" / "tiny.yaml", cache_dir=str(tmp_path / "cache"),
                               **{**SMALL, "max_steps": 2, "method": "tram-theta-prev", "dropout": 0.1})
    Run(base.replace(output_dir=str(tmp_path / "plain"))).train()
    Run(base.replace(output_dir=str(tmp_path / "ckpt"), gradient_checkpointing=True)).train()
    a = load_file(tmp_path / "plain" / "final" / "model.safetensors")
    b = load_file(tmp_path / "ckpt" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    m = [json.loads(x) for x in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    n = [json.loads(x) for x in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["divergence"] for r in m] == [r["divergence"] for r in n] and m[0]["divergence"] <= 1e-7


def test_report_to_tensorboard_and_wandb(tmp_path, monkeypatch):
    """TensorBoard: the event files hold every step's metrics and the evaluation. W&B (not
    installed here): a stand-in module receives the same scalars through wandb's own calls."""
    import types

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    calls = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)

    class FakeRun:
        def log(self, scalars, step):
            calls.append((step, scalars))

        def finish(self):
            calls.append("finish")

    fake.init = lambda **kw: calls.append(("init", kw)) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: fake.__spec__ if name == "wandb"
                        else real_find_spec(name, *a))
    config = RunConfig.from_yaml(ROOT / "configs" / "tiny.yaml", cache_dir=str(tmp_path / "cache"),
                                 output_dir=str(tmp_path / "out"), report_to=["tensorboard", "wandb"],
                                 **{**SMALL, "max_steps": 2})
    Run(config).train()
    events = EventAccumulator(str(tmp_path / "out" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/divergence", "train/radius", "train/lr", "eval/zs_avg",
            "eval/domains/cs"} <= set(tags), tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    metrics = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([m["loss"] for m in metrics])
    assert calls[0][0] == "init" and calls[0][1]["mode"] == "offline" and calls[-1] == "finish"
    assert [c[0] for c in calls[1:-1]] == [1, 2, 2] and "train/eps_applied" in calls[1][1]


def test_report_to_a_missing_package_is_refused_before_any_work(tmp_path, monkeypatch):
    from tram_dist.run import ConfigError

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb"
                        else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"report_to: wandb needs the wandb package: pip install wandb"):
        Run(RunConfig(output_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "c"), report_to=["wandb"]))
    assert not (tmp_path / "out").exists() and not (tmp_path / "c").exists()


def test_a_process_group_of_one_gives_the_environment_back(tmp_path, monkeypatch):
    """A sharded engine in a plain ``python`` start makes a process group of one and sets
    LOCAL_RANK for deepspeed. Left behind, it made a later Trainer in the same process (the
    README's snippets) take the process for a torchrun start and fail on MASTER_ADDR."""
    from tram_dist.run.distributed import init_distributed, shutdown
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    before = dict(os.environ)
    assert init_distributed(sharded=True).world_size == 1
    assert os.environ["LOCAL_RANK"] == "0"
    shutdown()
    changed = {k for k in set(os.environ) | set(before) if os.environ.get(k) != before.get(k)}
    assert not changed & {"LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    transformers = pytest.importorskip("transformers")
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[])
    assert args.world_size == 1


def test_fp16_under_zero2_trains_checkpoints_and_resumes_bit_exactly(tmp_path):
    """fp16 with DeepSpeed's loss scaler through Run (a process group of one): the model runs in
    fp16, the steps are not skipped, the export is finite, and a resume from the step-2
    checkpoint (the loss scaler's state with it) repeats step 3 bit for bit. DeepSpeed's CPU
    accelerator refuses fp16 without AVX512-FP16: tests/deepspeed_cpu.py declares it supported.
    Two DeepSpeed runs in one process: the second failed while DeepSpeed kept groups of the first
    process group (shutdown now tears down through deepspeed.comm)."""
    pytest.importorskip("deepspeed")
    from deepspeed_cpu import fp16_allowed_on_cpu

    ds = json.loads((ROOT / "configs" / "zero2.json").read_text())
    ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 8, "hysteresis": 2,
                  "loss_scale_window": 1000, "min_loss_scale": 1}
    (tmp_path / "fp16.json").write_text(json.dumps(ds))
    base = RunConfig.from_yaml(ROOT / "configs" / "tiny.yaml", cache_dir=str(tmp_path / "cache"),
                               **{**SMALL, "max_steps": 3, "save_interval": 2, "method": "tram-theta-prev",
                                  "engine": "zero2", "deepspeed_config": str(tmp_path / "fp16.json")})
    with fp16_allowed_on_cpu():
        with Run(base.replace(output_dir=str(tmp_path / "whole"))) as whole:
            whole.train()
            assert next(whole.engine_run.module.parameters()).dtype == torch.float16
        ckpt = tmp_path / "whole" / "checkpoint-00000002"
        with Run(base.replace(output_dir=str(tmp_path / "resumed"), resume=str(ckpt))) as resumed:
            resumed.train()
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    again = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and not any(r["step_skipped"] for r in rows)
    assert [r["step"] for r in again] == [3]
    for x, y in zip(rows[2:], again):
        for key in ("loss", "perturbed_loss", "divergence", "lr"):
            assert x[key] == y[key], (key, x[key], y[key])
    a = load_file(tmp_path / "whole" / "final" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.isfinite(t).all() for t in a.values())
