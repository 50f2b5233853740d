"""``tram_dist.engines.deepspeed.initialize`` with the "auto" presets of ``configs/``.

One DeepSpeed rank on CPU (gloo, DS_ACCELERATOR=cpu), in a subprocess that runs this file as a
script (one process group, nothing left behind in the pytest process): ``configs/zero2.json``
with its "auto" fields, filled from initialize's arguments, gives one TRAM step identical to
the same step with the config written out by hand; a bfloat16 model turns ``bf16.enabled:
"auto"`` on. An "auto" that initialize cannot fill is one ValueError line, raised before
DeepSpeed starts (checked in-process).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ZERO2 = HERE.parents[1] / "configs" / "zero2.json"
MICRO = 4  # engines_harness.N_GLOBAL samples on one rank, one micro-batch

# configs/zero2.json as initialize resolves it for the tiny GPT-2 (n_embd 32) on one rank with
# MICRO samples, no accumulation, engines_harness.BASE; written out by hand
EXPLICIT = {
    "train_batch_size": MICRO, "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
    "gradient_clipping": 0.0, "bf16": {"enabled": False}, "fp16": {"enabled": False},
    "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                          "reduce_bucket_size": 32 * 32, "allgather_bucket_size": 200000000},
    "steps_per_print": 1000000, "wall_clock_breakdown": False,
}


# ------------------------------------------------------------------------------------------
# the DeepSpeed rank (this file run as a script)
# ------------------------------------------------------------------------------------------
def _one_step(config, model_dtype=None, **batch_kwargs):
    import torch
    from deepspeed.utils import safe_get_full_fp32_param

    import engines_harness as H
    from tram_dist import TrainStep
    from tram_dist.engines import deepspeed as tram_ds

    cls, hp, trust_region = H.method_spec("tram-x")
    model = H.tiny_gpt2()
    if model_dtype is not None:
        model = model.to(model_dtype)
    before = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    ds_engine, opt, engine = tram_ds.initialize(model, cls, config, **hp, **H.BASE, **batch_kwargs)
    step = TrainStep(ds_engine, opt, trust_region=trust_region(), seed=H.SEED)
    metrics = step([H.global_batch(0)]).as_dict()
    params = {n: safe_get_full_fp32_param(p).detach().float().clone()
              for n, p in ds_engine.module.named_parameters()}
    moved = max(float((params[k] - before[k]).abs().max()) for k in before)
    seen = dict(train_batch_size=ds_engine.train_batch_size(),
                micro=ds_engine.train_micro_batch_size_per_gpu(),
                accum=ds_engine.gradient_accumulation_steps(),
                clipping=ds_engine.gradient_clipping(), bf16=ds_engine.bfloat16_enabled(),
                stage=ds_engine.zero_optimization_stage(),
                reduce_bucket_size=ds_engine.zero_reduce_bucket_size())
    del step, opt, engine, ds_engine
    return {"params": params, "metrics": metrics, "moved": moved, "engine": seen}


def _worker(out: str) -> None:
    import logging
    import warnings

    import torch
    import torch.distributed as dist

    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    import deepspeed
    deepspeed.utils.logger.setLevel(logging.ERROR)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=0, world_size=1)
    results = {
        "auto": _one_step(str(ZERO2), train_micro_batch_size_per_gpu=MICRO, gradient_accumulation_steps=1),
        "explicit": _one_step(dict(EXPLICIT)),
        # a bfloat16 model: bf16.enabled "auto" -> true; the same step as an fp32 model with
        # bf16 enabled in the config (DeepSpeed casts it to bf16 and keeps fp32 masters)
        "auto_bf16": _one_step(str(ZERO2), model_dtype=torch.bfloat16, train_batch_size=MICRO,
                               gradient_accumulation_steps=1),
        "explicit_bf16": _one_step({**EXPLICIT, "bf16": {"enabled": True}}),
    }
    torch.save(results, out)
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------
# the tests
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("deepspeed")
    import torch

    import engines_harness as H

    out = tmp_path_factory.mktemp("ds_auto") / "result.pt"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", TRANSFORMERS_VERBOSITY="error",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(H.free_port()), RANK="0", WORLD_SIZE="1",
               LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(out)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=False)


def test_auto_config_resolved_from_initialize_arguments(runs):
    seen = runs["auto"]["engine"]
    assert seen == dict(train_batch_size=MICRO, micro=MICRO, accum=1, clipping=0.0, bf16=False, stage=2,
                        reduce_bucket_size=32 * 32)
    assert runs["explicit"]["engine"] == seen


def test_auto_config_step_equals_explicit_config_step(runs):
    import engines_harness as H

    auto, explicit = runs["auto"], runs["explicit"]
    m = auto["metrics"]
    assert not m["ascent_skipped"] and m["perturbed_loss"] is not None  # a real TRAM step
    assert auto["moved"] > 0
    err = H.max_rel_diff(auto["params"], explicit["params"])
    assert err == 0.0, f"auto vs explicit config: parameters differ by {err:.2e}"
    for key in ("loss", "perturbed_loss", "grad_norm"):
        assert m[key] == explicit["metrics"][key], key


def test_bf16_model_turns_bf16_auto_on(runs):
    import engines_harness as H

    auto, explicit = runs["auto_bf16"], runs["explicit_bf16"]
    assert auto["engine"]["bf16"] is True and auto["engine"]["micro"] == MICRO
    assert not auto["metrics"]["ascent_skipped"] and auto["moved"] > 0
    err = H.max_rel_diff(auto["params"], explicit["params"])
    assert err == 0.0, f"bf16 model + auto vs fp32 model + bf16 config: parameters differ by {err:.2e}"


@pytest.mark.parametrize("kwargs,field,fix", [
    ({}, "train_micro_batch_size_per_gpu", "pass train_micro_batch_size_per_gpu=N"),
    ({"train_micro_batch_size_per_gpu": 2}, "gradient_accumulation_steps",
     "pass gradient_accumulation_steps=N"),
])
def test_unresolvable_auto_is_one_clear_line(kwargs, field, fix):
    pytest.importorskip("deepspeed")
    import engines_harness as H
    from tram_dist import TRAM
    from tram_dist.engines import deepspeed as tram_ds

    with pytest.raises(ValueError) as e:
        tram_ds.initialize(H.tiny_gpt2(), TRAM, str(ZERO2), nu=1e-5, lr=1e-3, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert msg.startswith(f'{ZERO2}: {field} is "auto"') and fix in msg and "initialize()" in msg, msg


def test_docstring_points_to_existing_docs():
    from tram_dist.engines import deepspeed as tram_ds

    assert "docs/engines.md" not in tram_ds.__doc__
    readme = (HERE.parents[1] / "README.md").read_text()
    assert "## Sharded training: DDP, FSDP2, DeepSpeed ZeRO-1/2/3, FSDP1" in readme
    assert "Sharded training: DDP, FSDP2, DeepSpeed\nZeRO-1/2/3, FSDP1" in tram_ds.__doc__


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    _worker(sys.argv[1])
