"""Fine-tune a causal LM on one M2D2 domain with TRAM (or a baseline); report zero-shot perplexity.

Single process (CPU or one GPU; the offline preset runs in a few minutes on a laptop CPU):
    python launch/train_m2d2.py                          # no arguments: configs/tiny.yaml
    python launch/train_m2d2.py --config configs/tiny.yaml
    python launch/train_m2d2.py --config configs/tiny.yaml --method sam --output-dir runs/tiny-sam
    python launch/train_m2d2.py --config configs/tiny.yaml --max-steps 0   # zero-shot baseline row

One node, N GPUs, DistributedDataParallel:
    torchrun --nproc_per_node N launch/train_m2d2.py --config configs/gpt2_s2orc_math.yaml

One node, N GPUs, DeepSpeed ZeRO-2 (also zero1.json, zero3.json; bf16 follows --bf16):
    deepspeed --num_gpus N launch/train_m2d2.py --deepspeed configs/zero2.json \\
        --config configs/gpt2_s2orc_math.yaml

One node, N GPUs, FSDP2 (fully_shard per transformer block, then the root; --bf16: bf16 compute
copies, fp32 sharded masters and gradient reduction):
    torchrun --nproc_per_node N launch/train_m2d2.py --fsdp --config configs/gpt2_s2orc_math.yaml

On CPU (gloo) the same commands run with DS_ACCELERATOR=cpu (and --num_gpus N given explicitly
to deepspeed); `python launch/train_m2d2.py --fsdp` / `--deepspeed FILE` is a world of one.
--fsdp under the deepspeed launcher is an error. The engines live in tram_dist/runs.py;
--max-grad-norm is applied by the TRAM step under every engine (DeepSpeed's own
gradient_clipping is set to 0), and the LR schedule is stepped here once per optimizer step.

Two nodes (run on each node, R = 0 or 1, H:P = host and port of node 0; --output-dir and
--cache-dir must be on a shared file system, or each node tokenizes into its own cache):
    torchrun --nnodes 2 --node_rank R --nproc_per_node 8 --rdzv-backend c10d \\
        --rdzv-endpoint H:P launch/train_m2d2.py --config configs/gpt2_s2orc_math.yaml

The paper's GPT2-XL run (Table 9: 4 GPUs x 4 blocks x 1024 tokens, 100K steps):
    deepspeed --num_gpus 4 launch/train_m2d2.py --config configs/gpt2xl_s2orc_math.yaml

Offline M2D2 (no hub access): unpack the archives to DIR/{domain}/{train,valid,test}.txt and
pass --data-dir DIR instead of --hub.

--batch-size is GLOBAL (blocks per optimizer step); the per-device micro-batch and the
accumulation steps follow from it and the world size (or from --micro-batch-size /
--grad-accum). Flags override the --config preset. Output in --output-dir: metrics.jsonl
(one line per step), evals.jsonl, eval.json / eval.md (the evaluation selected by the
training domain's validation perplexity, as in the paper), config.yaml (the resolved run),
checkpoint-*/ (every --save-interval steps, last --keep-checkpoints kept; --resume under the
engine that wrote it, ZeRO on the same number of ranks) and final/ (save_pretrained,
safetensors, full fp32 weights written by rank 0 under every engine).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tram_dist.data import (DataError, EvalLoader, TokenCache, TrainLoader, batch_layout,
                            embedded_source, eval_blocks, load_tokenizer, resolve_source,
                            train_blocks)
from tram_dist.data.m2d2 import LocalSource
from tram_dist.ds_config import DsConfigError, resolve_ds_config
from tram_dist.evaluate import (eval_summary, evaluate_domains, evaluate_loss, json_safe,
                                write_eval_json, write_eval_md)
from tram_dist.data.pretrained import tiny_config
from tram_dist.dropout import set_dropout
from tram_dist.methods import METHODS
from tram_dist.runs import RunError, build_run, check_ds_config, parameters_finite
from tram_dist.checkpoint_files import (CheckpointError, check_same_run, checkpoints, find_resume,
                                        prune, remove_temporaries, write_manifest)
from tram_dist.safe_load import UnsafeCheckpointError, load_tensors

LR_END = 1e-7  # polynomial decay's final lr (Hugging Face's default for this schedule)
LR_POWER = 1.0  # polynomial decay power (1 = linear decay, HF and fairseq default)
METHOD_ARGS = ("rho", "eta", "nu", "radius_scale", "logit_scale", "lam", "decay", "noise", "eps",
               "on_nonfinite", "divergence")


class UsageError(ValueError):
    """A bad flag or preset; printed as one line, no traceback."""


# ---------------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--config", help="YAML run preset (configs/*.yaml); flags given here override it")
    a("--model", default="tiny", help="'tiny' (offline GPT-2 config sized to the shipped "
      "tokenizer, random init) or a Hugging Face name / local folder for from_pretrained")
    a("--method", default="tram-theta-prev", choices=METHODS, help="training method")
    a("--sigma", type=float, default=1e-5, help="input-noise std for tram-x / tram-fisher")
    a("--method-arg", action="append", default=[], metavar="KEY=VALUE",
      help="method option: rho, eta, nu, radius_scale, logit_scale (tram-released-*), lam (a "
      "regularizer's weight), decay (MESA's "
      "EMA), noise (normal|uniform), divergence (kl, kl-reverse, kl-symmetric, l2, mmd); repeatable")
    a("--target-dropout", default="shared", choices=("shared", "off", "independent"),
      help="dropout in the trust-region target forward: 'shared' reuses the masks of the pass-1 "
      "forward it is compared with (d measures the trust region, not dropout noise), 'off' "
      "runs it in eval mode, 'independent' draws fresh masks (the authors' code)")
    a("--divergence-fraction", type=float, default=1.0, help="compute d on this fraction of the "
      "sequences of each step (deterministic, world-size independent); 1 = all")
    a("--analysis", action="store_true", default=False, help="after training, add the paper's "
      "Table 5 analysis to eval.json / eval.md: epsilon-sharpness of the final model and the CKA "
      "of its final hidden states to the starting model, per evaluation domain (single, DDP, FSDP2)")
    a("--dropout", type=float, default=None, help="override every dropout probability of the "
      "model config (GPT-2: resid/embd/attn_pdrop); default: the config's own")
    a("--data-dir", help="local M2D2-layout folder {domain}/{train,valid,test}.txt")
    a("--hub", action="store_true", default=False, help="download machelreid/m2d2 from the hub")
    a("--cache-dir", help="token cache and extracted archives (default $TRAM_DIST_CACHE or "
      "~/.cache/tram_dist)")
    a("--train-domain", help="domain to fine-tune on (default with the embedded corpus: math)")
    a("--eval-domains", nargs="+", help="domains to evaluate (the training domain is added "
      "first if missing); default: every domain of the embedded corpus / --data-dir")
    a("--eval-split", default="test", choices=("valid", "test"), help="split for the table")
    a("--batch-size", type=int, default=16, help="GLOBAL blocks per optimizer step")
    a("--micro-batch-size", type=int, help="blocks per device per forward (default: derived)")
    a("--grad-accum", type=int, help="micro-batches per optimizer step (default: derived)")
    a("--eval-batch-size", type=int, default=8, help="blocks per device per evaluation forward")
    a("--block-size", type=int, help="tokens per block (default: the model's context)")
    a("--lr", type=float, default=2e-5, help="peak learning rate")
    a("--betas", type=float, nargs=2, default=(0.9, 0.99), help="Adam betas")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    a("--max-grad-norm", type=float, default=None, help="clip the descent gradient (default off)")
    a("--warmup-steps", type=int, default=0, help="linear warmup steps")
    a("--max-steps", type=int, default=1000, help="optimizer steps (0: evaluate only)")
    a("--seed", type=int, default=0, help="model init, batch order and input noise")
    a("--output-dir", default="runs/m2d2", help="where metrics, evals, checkpoints go")
    a("--eval-interval", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    a("--save-interval", type=int, default=0, help="checkpoint every N steps (0: never)")
    a("--keep-checkpoints", type=int, default=2, help="checkpoints kept (the newest)")
    a("--resume", nargs="?", const="latest", help="resume from a checkpoint folder, or the "
      "latest one in --output-dir when given without a value")
    a("--deepspeed", metavar="FILE", help="DeepSpeed config (configs/zero*.json)")
    a("--fsdp", action="store_true", default=False, help="shard with FSDP2 (fully_shard)")
    a("--bf16", action="store_true", default=False, help="bf16 autocast for the passes")
    a("--overwrite", action="store_true", default=False, help="replace what --output-dir holds "
      "(without it a used --output-dir is refused unless --resume)")
    a("--allow-config-change", action="store_true", default=False, help="with --resume: continue "
      "even if lr, schedule, method, batch or data differ from the checkpoint's (the change is "
      "recorded in config_changes.jsonl)")
    a("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    return p


def _yaml_path(value: str, base: Path) -> str:
    """Relative paths in a preset: from the current folder, else from the preset's repo root."""
    if os.path.isabs(value) or os.path.exists(value):
        return value
    for root in (base, base.parent):
        if (root / value).exists():
            return str(root / value)
    return value


