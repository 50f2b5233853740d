"""Bad input fails before training with one line `error: ...` and exit code 2, no traceback."""
import importlib
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

import huggingface_hub
from huggingface_hub.errors import LocalEntryNotFoundError

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("train_m2d2", ROOT / "launch" / "train_m2d2.py")
train_m2d2 = importlib.util.module_from_spec(spec)
sys.modules["train_m2d2"] = train_m2d2  # dataclasses look their module up by name
spec.loader.exec_module(train_m2d2)


def fails(argv, capsys, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        train_m2d2.main([*argv, "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert not (out / "metrics.jsonl").exists()
    return err


def m2d2(root, splits=("train", "valid", "test")):
    (root / "alpha").mkdir(parents=True)
    for s in splits:
        (root / "alpha" / f"{s}.txt").write_text("alpha text\n")
    return root


@pytest.mark.parametrize("argv,expect", [
    (["--train-domain", "nope"], "unknown domain 'nope' in the embedded corpus; available: art, biology"),
    (["--eval-domains", "math", "poetry"], "unknown domain 'poetry'"),
    (["--data-dir", "/nonexistent/m2d2", "--train-domain", "x"], "data folder /nonexistent/m2d2 does not exist"),
    # --data-dir on the command line replaces a preset's `hub: true`
    (["--config", str(ROOT / "configs" / "gpt2_s2orc_math.yaml"), "--data-dir", "/nonexistent/m2d2"],
     "data folder /nonexistent/m2d2 does not exist"),
    (["--batch-size", "10", "--micro-batch-size", "4"], "not divisible by world size 1 x micro-batch 4"),
    (["--block-size", "512"], "block_size: 512 exceeds the context of model tiny (256 tokens)"),
    (["--deepspeed", "x.json", "--fsdp"], "--deepspeed and --fsdp both given"),
    (["--deepspeed", "/nonexistent.json"], "deepspeed_config: /nonexistent.json does not exist"),
    (["--resume"], "no checkpoint-* folder"),
    (["--method-arg", "rho"], "must be KEY=VALUE"),
    (["--lr", "0"], "lr: 0.0 must be a finite number > 0"),
    (["--method", "sam", "--method-arg", "rho=-1", "--max-steps", "0"], "method_args: sam: SAM: rho must be"),
    (["--model", "/nonexistent/model"], "cannot load"),
    (["--dropout", "1.5"], "dropout: 1.5 must be in [0, 1)"),
    (["--method", "sam", "--method-arg", "radius_scale=10", "--max-steps", "0"],
     "radius_scale sizes TRAM's ascent"),
    (["--method", "tram-x", "--method-arg", "radius_scale=-1", "--max-steps", "0"],
     "radius_scale must be a finite number >= 0"),
    (["--method", "trpo", "--method-arg", "lam=-1", "--max-steps", "0"],
     "trpo: lambda (lam) must be a finite number >= 0"),
    (["--method", "mesa", "--method-arg", "decay=1", "--max-steps", "0"],
     "mesa: decay must be a number in [0, 1)"),
])
def test_bad_flags(argv, expect, capsys, tmp_path):
    assert expect in fails(argv, capsys, tmp_path)


def test_missing_split_file(capsys, tmp_path):
    root = m2d2(tmp_path / "data", splits=("train", "valid"))
    err = fails(["--data-dir", str(root), "--train-domain", "alpha"], capsys, tmp_path)
    assert "missing split file" in err and "test.txt" in err


def test_deepspeed_preset_contradicting_the_run(capsys, tmp_path):
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"train_batch_size": 32, "zero_optimization": {"stage": 2}}))
    err = fails(["--deepspeed", str(cfg), "--batch-size", "16"], capsys, tmp_path)
    assert "train_batch_size is 32 but the run has batch_size=16" in err


def test_fsdp_under_the_deepspeed_launcher(capsys, tmp_path):
    # the deepspeed launcher passes --local_rank (and sets CROSS_RANK): what the launcher detects
    assert "--fsdp under the deepspeed launcher" in fails(["--fsdp", "--local_rank=0"], capsys, tmp_path)


