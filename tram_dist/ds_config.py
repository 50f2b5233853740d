"""DeepSpeed config presets: fill "auto" fields from the run, refuse contradictions.

    cfg = resolve_ds_config("configs/zero2.json", global_batch_size=16, micro_batch_size=4,
                            grad_accum=1, world_size=4, lr=2e-5, bf16=True, max_grad_norm=1.0)

As in Hugging Face's integration, a preset may say "auto" for a value the run already
determines; the run's value is filled in. A concrete value must agree with the run, otherwise
`DsConfigError` names the field, both values and the fix (one line). The run's flags are the
single source of truth: tram_dist builds the optimizer (TRAM wraps it) and the LR schedule
itself, so the config's optimizer section only has to agree with them (DeepSpeed uses a
client optimizer in preference to the config's one).
"""
from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any

AUTO = "auto"

# DeepSpeed's own defaults, used for the size "auto"s when the model's hidden size is unknown.
_DS_DEFAULTS = {"reduce_bucket_size": 500_000_000, "stage3_prefetch_bucket_size": 50_000_000,
                "stage3_param_persistence_threshold": 100_000}


class DsConfigError(ValueError):
    """A DeepSpeed config that contradicts the run or cannot be read; one line with the fix."""


def load_ds_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DsConfigError(f"DeepSpeed config {path} does not exist; pass --deepspeed with a "
                            "file such as configs/zero2.json")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DsConfigError(f"DeepSpeed config {path} is not valid JSON (line {e.lineno}: {e.msg}); "
                            "fix the file") from e
    if not isinstance(cfg, dict):
        raise DsConfigError(f"DeepSpeed config {path} must hold a JSON object")
    return cfg


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


class _Resolver:
    def __init__(self, cfg: dict, source: str):
        self.cfg, self.source = cfg, source

    def fill(self, path: str, value: Any, flag: str, *, create: bool = False) -> None:
        """Set `path` (dotted) to `value` if it is "auto" (or absent and `create`); else check."""
        *parents, key = path.split(".")
        node = self.cfg
        for p in parents:
            if not isinstance(node.get(p), dict):
                if not create:
                    return
                node[p] = {}
            node = node[p]
        if key not in node:
            if create:
                node[key] = value
            return
        if node[key] == AUTO:
            node[key] = value
        elif not _same(node[key], value):
            raise DsConfigError(
                f"{self.source}: {path} is {json.dumps(node[key])} but the run has "
                f"{flag}={_show(value)}; set it to \"auto\" in the file or change {flag}")


def _show(v: Any) -> str:
    if isinstance(v, tuple):
        v = list(v)
    return json.dumps(v)


def _leftover_autos(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _leftover_autos(v, f"{prefix}{k}.")]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _leftover_autos(v, f"{prefix}{i}.")]
    return [prefix[:-1]] if node == AUTO else []


def resolve_ds_config(config: dict | str | os.PathLike, *, global_batch_size: int,
                      micro_batch_size: int, grad_accum: int, world_size: int, lr: float,
                      betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-8,
                      weight_decay: float = 0.0, max_grad_norm: float | None = None,
                      bf16: bool = False, hidden_size: int | None = None,
                      warmup_steps: int | None = None, max_steps: int | None = None) -> dict:
    """A complete DeepSpeed config dict for this run (the input is not modified)."""
    if isinstance(config, dict):
        cfg, source = copy.deepcopy(config), "DeepSpeed config"
    else:
        cfg, source = load_ds_config(config), str(config)
    for key in [k for k in cfg if k.startswith("_")]:
        del cfg[key]  # "_comments": JSON has no comments, the presets document fields there
    r = _Resolver(cfg, source)

    r.fill("train_batch_size", global_batch_size, "--batch-size", create=True)
    r.fill("train_micro_batch_size_per_gpu", micro_batch_size,
           "--micro-batch-size", create=True)
    r.fill("gradient_accumulation_steps", grad_accum, "--grad-accum", create=True)
    clip = 0.0 if max_grad_norm is None else float(max_grad_norm)  # DeepSpeed: 0 = no clipping
    r.fill("gradient_clipping", clip, "--max-grad-norm", create=True)

    r.fill("optimizer.params.lr", lr, "--lr")
    r.fill("optimizer.params.betas", list(betas), "betas")
    r.fill("optimizer.params.eps", eps, "eps")
    r.fill("optimizer.params.weight_decay", weight_decay, "weight decay")
    r.fill("scheduler.params.warmup_max_lr", lr, "--lr")
    r.fill("scheduler.params.warmup_min_lr", 0.0, "the warmup start lr")
    if warmup_steps is not None:
        r.fill("scheduler.params.warmup_num_steps", warmup_steps, "--warmup-steps")
    if max_steps is not None:
        r.fill("scheduler.params.total_num_steps", max_steps, "--max-steps")

    r.fill("bf16.enabled", bool(bf16), "--bf16")
    if cfg.get("fp16", {}).get("enabled") is True and cfg.get("bf16", {}).get("enabled") is True:
        raise DsConfigError(f"{source}: fp16.enabled and bf16.enabled are both true; keep bf16 "
                            "(pass --bf16) and set fp16.enabled to false")
    if cfg.get("fp16", {}).get("enabled") == AUTO:
        cfg["fp16"]["enabled"] = False  # the run's mixed precision is bf16 or none

    zero = cfg.get("zero_optimization")
    if isinstance(zero, dict):
        sizes = (_DS_DEFAULTS if hidden_size is None else
                 {"reduce_bucket_size": hidden_size * hidden_size,
                  "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                  "stage3_param_persistence_threshold": 10 * hidden_size})
        for key, value in sizes.items():
            if zero.get(key) == AUTO:
                zero[key] = value

    expected = micro_batch_size * grad_accum * world_size
    if cfg["train_batch_size"] != expected:
        raise DsConfigError(
            f"{source}: train_batch_size {cfg['train_batch_size']} != "
            f"train_micro_batch_size_per_gpu {cfg['train_micro_batch_size_per_gpu']} x "
            f"gradient_accumulation_steps {cfg['gradient_accumulation_steps']} x world size "
            f"{world_size}; set these fields to \"auto\"")
    left = _leftover_autos(cfg)
    if left:
        raise DsConfigError(f"{source}: {left[0]} is \"auto\" but the run does not determine it; "
                            "write a value in the file")
    return cfg


def zero_stage(cfg: dict) -> int:
    """The ZeRO stage of a (resolved) config; 0 when it has no zero_optimization section."""
    return int(cfg.get("zero_optimization", {}).get("stage", 0))
