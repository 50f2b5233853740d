"""RunConfig: typed fields, presets, validation in one place with errors that name the field."""
import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

from tram_dist import RunConfig
from tram_dist.run import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


def _launcher():
    spec = importlib.util.spec_from_file_location("train_m2d2_cfg", ROOT / "launch" / "train_m2d2.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_m2d2_cfg"] = module
    spec.loader.exec_module(module)
    return module


def test_every_field_is_documented_and_has_a_launcher_flag():
    docs = RunConfig.describe()
    assert all(len(text) > 10 for text in docs.values()), docs
    parser = _launcher().build_parser()
    dests = {a.dest for a in parser._actions}
    assert set(docs) <= dests, set(docs) - dests


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_presets_load_and_validate(preset):
    config = RunConfig.from_yaml(preset, max_steps=3, warmup_steps=1)
    assert config.validate() is config and config.max_steps == 3


def test_preset_paths_are_taken_from_the_repository_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository: configs/zero2.json is found beside the preset
    config = RunConfig.from_yaml(ROOT / "configs" / "gpt2xl_s2orc_math.yaml")
    assert Path(config.deepspeed_config) == ROOT / "configs" / "zero2.json"


@pytest.mark.parametrize("text, field, words", [
    ("learning_rate: 0.1\n", "learning_rate", "unknown field"),
    ("method: tram\n", "method", "'tram' is not one of adamw"),
    ("max_steps: lots\n", "max_steps", "is not a valid int"),
    ("max_steps: 1.5\n", "max_steps", "not a whole number"),
    ("bf16: yes please\n", "bf16", "must be true or false"),
    ("betas: [0.9]\n", "betas", "takes 2 values"),
    ("lr: [1, 2]\n", "lr", "takes one value"),
    ("method_args: 3\n", "method_args", "must be a mapping"),
])
def test_bad_preset_values_name_the_field(tmp_path, text, field, words):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        RunConfig.from_yaml(path)
    assert e.value.field == field and str(e.value).startswith(f"{field}: ") and words in str(e.value)


@pytest.mark.parametrize("changes, field", [
    ({"lr": 0.0}, "lr"), ({"lr": float("inf")}, "lr"), ({"max_steps": -1}, "max_steps"),
    ({"max_grad_norm": 0.0}, "max_grad_norm"), ({"method": "tram-x", "sigma": 0.0}, "sigma"),
    ({"eval_batch_size": 0}, "eval_batch_size"), ({"max_steps": 20, "warmup_steps": 20}, "warmup_steps"), ({"divergence_fraction": 0.0}, "divergence_fraction"),
    ({"dropout": 1.0}, "dropout"), ({"method_args": {"rh0": 1}}, "method_args"),
    ({"engine": "fsdp"}, "engine"), ({"engine": "fsdp2", "deepspeed_config": "configs/zero2.json"},
                                     "deepspeed_config"),
    ({"deepspeed_config": "/nonexistent.json"}, "deepspeed_config"),
    ({"hub": True, "data_dir": "x"}, "hub"), ({"eval_domains": ["a", "a"]}, "eval_domains"),
    ({"target_dropout": "some"}, "target_dropout"), ({"eval_split": "train"}, "eval_split"),
    ({"hsdp_replicas": 2}, "hsdp_replicas"), ({"engine": "fsdp2", "hsdp_replicas": 2, "analysis": True}, "analysis"), ({"engine": "fsdp2", "hsdp_replicas": 0}, "hsdp_replicas"),
])
def test_validate_names_the_field(changes, field, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError) as e:
        RunConfig(**changes).validate()
    assert e.value.field == field and "\n" not in str(e.value)


def test_launcher_flags_override_the_preset_and_method_args_parse():
    launcher = _launcher()
    config = launcher.config_from_args(["--config", str(ROOT / "configs" / "tiny.yaml"), "--lr", "0.5",
                                        "--method-arg", "rho=1e2", "--method-arg", "noise=uniform",
                                        "--no-bf16", "--eval-domains", "math", "cs"])
    assert (config.lr, config.method_args, config.eval_domains) == (0.5, {"rho": 100.0, "noise": "uniform"},
                                                                   ["math", "cs"])
    assert config.max_steps == RunConfig.from_yaml(ROOT / "configs" / "tiny.yaml").max_steps
    assert launcher.config_from_args([]) == RunConfig.from_yaml(launcher.TINY_PRESET)


def test_to_dict_round_trips():
    config = RunConfig(method="sam", method_args={"rho": 0.1}, eval_domains=["math"])
    again = RunConfig.from_dict(config.to_dict())
    assert again == dataclasses.replace(config, betas=tuple(config.betas))
