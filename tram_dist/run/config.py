"""``RunConfig``: every setting of a fine-tuning run, typed, documented and validated in one place.

    config = RunConfig.from_yaml("configs/gpt2_s2orc_math.yaml", method="sam", max_steps=100)
    config = RunConfig(model="tiny", method="tram-theta-prev", max_steps=50, output_dir="runs/a")

The field names are the launcher's flags with ``_`` for ``-`` (``lr`` is ``--lr``), and a preset
in ``configs/`` is a YAML mapping of these fields. ``validate()`` checks every field on its own
and against the others; an error is a ``ConfigError`` whose one line starts with the field.
Checks that need the data, the model's config or the world size (block size against the
context, batch layout, DeepSpeed file) are made by ``Run`` before any data is tokenized.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from ..methods import METHODS

ENGINES = ("auto", "single", "ddp", "fsdp2", "zero1", "zero2", "zero3")
# what build_method / TrainStep take from method_args
METHOD_ARGS = ("rho", "eta", "nu", "radius_scale", "logit_scale", "lam", "decay", "noise", "eps",
               "on_nonfinite", "divergence")
# preset keys of the launcher's earlier presets (its flag names) and what they are now
ALIASES = {"deepspeed": "deepspeed_config", "method_arg": "method_args"}


class ConfigError(ValueError):
    """A bad setting: one line that names the field and the fix."""

    def __init__(self, name: str, message: str):
        self.field = name
        super().__init__(f"{name}: {message}")


def _doc(text: str, **extra) -> dict:
    return {"doc": text, **extra}


def opt(default, doc: str, **extra):
    """A field with its documentation (``RunConfig.describe()``, the launcher's --help)."""
    if isinstance(default, (list, dict, tuple)) and not isinstance(default, tuple):
        return field(default_factory=lambda: type(default)(default), metadata=_doc(doc, **extra))
    return field(default=default, metadata=_doc(doc, **extra))


@dataclass
class RunConfig:
    """One fine-tuning run (see the module docstring). Fields are grouped as the issue of the
    run lists them: model, data, method, engine and batch, schedule, evaluation, checkpoints."""

    # --- model --------------------------------------------------------------------------------
    model: str = opt("tiny", "'tiny' (a GPT-2 config sized to the shipped tokenizer, random "
                     "init) or a Hugging Face name / local folder for from_pretrained (the "
                     "shipped pretrained tiny model: tram_dist.data.pretrained.PRETRAINED_TINY)")
    dropout: Optional[float] = opt(None, "override every dropout probability of the model config "
                                   "(GPT-2: resid/embd/attn_pdrop); None keeps the config's own")
    gradient_checkpointing: bool = opt(False, "activation checkpointing (recompute each block's "
                                       "activations in backward; same results, less memory)")
    # --- data ---------------------------------------------------------------------------------
    data_dir: Optional[str] = opt(None, "local M2D2-layout folder {domain}/{train,valid,test}.txt")
    hub: bool = opt(False, "download machelreid/m2d2 from the Hugging Face hub")
    cache_dir: Optional[str] = opt(None, "token cache and extracted archives (default "
                                   "$TRAM_DIST_CACHE or ~/.cache/tram_dist)")
    train_domain: Optional[str] = opt(None, "domain to fine-tune on (embedded corpus default: math)")
    eval_domains: Optional[list] = opt(None, "domains to evaluate (the training domain is added "
                                       "first if missing); None: every local domain", item=str)
    eval_split: str = opt("test", "split of the results table", choices=("valid", "test"))
    # --- method -------------------------------------------------------------------------------
    method: str = opt("tram-theta-prev", "training method", choices=METHODS)
    sigma: float = opt(1e-5, "input-noise std of tram-x, tram-fisher, r3f, tram-released-x")
    method_args: dict = opt({}, "method options: " + ", ".join(METHOD_ARGS))
    target_dropout: str = opt("shared", "dropout of the trust-region target forward: 'shared' "
                              "reuses the pass-1 masks (d measures the trust region, not dropout "
                              "noise), 'off' runs it in eval mode, 'independent' draws fresh masks",
                              choices=("shared", "off", "independent"))
    divergence_fraction: float = opt(1.0, "compute d on this fraction of the sequences of each step")
    # --- engine, precision, batch ---------------------------------------------------------------
    engine: str = opt("auto", "single, ddp, fsdp2, zero1, zero2 or zero3; auto: zero<stage> with "
                      "deepspeed_config, else ddp under torchrun, else single", choices=ENGINES)
    hsdp_replicas: int = opt(1, "fsdp2 only: replicate over this many groups of ranks and shard "
                             "within each (HSDP; e.g. nodes x GPUs per node); 1 = plain FSDP2")
    deepspeed_config: Optional[str] = opt(None, "DeepSpeed config file for the zero engines "
                                          "(configs/zero*.json; default: the stage alone)")
    zero_init: bool = opt(True, "zero3: build the model partitioned from the start "
                          "(deepspeed.zero.Init; from_pretrained loads into the partitions)")
    bf16: bool = opt(False, "bf16 autocast for the passes (FSDP2: bf16 compute copies)")
    batch_size: int = opt(16, "GLOBAL blocks per optimizer step")
    micro_batch_size: Optional[int] = opt(None, "blocks per device per forward (default: derived)")
    grad_accum: Optional[int] = opt(None, "micro-batches per optimizer step (default: derived)")
    eval_batch_size: int = opt(8, "blocks per device per evaluation forward")
    block_size: Optional[int] = opt(None, "tokens per block (default: the model's context)")
    # --- schedule -----------------------------------------------------------------------------
    lr: float = opt(2e-5, "peak learning rate")
    betas: tuple = opt((0.9, 0.99), "Adam betas (beta1, beta2)", item=float, length=2)
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: Optional[float] = opt(None, "clip the descent gradient (None: off)")
    warmup_steps: int = opt(0, "linear warmup steps, then linear decay to lr_end")
    max_steps: int = opt(1000, "optimizer steps (0: evaluate only)")
    seed: int = opt(0, "model init, batch order, input noise, dropout")
    nonfinite: str = opt("stop", "on a NaN or infinite loss or gradient: 'stop' the run (exit 3, "
                         "nothing exported), or 'skip' the step (theta restored, no update; counted "
                         "in metrics.jsonl and eval.json; one more small all-reduce per step)",
                         choices=("stop", "skip"))
    max_skipped_steps: int = opt(10, "nonfinite skip: stop after this many skipped steps in a row "
                                 "(a diverged run does not recover by skipping)")
    # --- evaluation, checkpoints, output ---------------------------------------------------------
    eval_interval: int = opt(0, "evaluate every N steps (0: only at the end)")
    analysis: bool = opt(False, "after training, the paper's Table 5 analysis (epsilon-sharpness, "
                         "CKA to the start) per evaluation domain, under every engine")
    output_dir: str = opt("runs/m2d2", "metrics, evaluations, checkpoints and final/")
    report_to: list = opt(["none"], "also log the step metrics and evaluations to: none, "
                          "tensorboard (output_dir/tensorboard), wandb", item=str)
    save_interval: int = opt(0, "checkpoint every N steps (0: never)")
    keep_checkpoints: int = opt(2, "checkpoints kept (the newest)")
    resume: Optional[str] = opt(None, "a checkpoint folder, or 'latest' in output_dir")
    overwrite: bool = opt(False, "replace what output_dir holds (else a used one is refused)")
    allow_config_change: bool = opt(False, "on resume, continue although lr, schedule, method, "
                                    "batch or data differ (recorded in config_changes.jsonl)")

    # ---------------------------------------------------------------------------------------
    @classmethod
    def describe(cls) -> dict[str, str]:
        """Field name -> its documentation."""
        return {f.name: f.metadata["doc"] for f in fields(cls)}

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "RunConfig":
        """Fields from a mapping (a parsed preset), each coerced to its type; unknown keys and
        bad values are a ``ConfigError`` naming the key and ``source``."""
        known = {f.name: f for f in fields(cls)}
        clean: dict[str, Any] = {}
        for key, value in values.items():
            name = ALIASES.get(str(key).replace("-", "_"), str(key).replace("-", "_"))
            if name == "fsdp":  # the launcher's --fsdp in an earlier preset
                if value:
                    clean["engine"] = "fsdp2"
                continue
            if name not in known:
                raise ConfigError(str(key), f"unknown field in {source}; fields are "
                                  f"{', '.join(known)}")
            clean[name] = coerce(known[name], value, source)
        return cls(**clean)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides) -> "RunConfig":
        """A preset (``configs/*.yaml``), with ``overrides`` on top. Relative paths in it
        (``data_dir``, ``deepspeed_config``) are taken from the current folder when they
        exist there, else from the preset's folder or its parent (the repository root)."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ConfigError("config", f"{path} does not exist; pass a file such as configs/tiny.yaml")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError("config", f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise ConfigError("config", f"{path} must be a mapping of field: value")
        config = cls.from_dict(values, source=str(path))
        for name in ("data_dir", "deepspeed_config"):
            value = getattr(config, name)
            if isinstance(value, str):
                setattr(config, name, _preset_path(value, path.parent))
        return dataclasses.replace(config, **overrides) if overrides else config

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------------------------------
    def validate(self) -> "RunConfig":
        """Every check that needs nothing but the config; returns self."""
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ConfigError(f.name, f"{value!r} is not one of {', '.join(choices)}")
        for name in ("max_steps", "warmup_steps", "eval_interval", "save_interval", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"{getattr(self, name)} must be >= 0")
        if self.max_steps and self.warmup_steps >= self.max_steps:
            raise ConfigError("warmup_steps", f"{self.warmup_steps} must be below max_steps "
                              f"{self.max_steps} (the schedule decays after the warmup)")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError("lr", f"{self.lr} must be a finite number > 0")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError("max_grad_norm", f"{self.max_grad_norm} must be > 0 (None disables it)")
        if self.method in ("tram-x", "tram-fisher", "r3f", "asam+r3f", "tram-released-x") and not self.sigma > 0:
            raise ConfigError("sigma", f"{self.sigma} must be > 0 for {self.method}")
        if self.max_skipped_steps < 1:
            raise ConfigError("max_skipped_steps", f"{self.max_skipped_steps} must be >= 1")
        if self.eval_batch_size < 1:
            raise ConfigError("eval_batch_size", f"{self.eval_batch_size} must be >= 1")
        if not 0 < self.divergence_fraction <= 1:
            raise ConfigError("divergence_fraction", f"{self.divergence_fraction} must be in (0, 1]")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ConfigError("dropout", f"{self.dropout} must be in [0, 1)")
        unknown = sorted(set(self.method_args) - set(METHOD_ARGS))
        if unknown:
            raise ConfigError("method_args", f"{unknown[0]!r} is not a method option; use "
                              f"{', '.join(METHOD_ARGS)}")
        if self.engine.startswith("zero") and self.deepspeed_config is None:
            pass  # the stage alone: Run writes the minimal DeepSpeed config
        if self.deepspeed_config is not None and self.engine in ("single", "ddp", "fsdp2"):
            raise ConfigError("deepspeed_config", f"given with engine {self.engine!r}; use engine "
                              "'auto' or 'zero1/2/3', or drop deepspeed_config")
        if self.deepspeed_config is not None and not Path(self.deepspeed_config).is_file():
            raise ConfigError("deepspeed_config", f"{self.deepspeed_config} does not exist; pass "
                              "a file such as configs/zero2.json")
        for name in self.report_to:
            if name not in ("none", "tensorboard", "wandb"):
                raise ConfigError("report_to", f"{name!r} is not one of none, tensorboard, wandb")
        if self.hsdp_replicas < 1:
            raise ConfigError("hsdp_replicas", f"{self.hsdp_replicas} must be >= 1")
        if self.hsdp_replicas > 1 and self.engine != "fsdp2":
            raise ConfigError("hsdp_replicas", f"{self.hsdp_replicas} needs engine fsdp2 (HSDP is "
                              "FSDP2 on a (replicate, shard) mesh), not {self.engine!r}")
        if self.analysis and self.hsdp_replicas > 1:
            raise ConfigError("analysis", "epsilon-sharpness is not available under HSDP "
                              "(hsdp_replicas > 1) yet; drop analysis or hsdp_replicas")
        if self.data_dir and self.hub:
            raise ConfigError("hub", "and data_dir both given; pick one data source")
        if self.eval_domains is not None and len(set(self.eval_domains)) != len(self.eval_domains):
            raise ConfigError("eval_domains", f"lists a domain twice: {' '.join(self.eval_domains)}")
        return self

    def method_options(self) -> dict:
        """``method_args`` as build_method / TrainStep take them."""
        return dict(self.method_args)


def _preset_path(value: str, base: Path) -> str:
    if os.path.isabs(value) or os.path.exists(value):
        return value
    for root in (base, base.parent):
        if (root / value).exists():
            return str(root / value)
    return value


def _number(value, kind, name: str, source: str):
    if isinstance(value, bool):
        raise ConfigError(name, f"{value!r} in {source} is not a valid {kind.__name__}")
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ConfigError(name, f"{value!r} in {source} is not a whole number")
    try:  # also the strings YAML 1.1 makes of 2e-5 (no dot)
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(name, f"{value!r} in {source} is not a valid {kind.__name__}") from None


def _parse_scalar(text: str):
    """A method option's value from ``KEY=VALUE`` text: YAML scalars, numbers as numbers."""
    import yaml

    value = yaml.safe_load(text)
    if isinstance(value, str):  # YAML 1.1 reads 1e2 (no dot) as a string: a number was meant
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_method_args(pairs) -> dict:
    """``["rho=0.05", "noise=uniform"]`` (the launcher's --method-arg) -> a dict."""
    out = {}
    for pair in pairs:
        if "=" not in str(pair):
            raise ConfigError("method_args", f"{pair!r} must be KEY=VALUE, e.g. rho=0.05")
        key, value = str(pair).split("=", 1)
        out[key.strip().replace("-", "_")] = _parse_scalar(value)
    return out


