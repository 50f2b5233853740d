"""DeepSpeed presets: "auto" filled from the run, contradictions named in one line."""
import json
from pathlib import Path

import pytest

from tram_dist.ds_config import DsConfigError, resolve_ds_config, zero_stage

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RUN = dict(global_batch_size=16, micro_batch_size=2, grad_accum=2, world_size=4, lr=2e-5,
           max_grad_norm=1.0, bf16=True)


@pytest.mark.parametrize("name,stage", [("zero1", 1), ("zero2", 2), ("zero3", 3), ("zero3_offload", 3)])
def test_presets_resolve(name, stage):
    cfg = resolve_ds_config(CONFIGS / f"{name}.json", hidden_size=768, **RUN)
    assert zero_stage(cfg) == stage
    assert cfg["train_batch_size"] == 16 and cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_accumulation_steps"] == 2 and cfg["gradient_clipping"] == 1.0
    assert cfg["optimizer"]["params"] == {"lr": 2e-5, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.0}
    assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 768 * 768
    assert "_comments" not in cfg and "auto" not in json.dumps(cfg)
    if stage == 3:
        assert cfg["zero_optimization"]["stage3_param_persistence_threshold"] == 7680


def test_every_preset_field_has_a_comment():
    for path in CONFIGS.glob("zero*.json"):
        raw = json.loads(path.read_text())
        comments = raw["_comments"]
        for key, value in raw.items():
            if key == "_comments":
                continue
            if isinstance(value, dict) and key in ("zero_optimization", "bf16", "fp16"):
                for sub in value:
                    assert f"{key}.{sub}" in comments or key in comments, (path.name, key, sub)
            else:
                assert key in comments, (path.name, key)


def test_contradicting_batch_size_is_named():
    with pytest.raises(DsConfigError) as e:
        resolve_ds_config({"train_batch_size": 32}, **RUN)
    msg = str(e.value)
    assert "\n" not in msg
    assert "train_batch_size is 32" in msg and "--batch-size=16" in msg and '"auto"' in msg


@pytest.mark.parametrize("cfg,field", [
    ({"gradient_accumulation_steps": 8}, "gradient_accumulation_steps"),
    ({"train_micro_batch_size_per_gpu": 4}, "train_micro_batch_size_per_gpu"),
    ({"gradient_clipping": 0.5}, "gradient_clipping"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}, "optimizer.params.lr"),
    ({"bf16": {"enabled": False}}, "bf16.enabled"),
])
def test_other_contradictions(cfg, field):
    with pytest.raises(DsConfigError, match=field.replace(".", r"\.")):
        resolve_ds_config(cfg, **RUN)


def test_matching_values_and_missing_fields_are_fine():
    cfg = resolve_ds_config({"train_batch_size": 16, "optimizer": {"params": {"lr": 2.0e-5}}}, **RUN)
    assert cfg["gradient_accumulation_steps"] == 2 and cfg["optimizer"]["params"]["lr"] == 2e-5


def test_unknown_auto_and_bad_files(tmp_path):
    with pytest.raises(DsConfigError, match="zero_optimization.sub_group_size"):
        resolve_ds_config({"zero_optimization": {"stage": 3, "sub_group_size": "auto"}}, **RUN)
    with pytest.raises(DsConfigError, match="does not exist"):
        resolve_ds_config(tmp_path / "nope.json", **RUN)
    (tmp_path / "bad.json").write_text("{ not json")
    with pytest.raises(DsConfigError, match="not valid JSON"):
        resolve_ds_config(tmp_path / "bad.json", **RUN)


def test_deepspeed_accepts_the_resolved_config():
    ds_config = pytest.importorskip("deepspeed.runtime.config")
    cfg = resolve_ds_config(CONFIGS / "zero3_offload.json", hidden_size=64,
                            **{**RUN, "world_size": 1, "grad_accum": 8})
    parsed = ds_config.DeepSpeedConfig(cfg)
    assert parsed.zero_optimization_stage == 3 and parsed.train_batch_size == 16


# --- resolve_autos: what tram_dist.engines.deepspeed.initialize fills ----------------------------
ADAMW = {"lr": 2e-5, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.01, "amsgrad": False}


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3"])
def test_resolve_autos_fills_the_presets(name):
    from tram_dist.ds_config import has_auto, resolve_autos

    raw = json.loads((CONFIGS / f"{name}.json").read_text())
    cfg = resolve_autos(raw, world_size=2, optimizer_defaults=ADAMW, bf16=True, hidden_size=64,
                        train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2)
    assert not has_auto(cfg) and "_comments" not in cfg and "_comments" in raw  # input untouched
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) \
        == (16, 4, 2)
    assert cfg["gradient_clipping"] == 0.0  # TrainStep(max_grad_norm=...) clips, not DeepSpeed
    assert cfg["optimizer"]["params"] == {"lr": 2e-5, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.01}
    assert cfg["bf16"]["enabled"] is True and cfg["zero_optimization"]["reduce_bucket_size"] == 64 * 64


