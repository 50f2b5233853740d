"""Fine-tune a causal LM on one M2D2 domain with TRAM (or a baseline); report zero-shot perplexity.

Single process (CPU or one GPU; the offline preset runs in a few minutes on a laptop CPU):
    python launch/train_m2d2.py                          # no arguments: configs/tiny.yaml
    python launch/train_m2d2.py --config configs/tiny.yaml --method sam --output-dir runs/tiny-sam
    python launch/train_m2d2.py --config configs/tiny.yaml --max-steps 0   # zero-shot baseline row

One node, N GPUs: DDP, FSDP2 (fully_shard per block, then the root), DeepSpeed ZeRO-1/2/3:
    torchrun --nproc_per_node N launch/train_m2d2.py --config configs/gpt2_s2orc_math.yaml
    torchrun --nproc_per_node N launch/train_m2d2.py --fsdp --config configs/gpt2_s2orc_math.yaml
    deepspeed --num_gpus N launch/train_m2d2.py --deepspeed configs/zero2.json \\
        --config configs/gpt2_s2orc_math.yaml
On CPU (gloo) the same commands run with DS_ACCELERATOR=cpu (and --num_gpus N given to deepspeed).

Two nodes (on each node, R = 0 or 1, H:P = node 0's host and port; --output-dir and --cache-dir
on a shared file system):
    torchrun --nnodes 2 --node_rank R --nproc_per_node 8 --rdzv-backend c10d \\
        --rdzv-endpoint H:P launch/train_m2d2.py --config configs/gpt2_s2orc_math.yaml

The paper's GPT2-XL run (Table 9: 4 GPUs x 4 blocks x 1024 tokens, 100K steps):
    deepspeed --num_gpus 4 launch/train_m2d2.py --config configs/gpt2xl_s2orc_math.yaml

Offline M2D2: unpack the archives to DIR/{domain}/{train,valid,test}.txt and pass --data-dir DIR.

This script only parses flags: every flag is a field of tram_dist.RunConfig (its name with '_'
for '-'), a --config preset is a YAML file of those fields, flags override it, and
tram_dist.Run does the rest (see its docstring for the files written to --output-dir).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from tram_dist.checkpoint_files import CheckpointError
from tram_dist.data import DataError
from tram_dist.ds_config import DsConfigError
from tram_dist.methods import METHODS  # noqa: F401  (the --method choices, for tests and users)
from tram_dist.run import ConfigError, NonFiniteRun, Run, RunConfig
from tram_dist.run.checkpoints import DiskError
from tram_dist.run.config import METHOD_ARGS, parse_method_args
from tram_dist.run.distributed import shutdown
from tram_dist.safe_load import UnsafeCheckpointError

TINY_PRESET = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
# fields whose flag is not simply --<field-name>
FLAG_NAMES = {"deepspeed_config": "--deepspeed", "method_args": "--method-arg"}
USER_ERRORS = (ConfigError, DataError, DsConfigError, UnsafeCheckpointError, DiskError, CheckpointError)


def build_parser() -> argparse.ArgumentParser:
    """One flag per RunConfig field, documented by the field; defaults are the config's (or the
    preset's), so only the flags given on the command line are in the namespace."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="YAML run preset (configs/*.yaml); flags given here override it")
    p.add_argument("--fsdp", action="store_const", dest="engine", const="fsdp2",
                   help="shard with FSDP2 (same as --engine fsdp2)")
    for f in dataclasses.fields(RunConfig):
        flag = FLAG_NAMES.get(f.name, "--" + f.name.replace("_", "-"))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata['doc']} (default: {default})"
        kw = dict(dest=f.name, help=help_text.replace("%", "%%"))
        if f.name == "method_args":
            kw.update(action="append", metavar="KEY=VALUE", help=f"method option, repeatable: "
                      f"{', '.join(METHOD_ARGS)}")
        elif f.name == "resume":
            kw.update(nargs="?", const="latest", metavar="CHECKPOINT")
        elif isinstance(default, bool):
            kw.update(action=argparse.BooleanOptionalAction)
        elif "item" in f.metadata:
            kw.update(type=f.metadata["item"], nargs=f.metadata.get("length", "+"))
        else:
            hint = f.type.removeprefix("Optional[").removesuffix("]") if isinstance(f.type, str) else ""
            kw.update(type={"int": int, "float": float}.get(hint, str))
            if "choices" in f.metadata:
                kw.update(choices=f.metadata["choices"])
        p.add_argument(flag, **kw)
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed
    return p


def launched_by_deepspeed(flags: dict) -> bool:
    """The deepspeed launcher passes --local_rank (torchrun does not) and sets CROSS_RANK."""
    return "local_rank" in flags or "CROSS_RANK" in os.environ


def config_from_args(argv=None) -> RunConfig:
    """The run's config: the --config preset (configs/tiny.yaml without arguments), then flags."""
    argv = sys.argv[1:] if argv is None else list(argv)
    flags = vars(build_parser().parse_args(argv or ["--config", str(TINY_PRESET)]))
    preset = flags.pop("config", None)
    if flags.get("engine") == "fsdp2" and "deepspeed_config" in flags:
        raise ConfigError("engine", "--deepspeed and --fsdp both given; pick one engine")
    if flags.get("engine") == "fsdp2" and launched_by_deepspeed(flags):
        raise ConfigError("engine", "--fsdp under the deepspeed launcher; start FSDP2 with torchrun "
                          "--nproc_per_node N launch/train_m2d2.py --fsdp, or pass --deepspeed "
                          "configs/zero2.json")
    flags.pop("local_rank", None)
    if "method_args" in flags:
        flags["method_args"] = parse_method_args(flags["method_args"])
    config = RunConfig.from_yaml(preset) if preset else RunConfig()
    if "engine" in flags and "deepspeed_config" not in flags:
        flags["deepspeed_config"] = None  # an engine flag replaces the preset's DeepSpeed file
    if "data_dir" in flags and "hub" not in flags:
        flags["hub"] = False  # --data-dir replaces the preset's hub download
    return config.replace(**flags)


def main(argv=None) -> int:
    main_rank = os.environ.get("RANK", "0") == "0"  # errors before the process group: rank 0 prints
    try:
        Run(config_from_args(argv)).train()
    except USER_ERRORS as e:
        if main_rank:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteRun as e:
        if main_rank:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