def _coerce(action: argparse.Action, value, where: str):
    """A preset value checked like the flag would be (argparse leaves defaults unchecked)."""
    if value is None:
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise UsageError(f"{where} must be true or false, not {value!r}")
        return value
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int) or isinstance(action, argparse._AppendAction)
    items = value if isinstance(value, (list, tuple)) else [value]
    if not many and isinstance(value, (list, tuple)):
        raise UsageError(f"{where} takes one value, not a list")
    if isinstance(action.nargs, int) and len(items) != action.nargs:
        raise UsageError(f"{where} takes {action.nargs} values")
    out = []
    for item in items:
        if action.type is not None and not isinstance(item, bool):
            if action.type is int and isinstance(item, float) and not item.is_integer():
                raise UsageError(f"{where}: {item!r} is not a whole number")
            try:  # also turns the strings PyYAML makes of 2e-5 (no dot) into floats
                item = action.type(item)
            except (TypeError, ValueError):
                raise UsageError(f"{where}: {item!r} is not a valid {action.type.__name__}") from None
        elif action.type is None and not isinstance(item, str):
            item = str(item)
        if action.choices is not None and item not in action.choices:
            raise UsageError(f"{where}: {item!r} is not one of {', '.join(map(str, action.choices))}")
        out.append(item)
    return out if many else out[0]


