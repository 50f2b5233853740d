"""DeepSpeed config presets: fill "auto" fields from the run, refuse contradictions.

    cfg = resolve_ds_config("configs/zero2.json", global_batch_size=16, micro_batch_size=4,
                            grad_accum=1, world_size=4, lr=2e-5, bf16=True, max_grad_norm=1.0)

As in Hugging Face's integration, a preset may say "auto" for a value the run already
determines; the run's value is filled in. A concrete value must agree with the run, otherwise
`DsConfigError` names the field, both values and the fix (one line). The run's flags are the
single source of truth: tram_dist builds the optimizer (TRAM wraps it) and the LR schedule
itself, so the config's optimizer section only has to agree with them (DeepSpeed uses a
client optimizer in preference to the config's one).

`resolve_autos` does the same for `tram_dist.engines.deepspeed.initialize`, which knows less
than the launcher (no --batch-size): the batch fields come from its keyword arguments or the
config's other batch fields, the optimizer values from the base optimizer it builds, bf16
from the model's dtype; an "auto" it cannot fill is one `DsConfigError` line that says which
keyword argument sets it.
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
    def __init__(self, cfg: dict, source: str, flags: dict[str, str] | None = None):
        self.cfg, self.source, self.flags = cfg, source, flags or {}

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
            flag = self.flags.get(flag, flag)
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
                      warmup_steps: int | None = None, max_steps: int | None = None,
                      flags: dict[str, str] | None = None,
                      unresolved_hint: str = "the run does not determine it; write a value in the file",
                      source: str | None = None) -> dict:
    """A complete DeepSpeed config dict for this run (the input is not modified).

    ``flags`` renames the run's options in the messages (``{"--lr": "lr"}`` for a caller whose
    option is a keyword argument), ``unresolved_hint`` ends the message for an "auto" that
    nothing fills, ``source`` names the config in messages."""
    if isinstance(config, dict):
        cfg, source = copy.deepcopy(config), source or "DeepSpeed config"
    else:
        cfg, source = load_ds_config(config), source or str(config)
    for key in [k for k in cfg if k.startswith("_")]:
        del cfg[key]  # "_comments": JSON has no comments, the presets document fields there
    r = _Resolver(cfg, source, flags)

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
        hint = ("set these fields to \"auto\"" if flags is None else
                "make them agree, or set them to \"auto\"")
        raise DsConfigError(
            f"{source}: train_batch_size {cfg['train_batch_size']} != "
            f"train_micro_batch_size_per_gpu {cfg['train_micro_batch_size_per_gpu']} x "
            f"gradient_accumulation_steps {cfg['gradient_accumulation_steps']} x world size "
            f"{world_size}; {hint}")
    left = _leftover_autos(cfg)
    if left:
        raise DsConfigError(f"{source}: {left[0]} is \"auto\" but {unresolved_hint}")
    return cfg


BATCH_FIELDS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
_BATCH_HINT = {
    "train_batch_size": "samples per optimizer step over all ranks",
    "train_micro_batch_size_per_gpu": "samples per rank per forward/backward",
    "gradient_accumulation_steps": "micro-batches per TrainStep call",
}
# how initialize()'s inputs are named in resolve_ds_config's messages
_INITIALIZE_FLAGS = {"--batch-size": "train_batch_size", "--micro-batch-size": "train_micro_batch_size_per_gpu",
                     "--grad-accum": "gradient_accumulation_steps", "--max-grad-norm": "gradient_clipping",
                     "--lr": "lr", "weight decay": "weight_decay", "--bf16": "bf16 (from the model dtype)"}
_OPTIMIZER_KEYS = ("lr", "betas", "eps", "weight_decay")


def has_auto(config: dict) -> bool:
    """Whether any field of the config (``_comments`` aside) is "auto"."""
    return bool(_leftover_autos({k: v for k, v in config.items() if not k.startswith("_")}))


def _lookup(cfg: dict, path: str, default: Any = None) -> Any:
    node: Any = cfg
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def _positive_int(value: Any, name: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DsConfigError(f"{source}: {name} must be a positive integer, got {json.dumps(value)}")
    return value


def _resolve_batch(cfg: dict, given: dict, world_size: int, source: str) -> dict:
    """(train_batch_size, micro batch, accumulation) from the config's concrete values and the
    keyword arguments; one missing value is derived from the other two (DeepSpeed's rules)."""
    where = "the initialize() keyword argument"
    values, autos = {}, []
    for name in BATCH_FIELDS:
        in_cfg = cfg.get(name)
        kw = given.get(name)
        if kw is not None:
            kw = _positive_int(kw, f"{where} {name}", source)
        if in_cfg == AUTO:
            autos.append(name)
            in_cfg = None
        elif in_cfg is not None:
            in_cfg = _positive_int(in_cfg, name, source)
        if in_cfg is not None and kw is not None and in_cfg != kw:
            raise DsConfigError(f"{source}: {name} is {in_cfg} but initialize() got {name}={kw}; "
                                f"set it to \"auto\" in the config or drop the keyword argument")
        values[name] = kw if kw is not None else in_cfg
    tbs, micro, accum = (values[n] for n in BATCH_FIELDS)
    if accum is None and "gradient_accumulation_steps" not in cfg and (tbs is None or micro is None):
        accum = 1  # DeepSpeed's rule when the config has no gradient_accumulation_steps
    if tbs is None and micro is not None and accum is not None:
        tbs = micro * accum * world_size
    elif micro is None and tbs is not None and accum is not None:
        if tbs % (accum * world_size) == 0:
            micro = tbs // (accum * world_size)
    elif accum is None and tbs is not None and micro is not None:
        if tbs % (micro * world_size) == 0:
            accum = tbs // (micro * world_size)
    resolved = dict(zip(BATCH_FIELDS, (tbs, micro, accum)))
    # what to ask for first: the micro batch, then the accumulation (train_batch_size follows)
    order = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
    for name in order:
        if resolved[name] is None and name in autos:
            others = ", ".join(f"{n}={resolved[n]}" for n in BATCH_FIELDS if n != name and resolved[n] is not None)
            raise DsConfigError(
                f"{source}: {name} is \"auto\" and initialize() cannot derive it"
                + (f" from {others} and world size {world_size}" if others else "")
                + f"; pass {name}=N ({_BATCH_HINT[name]}) to initialize() or write a value in the config")
    missing = [n for n in order if resolved[n] is None]
    if missing:
        raise DsConfigError(f"{source}: {missing[0]} is not set; pass {missing[0]}=N "
                            f"({_BATCH_HINT[missing[0]]}) to initialize() or write a value in the config")
    return resolved


def resolve_autos(config: dict, *, world_size: int, optimizer_defaults: dict | None = None,
                  bf16: bool = False, hidden_size: int | None = None,
                  train_batch_size: int | None = None, train_micro_batch_size_per_gpu: int | None = None,
                  gradient_accumulation_steps: int | None = None, gradient_clipping: float | None = None,
                  source: str = "DeepSpeed config") -> dict:
    """The config ``tram_dist.engines.deepspeed.initialize`` hands to DeepSpeed: every "auto"
    filled from what initialize knows (the input is not modified; a config without "auto" and
    without batch keyword arguments comes back as it was).

    * ``train_batch_size``, ``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps``:
      the keyword arguments, else the config's concrete values; one of the three may be left
      to derive from the other two and ``world_size`` (train = micro x accumulation x world).
    * ``gradient_clipping``: the keyword argument, else 0.0 (DeepSpeed does not clip; clip
      with ``TrainStep(max_grad_norm=...)``, as the launcher does).
    * ``optimizer.params.{lr,betas,eps,weight_decay}``, ``scheduler.params.warmup_max_lr``:
      ``optimizer_defaults`` (the base optimizer's ``defaults``); a concrete value must agree.
    * ``bf16.enabled``: ``bf16`` (the model's dtype is bfloat16); ``fp16.enabled``: false.
    * the ZeRO bucket sizes: from ``hidden_size`` as in the launcher.

    Anything else left "auto" (a scheduler's step counts, ...) is a `DsConfigError` line naming
    the field."""
    batch_kwargs = {"train_batch_size": train_batch_size,
                    "train_micro_batch_size_per_gpu": train_micro_batch_size_per_gpu,
                    "gradient_accumulation_steps": gradient_accumulation_steps}
    given = {k: v for k, v in batch_kwargs.items() if v is not None}
    if not has_auto(config) and not given and gradient_clipping is None:
        return copy.deepcopy(config)
    cfg = {k: copy.deepcopy(v) for k, v in config.items() if not k.startswith("_")}
    batch = _resolve_batch(cfg, given, world_size, source)

    clip = _lookup(cfg, "gradient_clipping")
    if gradient_clipping is not None:
        clip = float(gradient_clipping)
    elif clip == AUTO:
        clip = 0.0
    elif clip is None:
        clip = 1.0  # DeepSpeed's default, written out (resolve_ds_config writes the field)

    defaults = dict(optimizer_defaults or {})
    opt = {}
    for key in _OPTIMIZER_KEYS:
        value = defaults.get(key)
        if value is None:
            current = _lookup(cfg, f"optimizer.params.{key}")
            if current == AUTO:  # the base optimizer has no such option: the section is unused
                del cfg["optimizer"]["params"][key]
                current = None
            value = current
        elif hasattr(value, "item"):  # a tensor lr
            value = value.item()
        opt[key] = tuple(value) if key == "betas" and value is not None else value
    if opt["lr"] is None and _lookup(cfg, "scheduler.params.warmup_max_lr") == AUTO:
        raise DsConfigError(f"{source}: scheduler.params.warmup_max_lr is \"auto\" but the base optimizer "
                            "has no lr; write a value in the config")

    bf16_cfg = _lookup(cfg, "bf16.enabled")
    use_bf16 = bool(bf16) if bf16_cfg == AUTO or bf16_cfg is None else bool(bf16_cfg)
    return resolve_ds_config(
        cfg, global_batch_size=batch["train_batch_size"],
        micro_batch_size=batch["train_micro_batch_size_per_gpu"],
        grad_accum=batch["gradient_accumulation_steps"], world_size=world_size,
        lr=opt["lr"] if opt["lr"] is not None else 0.0,
        betas=opt["betas"] if opt["betas"] is not None else (0.9, 0.999),
        eps=opt["eps"] if opt["eps"] is not None else 1e-8,
        weight_decay=opt["weight_decay"] if opt["weight_decay"] is not None else 0.0,
        max_grad_norm=clip, bf16=use_bf16, hidden_size=hidden_size, flags=_INITIALIZE_FLAGS,
        unresolved_hint="initialize() cannot determine it; write a value in the config", source=source)


def zero_stage(cfg: dict) -> int:
    """The ZeRO stage of a (resolved) config; 0 when it has no zero_optimization section."""
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


# What the TRAM ZeRO engine (tram_dist.engines.deepspeed) runs beyond plain ZeRO-1/2/3 in fp32 or
# bf16; the errors for what it does not run name it.
OFFLOAD_WORKS = ('what works: zero_optimization.offload_optimizer.device "cpu" under ZeRO-1/2/3 and '
                 'offload_param.device "cpu" under ZeRO-3 (configs/zero3_offload.json)')
FP16_ZERO3_ERROR = ("fp16 with ZeRO-3 is not supported by the TRAM ZeRO engine: its fp16 path (DeepSpeed's "
                    "overflow check after pass 1, pass 1's gradients unscaled for the ascent) is written for "
                    "ZeRO-1/2's partition gradients, not ZeRO-3's flat gradient buffer; use fp16 with ZeRO "
                    "stage 1 or 2, or bf16 (--bf16) with ZeRO-3")


def _offload_device(zero: dict, key: str) -> str:
    device = (zero.get(key) or {}).get("device", "none")
    return "none" if device is None else str(device)


def offloads_optimizer(cfg: dict) -> bool:
    """Whether the config offloads the optimizer (its fp32 master and state) to the CPU or NVMe."""
    return _offload_device(cfg.get("zero_optimization") or {}, "offload_optimizer") != "none"


def zero_support_error(cfg: dict, source: str = "DeepSpeed config", *, ds_cpu_optimizer: bool = False) -> str | None:
    """One line naming what the TRAM ZeRO engine cannot run in this (resolved) config, or None.

    Supported: ZeRO-1/2/3 in fp32 or bf16; optimizer offload to the CPU (the fp32 master, its
    gradient and the base optimizer's state in host memory) under every stage; parameter
    offload to the CPU under ZeRO-3; fp16 with DeepSpeed's dynamic (or static) loss scaling
    under ZeRO-1/2. ``ds_cpu_optimizer``: the client optimizer is DeepSpeed's own CPU optimizer
    (``DeepSpeedCPUAdam``), which ``zero_force_ds_cpu_optimizer`` allows."""
    stage = zero_stage(cfg)
    zero = cfg.get("zero_optimization") or {}
    optimizer_device = _offload_device(zero, "offload_optimizer")
    param_device = _offload_device(zero, "offload_param")
    if optimizer_device not in ("none", "cpu"):
        return (f"{source}: zero_optimization.offload_optimizer.device is {optimizer_device!r}; the TRAM ZeRO "
                f"engine reads the fp32 master every step and offloads it to host memory only; {OFFLOAD_WORKS}")
    if param_device not in ("none", "cpu"):
        return (f"{source}: zero_optimization.offload_param.device is {param_device!r}; the TRAM ZeRO engine "
                f"writes the working partitions every step and offloads them to host memory only; "
                f"{OFFLOAD_WORKS}")
    if param_device == "cpu" and stage != 3:
        return (f"{source}: zero_optimization.offload_param needs ZeRO stage 3 (the stage is {stage}); "
                f"{OFFLOAD_WORKS}")
    if optimizer_device == "cpu" and cfg.get("zero_force_ds_cpu_optimizer") is True and not ds_cpu_optimizer:
        return (f"{source}: zero_force_ds_cpu_optimizer is true, but tram_dist steps a torch AdamW client "
                "optimizer (wrapped by TRAM) on the offloaded fp32 master, which DeepSpeed then refuses; "
                "set zero_force_ds_cpu_optimizer to false")
    if (cfg.get("fp16") or {}).get("enabled") is True and stage == 3:
        return f"{source}: {FP16_ZERO3_ERROR}"
    return None