def test_deepspeed_config_the_tram_engine_cannot_run(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")  # a process group of one is started before the check
    preset = json.loads((ROOT / "configs" / "zero3_offload.json").read_text())
    preset["zero_optimization"]["offload_optimizer"]["device"] = "nvme"
    nvme = tmp_path / "nvme.json"
    nvme.write_text(json.dumps(preset))
    err = fails(["--deepspeed", str(nvme)], capsys, tmp_path)
    assert "offload_optimizer.device is 'nvme'" in err and "what works:" in err
    preset["zero_optimization"]["offload_optimizer"]["device"] = "cpu"
    preset["fp16"]["enabled"] = True
    nvme.write_text(json.dumps(preset))
    assert "fp16 with ZeRO-3 is not supported" in fails(["--deepspeed", str(nvme)], capsys, tmp_path)
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    assert "zero_optimization.stage is 0" in fails(["--deepspeed", str(cfg)], capsys, tmp_path)


def test_hub_offline(capsys, tmp_path, monkeypatch):
    def offline(**kw):
        raise LocalEntryNotFoundError("no connection")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    err = fails(["--hub", "--train-domain", "math_l1", "--eval-domains", "math_l1", "Art"], capsys, tmp_path)
    assert "offline" in err and "--data-dir" in err


def test_bad_preset(capsys, tmp_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("batch_size: 16\nlearning_rate: 0.1\n")
    assert "learning_rate: unknown field in" in fails(["--config", str(cfg)], capsys, tmp_path)
    cfg.write_text("method: tram\n")
    assert "'tram' is not one of adamw" in fails(["--config", str(cfg)], capsys, tmp_path)
    cfg.write_text("max_steps: lots\n")
    assert "is not a valid int" in fails(["--config", str(cfg)], capsys, tmp_path)


def test_presets_parse_and_flags_override(tmp_path):
    for name in ("tiny", "gpt2_wiki_soc", "gpt2_s2orc_math", "gpt2xl_s2orc_math"):
        args = train_m2d2.config_from_args(["--config", str(ROOT / "configs" / f"{name}.yaml"), "--lr", "0.5"])
        assert args.lr == 0.5 and args.method in train_m2d2.METHODS
        assert args.validate() is args
    xl = train_m2d2.config_from_args(["--config", str(ROOT / "configs" / "gpt2xl_s2orc_math.yaml")])
    assert (xl.batch_size, xl.micro_batch_size, xl.max_steps, xl.model) == (16, 4, 100000, "gpt2-xl")
    assert Path(xl.deepspeed_config).is_file() and len(xl.eval_domains) == 11
    fsdp = train_m2d2.config_from_args(["--config", str(ROOT / "configs" / "gpt2xl_s2orc_math.yaml"), "--fsdp"])
    assert (fsdp.engine, fsdp.deepspeed_config) == ("fsdp2", None)  # the flag replaces the preset's engine
    soc = train_m2d2.config_from_args(["--config", str(ROOT / "configs" / "gpt2_wiki_soc.yaml")])
    assert soc.train_domain == "Society_and_social_sciences" and soc.eval_domains[0] == soc.train_domain
    assert (soc.lr, soc.warmup_steps, soc.max_steps, tuple(soc.betas)) == (2e-5, 10000, 50000, (0.9, 0.99))


def test_every_preset_value_has_a_comment():
    for path in (ROOT / "configs").glob("*.yaml"):
        for line in path.read_text().splitlines():
            if line and not line.startswith(("#", " ", "-")) and ":" in line:
                assert "#" in line, (path.name, line)


def test_resume_under_another_engine(capsys, tmp_path):
    from tram_dist.checkpoint_files import write_manifest
    ckpt = tmp_path / "checkpoint-00000002"
    ckpt.mkdir()
    (ckpt / "engine.json").write_text(json.dumps({"engine": "fsdp", "world_size": 2}))
    (ckpt / "run.json").write_text("{}")
    (ckpt / "rng_rank0.pt").write_bytes(b"")
    write_manifest(ckpt)
    err = fails(["--resume", str(ckpt)], capsys, tmp_path)
    assert "was written by the fsdp engine, this run is single; resume with the same engine" in err


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_crafted_rng_file_on_resume_is_refused_and_never_runs(capsys, tmp_path):
    """A checkpoint's rng_rank0.pt replaced by a pickle that runs a shell command: --resume
    stops with one line naming the file, and the command never runs."""
    import pickle
    out = tmp_path / "out"
    common = ["--max-steps", "2", "--batch-size", "2", "--block-size", "32", "--eval-domains", "math",
              "--method", "adamw", "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache")]
    train_m2d2.main([*common, "--save-interval", "1"])
    ckpt = sorted(out.glob("checkpoint-*"))[-1]
    marker = tmp_path / "pwned"
    with open(ckpt / "rng_rank0.pt", "wb") as f:
        pickle.dump({"torch": _RunsCode(marker)}, f)
    resume = [*common, "--resume", str(ckpt)]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # the manifest catches the altered file first
        train_m2d2.main(resume)
    err = capsys.readouterr().err.strip()
    # the crafted file's size depends on the length of the temporary path it names
    assert e.value.code == 2 and re.search(r"rng_rank0\.pt has \d+ bytes, the manifest says", err), err
    # an attacker who also rewrites the manifest: the file is still never unpickled
    from tram_dist.checkpoint_files import write_manifest
    write_manifest(ckpt)
    with pytest.raises(SystemExit) as e:
        train_m2d2.main(resume)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "rng_rank0.pt" in err and "was not loaded" in err, err
    assert not marker.exists()