TINY_PRESET = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # no arguments at all: the offline tiny preset, end to end in a few minutes
        argv = ["--config", str(TINY_PRESET)]
    first, _ = parser.parse_known_args(argv)
    if first.config:
        path = Path(first.config)
        if not path.is_file():
            raise UsageError(f"--config {path} does not exist; pass a file such as configs/tiny.yaml")
        import yaml

        try:
            preset = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UsageError(f"--config {path} is not valid YAML ({str(e).splitlines()[0]})") from e
        if not isinstance(preset, dict):
            raise UsageError(f"--config {path} must be a mapping of option: value")
        actions = {a.dest: a for a in parser._actions}
        clean = {}
        for key, value in preset.items():
            dest = str(key).replace("-", "_")
            if dest not in actions or dest in ("config", "help", "local_rank"):
                raise UsageError(f"--config {path}: unknown option {key!r}; options are the "
                                 "flags of launch/train_m2d2.py with '_' for '-'")
            value = _coerce(actions[dest], value, f"--config {path}: {key}")
            if dest in ("deepspeed", "data_dir") and isinstance(value, str):
                value = _yaml_path(value, path.parent)
            clean[dest] = value
        parser.set_defaults(**clean)
        args = parser.parse_args(argv)
        args.preset_keys = sorted(clean)
        return args
    args = parser.parse_args(argv)
    args.preset_keys = []
    return args


# ---------------------------------------------------------------------------------------------
# distributed setup
# ---------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(sharded: bool = False) -> Dist:
    """torch.distributed from the torchrun / deepspeed launcher environment: nccl on CUDA,
    gloo on CPU. A plain `python` start is a world of one without a process group, except for
    the sharded engines (--fsdp, --deepspeed), which get a process group of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu"  # DeepSpeed on CPU
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if (world > 1 or sharded) and not dist.is_initialized():
        # Long timeout: rank 0 tokenizes a domain once (1B tokens: tens of minutes) while the
        # other ranks wait in a collective.
        kwargs = {}
        if world == 1 and "MASTER_ADDR" not in os.environ:  # plain `python`: a group of one
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                kwargs = dict(init_method=f"tcp://127.0.0.1:{s.getsockname()[1]}", rank=0, world_size=1)
            os.environ.setdefault("LOCAL_RANK", "0")  # deepspeed.initialize asserts it
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=2), **kwargs)
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), local, device)
    return Dist(device=device)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
def model_config(name: str, tokenizer):
    """The model's config (cheap: no weights), used to validate --block-size before loading."""
    from transformers import AutoConfig

    if name == "tiny":
        return tiny_config(tokenizer)
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load the config of --model {name!r} ({_first_line(e)}); offline: "
                         "pass a local model folder (or set HF_HUB_OFFLINE=1 to use the hub "
                         "cache), or --model tiny") from e