def coerce(f: dataclasses.Field, value, source: str = "config"):
    """``value`` as field ``f`` holds it (the YAML / flag text checked like a typed field)."""
    name, meta = f.name, f.metadata
    if value is None:
        return None
    if name == "method_args":
        if isinstance(value, (list, tuple)):
            return parse_method_args(value)
        if not isinstance(value, dict):
            raise ConfigError(name, f"in {source} must be a mapping of option: value")
        return {str(k).replace("-", "_"): v for k, v in value.items()}
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(name, f"in {source} must be true or false, not {value!r}")
        return value
    if "item" in meta:  # a list (eval_domains) or a fixed-length tuple (betas)
        items = value if isinstance(value, (list, tuple)) else [value]
        if "length" in meta and len(items) != meta["length"]:
            raise ConfigError(name, f"in {source} takes {meta['length']} values")
        items = [_number(v, meta["item"], name, source) if meta["item"] is not str else str(v) for v in items]
        return tuple(items) if "length" in meta else items
    if isinstance(value, (list, tuple, dict)):
        raise ConfigError(name, f"in {source} takes one value, not a list")
    kind = {"int": int, "float": float}.get(_hint(f), str)
    value = _number(value, kind, name, source) if kind is not str else str(value)
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(name, f"{value!r} is not one of {', '.join(map(str, meta['choices']))}")
    return value


def _hint(f: dataclasses.Field) -> str:
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return text.removeprefix("Optional[").removesuffix("]")


__all__ = ["RunConfig", "ConfigError", "ENGINES", "METHOD_ARGS", "coerce", "parse_method_args"]