@pytest.mark.parametrize("kw,expected", [
    (dict(train_batch_size=16, gradient_accumulation_steps=2), (16, 4, 2)),   # micro derived
    (dict(train_batch_size=16, train_micro_batch_size_per_gpu=2), (16, 2, 4)),  # accumulation derived
])
def test_resolve_autos_derives_one_batch_field(kw, expected):
    from tram_dist.ds_config import resolve_autos

    cfg = resolve_autos(json.loads((CONFIGS / "zero2.json").read_text()), world_size=2,
                        optimizer_defaults=ADAMW, **kw)
    got = (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"])
    assert got == expected and cfg["bf16"]["enabled"] is False


def test_resolve_autos_without_auto_is_unchanged():
    from tram_dist.ds_config import resolve_autos

    cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}, "_comments": {}}
    assert resolve_autos(cfg, world_size=4, optimizer_defaults=ADAMW) == cfg


@pytest.mark.parametrize("kw,field,hint", [
    ({}, "train_micro_batch_size_per_gpu", "pass train_micro_batch_size_per_gpu=N"),
    (dict(train_micro_batch_size_per_gpu=4), "gradient_accumulation_steps",
     "pass gradient_accumulation_steps=N (micro-batches per TrainStep call)"),
    (dict(train_batch_size=10, gradient_accumulation_steps=1), "train_micro_batch_size_per_gpu",
     "cannot derive it from train_batch_size=10, gradient_accumulation_steps=1 and world size 4"),
])
def test_resolve_autos_unresolved_batch_field_is_one_line(kw, field, hint):
    from tram_dist.ds_config import resolve_autos

    with pytest.raises(ValueError) as e:
        resolve_autos(json.loads((CONFIGS / "zero2.json").read_text()), world_size=4,
                      optimizer_defaults=ADAMW, source="configs/zero2.json", **kw)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f'configs/zero2.json: {field} is "auto"') and hint in msg


def test_resolve_autos_other_unresolved_and_contradictions():
    from tram_dist.ds_config import resolve_autos

    base = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1}
    with pytest.raises(ValueError, match=r'scheduler\.params\.warmup_num_steps is "auto" but initialize\(\) '
                                         r"cannot determine it; write a value in the config"):
        resolve_autos({**base, "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}}},
                      world_size=1, optimizer_defaults=ADAMW, train_micro_batch_size_per_gpu=2)
    with pytest.raises(ValueError, match=r"train_micro_batch_size_per_gpu is 8 but initialize\(\) got "
                                         r"train_micro_batch_size_per_gpu=2"):
        resolve_autos({"train_micro_batch_size_per_gpu": 8, "gradient_clipping": "auto"}, world_size=1,
                      optimizer_defaults=ADAMW, train_micro_batch_size_per_gpu=2)
    with pytest.raises(ValueError, match=r"optimizer\.params\.lr is 0\.0001 but the run has lr=2e-05"):
        resolve_autos({**base, "optimizer": {"params": {"lr": 1e-4, "eps": "auto"}}}, world_size=1,
                      optimizer_defaults=ADAMW, train_micro_batch_size_per_gpu=2)


def test_resolve_autos_keeps_deepspeed_defaults_and_concrete_values():
    from tram_dist.ds_config import resolve_autos

    # an fp32 model with bf16.enabled true in the file: the file wins (DeepSpeed casts the model)
    cfg = resolve_autos({"train_micro_batch_size_per_gpu": "auto", "bf16": {"enabled": True},
                         "optimizer": {"params": {"betas": "auto"}}},
                        world_size=2, optimizer_defaults={"lr": 0.1, "momentum": 0.9},  # SGD: no betas
                        bf16=False, train_micro_batch_size_per_gpu=3)
    assert cfg["bf16"]["enabled"] is True and cfg["gradient_clipping"] == 1.0  # DeepSpeed's default
    assert (cfg["train_batch_size"], cfg["gradient_accumulation_steps"]) == (6, 1)
    assert cfg["optimizer"]["params"] == {}


def test_deepspeed_accepts_the_initialize_config():
    ds_config = pytest.importorskip("deepspeed.runtime.config")
    from tram_dist.ds_config import resolve_autos

    cfg = resolve_autos(json.loads((CONFIGS / "zero3.json").read_text()), world_size=1,
                        optimizer_defaults=ADAMW, hidden_size=64, train_micro_batch_size_per_gpu=2,
                        gradient_accumulation_steps=4)
    parsed = ds_config.DeepSpeedConfig(cfg)
    assert parsed.zero_optimization_stage == 3 and parsed.train_batch_size == 8