def context_length(config) -> int | None:
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def build_model(name: str, config, seed: int):
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    torch.manual_seed(seed)  # identical init on every rank (DDP also broadcasts it)
    if name == "tiny":
        return GPT2LMHeadModel(config)
    try:
        return AutoModelForCausalLM.from_pretrained(name, config=config, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load --model {name!r} ({_first_line(e)}); offline: pass a local "
                         "model folder (or set HF_HUB_OFFLINE=1 to use the hub cache), or "
                         "--model tiny") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(run, out: Path, step: int, client_state: dict, d: Dist, keep: int,
                    run_settings: dict) -> Path:
    """All ranks call. Written under a temporary name, renamed when complete, oldest pruned."""
    final = out / f"checkpoint-{step:08d}"
    tmp = out / f".checkpoint-{step:08d}.tmp"
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / "engine.json").write_text(json.dumps({"engine": run.kind, "world_size": d.world_size}) + "\n")
    barrier()
    run.save_checkpoint(tmp, client_state)
    torch.save(_rng_state(), tmp / f"rng_rank{d.rank}.pt")
    barrier()
    if d.main:
        (tmp / "run.json").write_text(json.dumps(run_settings) + "\n")
        write_manifest(tmp)  # last: a folder without a valid manifest is incomplete
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune(out, keep)
    barrier()
    return final


FAMILY = {"single": "single/ddp", "ddp": "single/ddp", "fsdp": "fsdp", "deepspeed": "deepspeed"}


def check_resume(path: Path, kind: str, d: Dist) -> None:
    """A checkpoint resumes under the engine that wrote it (ZeRO: also the same world size)."""
    meta = path / "engine.json"
    if not meta.is_file():
        return
    saved = json.loads(meta.read_text())
    if FAMILY.get(saved.get("engine")) != FAMILY[kind]:
        raise UsageError(f"--resume {path} was written by the {saved.get('engine')} engine, this run is "
                         f"{kind}; resume with the same engine")
    if kind == "deepspeed" and saved.get("world_size") != d.world_size:
        raise UsageError(f"--resume {path} holds ZeRO state of {saved.get('world_size')} ranks, this run "
                         f"has {d.world_size}; resume on the same number of ranks")


def resume_point(resume: str, out: Path, d: Dist) -> Path:
    """The checkpoint to resume from; rank 0 verifies the manifests and tells the others."""
    path = None
    if d.main:
        required = ("engine.json", "run.json", *(f"rng_rank{r}.pt" for r in range(d.world_size)))
        try:
            path = str(find_resume(out, resume, required=required))
        except CheckpointError as e:
            path = "error: " + str(e)
    if dist.is_available() and dist.is_initialized():
        box = [path]
        dist.broadcast_object_list(box, src=0)  # a string between our own ranks
        path = box[0]
    if path.startswith("error: "):
        raise UsageError(path.removeprefix("error: "))
    return Path(path)


# What a resume must not change silently (the run's trajectory depends on it).
RUN_SETTINGS = ("model", "method", "method_arg", "sigma", "target_dropout", "dropout",
                "divergence_fraction", "lr", "betas",
                "weight_decay", "max_grad_norm", "warmup_steps", "max_steps", "batch_size", "block_size",
                "seed", "train_domain")


def run_settings(args, block_size: int) -> dict:
    out = {k: getattr(args, k) for k in RUN_SETTINGS if hasattr(args, k)}
    out["betas"], out["block_size"] = list(out["betas"]), block_size
    return out


