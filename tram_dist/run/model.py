"""The run's model: its config (cheap, checked before any data work) and its weights."""
from __future__ import annotations

import torch

from ..data.pretrained import tiny_config
from ..dropout import set_dropout
from .config import ConfigError


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def model_config(name: str, tokenizer, dropout: float | None = None):
    """The config of ``name`` ('tiny', a hub name or a local folder), with ``dropout`` applied."""
    from transformers import AutoConfig

    if name == "tiny":
        config = tiny_config(tokenizer)
    else:
        try:
            config = AutoConfig.from_pretrained(name)
        except (OSError, ValueError) as e:
            raise ConfigError("model", f"cannot load the config of {name!r} ({first_line(e)}); "
                              "offline: pass a local model folder (or set HF_HUB_OFFLINE=1 to use "
                              "the hub cache), or 'tiny'") from e
    if dropout is not None:
        try:
            set_dropout(config, dropout)
        except ValueError as e:
            raise ConfigError("dropout", str(e)) from e
    return config


def context_length(config) -> int | None:
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def build_model(name: str, config, seed: int, gradient_checkpointing: bool = False,
                zero3_config: dict | None = None):
    """The model, identically initialised on every rank (``seed``), fp32.

    ``zero3_config`` (a resolved ZeRO-3 DeepSpeed config): built partitioned from the start
    (``deepspeed.zero.Init``), so no rank ever holds the whole model; ``from_pretrained`` loads
    the weights into the partitions. The returned model keeps the ``HfDeepSpeedConfig`` that
    tells transformers so (it must live as long as the model)."""
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    hf_deepspeed = None
    if zero3_config is not None:
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        deepspeed.init_distributed()  # zero.Init reads the world size from deepspeed.comm
        hf_deepspeed = HfDeepSpeedConfig(zero3_config)  # while alive: transformers builds under zero.Init
    torch.manual_seed(seed)
    if name == "tiny":
        model = (AutoModelForCausalLM.from_config(config, dtype=torch.float32) if hf_deepspeed
                 else GPT2LMHeadModel(config))
    else:
        from safetensors import SafetensorError

        try:
            model = AutoModelForCausalLM.from_pretrained(name, config=config, dtype=torch.float32)
        except (OSError, ValueError, SafetensorError) as e:
            raise ConfigError("model", f"cannot load {name!r} ({first_line(e)}); a truncated or "
                              "damaged weights file must be downloaded or copied again; offline: "
                              "pass a local model folder, or 'tiny'") from e
    model._tram_hf_deepspeed = hf_deepspeed
    # training builds no KV cache: it is never read, costs memory, and its contiguous copies
    # of the keys and values round differently from a checkpointed block's (which has none)
    if getattr(model.config, "use_cache", None) is not None:
        model.config.use_cache = False
    if gradient_checkpointing:  # before any engine wraps it
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


__all__ = ["model_config", "context_length", "build_model", "first_line"]