# ---------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------
def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated by this process, or on CPU its peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _fmt(v: float) -> str:
    return f"{v:.2f}" if math.isfinite(v) else str(v)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Everything validated before the first step."""

    args: Any
    kind: str
    tokenizer: Any
    source: Any
    config: Any
    block_size: int
    micro: int
    accum: int
    eval_domains: list
    method_kwargs: dict
    ds_config: dict | None
    resume: Path | None


def _method_kwargs(pairs: list[str]) -> dict:
    import yaml

    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise UsageError(f"--method-arg {pair!r} must be KEY=VALUE, e.g. --method-arg rho=0.05")
        key, value = pair.split("=", 1)
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads 1e2 (no dot) as a string: a number was meant
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        out[key.strip().replace("-", "_")] = parsed
    unknown = set(out) - set(METHOD_ARGS)
    if unknown:
        raise UsageError(f"--method-arg {sorted(unknown)[0]} is not a method option; use "
                         f"{', '.join(METHOD_ARGS)}")
    return out


def launched_by_deepspeed(args) -> bool:
    """The deepspeed launcher passes --local_rank (torchrun does not) and sets CROSS_RANK."""
    return args.local_rank is not None or "CROSS_RANK" in os.environ


def check_engine_flags(args) -> None:
    """The engine flags against each other and the launcher (before any process group)."""
    if args.deepspeed and args.fsdp:
        raise UsageError("--deepspeed and --fsdp both given; pick one engine")
    if args.fsdp and launched_by_deepspeed(args):
        raise UsageError("--fsdp under the deepspeed launcher; start FSDP2 with torchrun --nproc_per_node "
                         "N launch/train_m2d2.py --fsdp, or pass --deepspeed configs/zero2.json")


def plan(args, d: Dist) -> Plan:
    """Check every input (flags, data, model config, batch layout, DeepSpeed preset)."""
    check_engine_flags(args)
    kind = "deepspeed" if args.deepspeed else "fsdp" if args.fsdp else "ddp" if d.world_size > 1 else "single"
    if args.analysis and kind == "deepspeed":
        raise UsageError("--analysis (epsilon-sharpness) runs on single-process, DDP and FSDP2 runs, "
                         "not under DeepSpeed; drop --analysis, or run the analysis with --fsdp")
    for name in ("max_steps", "warmup_steps", "eval_interval", "save_interval", "keep_checkpoints"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 0")
    if not args.lr > 0:
        raise UsageError(f"--lr {args.lr} must be > 0")
    if args.max_grad_norm is not None and not args.max_grad_norm > 0:
        raise UsageError(f"--max-grad-norm {args.max_grad_norm} must be > 0 (omit it to disable)")
    if args.method in ("tram-x", "tram-fisher") and not args.sigma > 0:
        raise UsageError(f"--sigma {args.sigma} must be > 0 for {args.method}")
    if args.eval_batch_size < 1:
        raise UsageError(f"--eval-batch-size {args.eval_batch_size} must be >= 1")
    method_kwargs = _method_kwargs(args.method_arg)

    if args.data_dir and args.hub and "hub" in args.preset_keys and "data_dir" not in args.preset_keys:
        args.hub = False  # --data-dir on the command line replaces the preset's hub download
    source = resolve_source(args.data_dir, args.hub, args.cache_dir)
    train_domain = args.train_domain
    if train_domain is None:
        if source.name != embedded_source().name:
            raise UsageError("--train-domain is required with --data-dir / --hub (e.g. math_l1 "
                             "or Society_and_social_sciences)")
        train_domain = json.loads((source.root / "manifest.json").read_text())["train_domain"]
    args.train_domain = train_domain
    if args.eval_domains:
        domains = [train_domain] + [x for x in args.eval_domains if x != train_domain]
    elif isinstance(source, LocalSource):
        domains = [train_domain] + [x for x in source.domains() if x != train_domain]
    else:
        raise UsageError("--eval-domains is required with --hub (Table 3 lists the 10 zero-shot "
                         "domains; see configs/gpt2_*.yaml)")
    if len(set(domains)) != len(domains):
        raise UsageError(f"--eval-domains lists a domain twice: {' '.join(domains)}")
    if isinstance(source, LocalSource):  # cheap checks on every rank; the hub is checked on load
        source.check(train_domain, ("train", "valid") if args.max_steps else ("valid",))
        for dom in domains:
            source.check(dom, (args.eval_split,))

    tokenizer = load_tokenizer(None if args.model == "tiny" else args.model)
    config = model_config(args.model, tokenizer)
    if args.dropout is not None:
        try:
            set_dropout(config, args.dropout)
        except ValueError as e:
            raise UsageError(f"--dropout {args.dropout}: {e}") from e
    context = context_length(config)
    block = args.block_size or context
    if block is None:
        raise UsageError(f"--model {args.model} does not state its context length; pass --block-size")
    if context is not None and block > context:
        raise UsageError(f"--block-size {block} exceeds the context of --model {args.model} "
                         f"({context} tokens); use --block-size {context} or less")
    if block < 2:
        raise UsageError(f"--block-size {block} must be at least 2")
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise UsageError(f"the tokenizer has {len(tokenizer)} tokens but --model {args.model} "
                         f"only {vocab} embeddings; use the model's own tokenizer")
    micro, accum = batch_layout(args.batch_size, d.world_size, args.micro_batch_size, args.grad_accum)

    ds_config = None
    if args.deepspeed:
        ds_config = resolve_ds_config(
            args.deepspeed, global_batch_size=args.batch_size, micro_batch_size=micro,
            grad_accum=accum, world_size=d.world_size, lr=args.lr, betas=tuple(args.betas),
            eps=method_kwargs.get("eps", 1e-8), weight_decay=args.weight_decay,
            max_grad_norm=args.max_grad_norm, bf16=args.bf16,
            hidden_size=getattr(config, "hidden_size", None))
        check_ds_config(ds_config, args.deepspeed)
        ds_config["gradient_clipping"] = 0.0  # checked against --max-grad-norm; the TRAM step clips
        if importlib.util.find_spec("deepspeed") is None:
            raise UsageError("--deepspeed needs the deepspeed package: pip install --no-build-isolation "
                             "deepspeed")
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out} is a file; pass a folder")
    if not args.resume and not args.overwrite and out.is_dir() and any(out.iterdir()):
        raise UsageError(f"--output-dir {out} already holds a run; pass --resume to continue it, "
                         "--overwrite to replace it, or another --output-dir")
    barrier()  # every rank has looked at --output-dir before rank 0 writes into it
    resume = resume_point(args.resume, out, d) if args.resume else None
    if resume is not None:
        check_resume(resume, kind, d)
        saved = json.loads((resume / "run.json").read_text())
        try:
            changed = check_same_run(saved, run_settings(args, block), allow_change=args.allow_config_change)
        except CheckpointError as e:
            raise UsageError(str(e)) from None
        args.config_changes = {k: [saved[k], run_settings(args, block)[k]] for k in changed}
    return Plan(args, kind, tokenizer, source, config, block, micro, accum, domains,
                method_kwargs, ds_config, resume)


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep the records of steps <= ``step`` (a resumed run redoes the ones after it)."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in kept))


class NonFiniteRun(RuntimeError):
    """A NaN or infinite loss or parameter: the run stops without exporting (exit code 3)."""


def stop_non_finite(out: Path, what: str) -> None:
    last = checkpoints(out)
    raise NonFiniteRun(f"{what}; training stopped and nothing was exported (no checkpoint holds NaN). "
                       f"Last good checkpoint: {last[-1] if last else 'none'}. Lower --lr or add "
                       "--max-grad-norm, then --resume or start again")


def write_resolved_config(p: Plan, d: Dist, out: Path) -> None:
    import yaml

    resolved = {k: v for k, v in vars(p.args).items()
                if k not in ("local_rank", "config", "preset_keys", "config_changes")}
    resolved["betas"] = list(resolved["betas"])
    resolved.update(block_size=p.block_size, micro_batch_size=p.micro, grad_accum=p.accum,
                    eval_domains=p.eval_domains)
    derived = {"preset": p.args.config, "engine": p.kind, "world_size": d.world_size,
               "source": p.source.name, "tokens_per_step": p.args.batch_size * p.block_size}
    text = ("# Resolved run (flags over preset over defaults); derived values under _derived.\n"
            + yaml.safe_dump({**resolved, "_derived": derived}, sort_keys=False))
    (out / "config.yaml").write_text(text)
    if p.ds_config is not None:
        (out / "ds_config.json").write_text(json.dumps(p.ds_config, indent=2) + "\n")


def train(p: Plan, d: Dist) -> dict:
    from tqdm import tqdm

    args = p.args
    out = Path(args.output_dir)
    if d.main:
        if args.overwrite and out.is_dir() and not args.resume:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        remove_temporaries(out)  # what an interrupted save left behind
        write_resolved_config(p, d, out)
        if getattr(args, "config_changes", None):
            with open(out / "config_changes.jsonl", "a") as f:
                f.write(json.dumps({"resumed_from": str(p.resume), "changed": args.config_changes}) + "\n")
    barrier()

    cache = TokenCache(p.tokenizer, args.cache_dir)
    loader = None
    if args.max_steps:
        loader = TrainLoader(train_blocks(p.source, cache, args.train_domain, p.block_size),
                             args.batch_size, p.micro, p.accum, seed=args.seed,
                             rank=d.rank, world_size=d.world_size)
    valid = EvalLoader(eval_blocks(p.source, cache, args.train_domain, "valid", p.block_size),
                       args.eval_batch_size, d.rank, d.world_size)
    tests = {dom: EvalLoader(eval_blocks(p.source, cache, dom, args.eval_split, p.block_size),
                             args.eval_batch_size, d.rank, d.world_size) for dom in p.eval_domains}

    module = build_model(args.model, p.config, args.seed)
    try:
        run = build_run(p.kind, module, dist=d, args=args, method_kwargs=p.method_kwargs,
                        ds_config=p.ds_config)
    except (ValueError, TypeError) as e:  # bad method options, checked by build_method / TrainStep
        if isinstance(e, (DataError, DsConfigError, UsageError)):
            raise
        if isinstance(e, RunError):
            raise UsageError(str(e)) from e
        raise UsageError(f"--method {args.method}: {_first_line(e)}") from e
    scheduler = None
    if args.max_steps:
        from transformers import get_polynomial_decay_schedule_with_warmup

        scheduler = get_polynomial_decay_schedule_with_warmup(
            run.optimizer, args.warmup_steps, args.max_steps, lr_end=min(LR_END, args.lr / 10),
            power=LR_POWER)
    torch.manual_seed(args.seed + d.rank)  # dropout streams differ per rank

    step, history = 0, []
    if p.resume is not None:
        client = run.load_checkpoint(p.resume)
        if client.get("method") != args.method:
            raise UsageError(f"--resume {p.resume} was written by --method {client.get('method')}, "
                             f"not {args.method}; resume with the same method")
        step, history = int(client["step"]), list(client.get("history", []))
        if loader is not None:
            loader.load_state_dict(client["data"])
        if scheduler is not None and client.get("scheduler"):
            scheduler.load_state_dict(client["scheduler"])
            if "lr" in getattr(args, "config_changes", {}):  # --allow-config-change: the new peak lr
                scheduler.base_lrs = [args.lr for _ in scheduler.base_lrs]
                for group, fn in zip(run.optimizer.param_groups, scheduler.lr_lambdas):
                    group["lr"] = args.lr * fn(scheduler.last_epoch)
        state = load_tensors(p.resume / f"rng_rank{d.rank}.pt")  # required by the manifest check
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        if d.main:  # the log continues from the resumed step, without the steps that are redone
            truncate_jsonl(out / "metrics.jsonl", step)
            truncate_jsonl(out / "evals.jsonl", step)

    autocast = torch.bfloat16 if args.bf16 else None

    def evaluate(at_step: int) -> dict:
        v = evaluate_loss(run.eval_model, valid, device=d.device, autocast_dtype=autocast)
        ppl = evaluate_domains(run.eval_model, tests, device=d.device, autocast_dtype=autocast)
        record = {"step": at_step, "valid_ppl": v.ppl, **eval_summary(ppl, args.train_domain)}
        if d.main:
            with open(out / "evals.jsonl", "a") as f:
                f.write(json.dumps(json_safe(record)) + "\n")
            doms = ", ".join(f"{k} {_fmt(x)}" for k, x in ppl.items())
            tqdm.write(f"eval step {at_step}: {args.train_domain} valid ppl {_fmt(v.ppl)} | "
                       f"{args.eval_split}: {doms} | ZS Avg {_fmt(record['zs_avg'])}")
        return record

    tokens_per_step = args.batch_size * p.block_size
    bar = tqdm(total=args.max_steps, initial=step, disable=not d.main, dynamic_ncols=True,
               mininterval=1.0, desc=f"{args.method}")
    metrics_file = open(out / "metrics.jsonl", "a") if d.main else contextlib.nullcontext()
    with metrics_file as mf:
        while step < args.max_steps:
            epoch = loader.position.epoch
            batches = [{k: (v if k == "sample_index" else v.to(d.device, non_blocking=True))
                        for k, v in mb.items()} for mb in loader.next()]
            if d.device.type == "cuda":
                torch.cuda.synchronize(d.device)
            t0 = time.perf_counter()
            m = run.step(batches)
            lr = run.optimizer.param_groups[0]["lr"]
            scheduler.step()
            loss, loss2 = m.loss, m.perturbed_loss  # global; reading them waits for the step
            dt = time.perf_counter() - t0
            if not math.isfinite(loss) or (loss2 is not None and not math.isfinite(loss2)):
                bar.close()
                stop_non_finite(out, f"step {step + 1}: the loss is {loss} (perturbed {loss2})")
            step += 1
            if d.main:
                rec = {"step": step, "epoch": epoch, "loss": loss, "perturbed_loss": loss2,
                       "divergence": m.divergence, "divergence_clamped": m.divergence_clamped,
                       "radius": m.radius, "grad_norm": m.grad_norm, "eps_norm": m.eps_norm,
                       "eps_applied": m.eps_applied, "penalty": m.penalty,
                       "clip_norm": m.clip_norm, "ascent_skipped": m.ascent_skipped,
                       "step_skipped": m.step_skipped, "lr": lr,
                       "tokens_per_s": tokens_per_step / dt, "step_time_s": dt,
                       "peak_mem_mb": peak_memory_mb(d.device)}
                mf.write(json.dumps(json_safe(rec)) + "\n")
                mf.flush()
                post = {"loss": f"{loss:.3f}", "ppl": f"{math.exp(min(loss, 50)):.1f}",
                        "tok/s": f"{tokens_per_step / dt:.0f}"}
                if m.divergence is not None:
                    post["d"] = f"{m.divergence:.2e}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            if args.eval_interval and step % args.eval_interval == 0 and step < args.max_steps:
                history.append(evaluate(step))
            if args.save_interval and step % args.save_interval == 0:
                if not parameters_finite(run.module, d.device):
                    bar.close()
                    stop_non_finite(out, f"step {step}: a parameter is NaN or infinite after the update")
                client = {"step": step, "method": args.method, "data": loader.state_dict(),
                          "scheduler": scheduler.state_dict(), "history": history}
                save_checkpoint(run, out, step, client, d, args.keep_checkpoints,
                                run_settings(args, p.block_size))
    bar.close()

    if not history or history[-1]["step"] != step:
        history.append(evaluate(step))
    # Model selection as in the paper: the evaluation with the best training-domain valid ppl.
    best = min(history, key=lambda r: (r["valid_ppl"] if math.isfinite(r["valid_ppl"]) else math.inf))
    name = args.method if args.max_steps else "zero-shot"
    summary = {k: best[k] for k in ("train_domain", "domains", "in_domain_ppl", "zs_avg")}
    extra = {}
    if args.analysis:
        extra["analysis"] = table5(run, p, d, tests)
    if d.main:
        write_eval_json(out / "eval.json", summary, method=name, model=args.model, step=best["step"],
                        valid_ppl=best["valid_ppl"], split=args.eval_split,
                        selected_by="lowest training-domain validation perplexity", **extra)
        write_eval_md(out / "eval.md", [(name, summary)],
                      title=f"{args.model} on {args.train_domain}: {args.eval_split} perplexity")
        if args.analysis:
            with open(out / "eval.md", "a") as f:
                f.write("\n" + analysis_table(name, extra["analysis"], step) + "\n")
    if not parameters_finite(run.module, d.device):
        stop_non_finite(out, f"step {step}: a parameter is NaN or infinite")
    final, tmp = out / "final", out / ".final.tmp"
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    run.save_final(tmp, p.tokenizer)
    barrier()
    if d.main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        tqdm.write("\n" + (out / "eval.md").read_text().strip() + "\n")  # the results table
        tqdm.write(f"done: {out}/eval.json (step {best['step']}, {args.train_domain} "
                   f"{_fmt(summary['in_domain_ppl'])}, ZS Avg {_fmt(summary['zs_avg'])})")
    return summary


def table5(run, p: Plan, d: Dist, loaders: dict) -> dict:
    """The paper's Table 5 for the final model: epsilon-sharpness and CKA to the start, per
    domain. The starting model is rebuilt from --model and --seed, as training built it."""
    from tqdm import tqdm

    from tram_dist.analysis import table5_analysis

    start = build_model(p.args.model, p.config, p.args.seed).to(d.device)
    if d.main:
        tqdm.write(f"analysis: epsilon-sharpness and CKA on {len(loaders)} domains")
    return table5_analysis(run.eval_model, start, loaders)


def analysis_table(name: str, analysis: dict, step: int) -> str:
    doms = list(analysis["sharpness"])
    head = "| " + " | ".join(["analysis (final model, step %d)" % step, *doms]) + " |"
    rule = "|---|" + "---:|" * len(doms)
    sharp = "| " + " | ".join([f"{name}: epsilon-sharpness %", *(f"{analysis['sharpness'][k]:.3g}" for k in doms)]) + " |"
    cka = "| " + " | ".join([f"{name}: CKA to the start", *(f"{analysis['cka'][k]:.4f}" for k in doms)]) + " |"
    return "\n".join([head, rule, sharp, cka])


def main(argv=None) -> int:
    d = Dist(rank=int(os.environ.get("RANK", "0")))  # errors before the process group: rank 0 prints
    try:
        args = parse_args(argv)
        check_engine_flags(args)
        d = init_distributed(sharded=bool(args.fsdp or args.deepspeed))
        p = plan(args, d)
        train(p, d)
    except (DataError, DsConfigError, UsageError, UnsafeCheckpointError) as e:
        if d.main:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteRun as e:
        if d.main:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
