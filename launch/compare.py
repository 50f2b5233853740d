"""Compare methods on the same data, seeds and budget: Table 3 with cost and ascent size.

    python launch/compare.py                                   # the defaults below (~7 min, 2-core CPU)
    python launch/compare.py --methods adamw,sam,tram-theta-prev --seeds 3 --max-steps 200
    python launch/compare.py --methods adamw,tram-x --sweep radius_scale=1,100,10000
    python launch/compare.py --methods adamw,sam --jobs 2 -- --warmup-steps 10 --dropout 0
    python launch/compare.py --config configs/gpt2_s2orc_math.yaml --methods adamw,tram-theta-prev --jobs 1

Runs launch/train_m2d2.py once per (method, seed[, sweep value]) as its own process (on a
machine without CUDA forked from a forkserver that imported torch and transformers once; with
CUDA a fresh interpreter), --jobs N at a time (default: 2 on a machine with 2 or more cores,
one thread each; --jobs 1: sequential), each into OUTPUT/runs/<method>[-<sweep>]-seed<k>/ (its
output in OUTPUT/logs/<name>.log), with the same data, seeds, steps and batch. Flags after `--` go to every launcher run. --sweep
NAME=v1,v2 gives `--method-arg NAME=v` (sigma: `--sigma v`) to the methods that take NAME and
runs each value; the others run once. Prints one line per finished run and the table; writes
OUTPUT/compare.json, compare.md and compare.png (with matplotlib). A failed run is reported
with the end of its log; the comparison is still written and the exit code is 1.
The tables, statistics and plot are tram_dist/compare.py.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from tram_dist.compare import (CompareError, check_method_args, compare, expand_runs,  # noqa: E402
                               parse_methods, parse_sweep)
from tram_dist.data.pretrained import PRETRAINED_TINY  # noqa: E402
from tram_dist.methods import METHODS  # noqa: E402
from tram_dist.run import ConfigError, RunConfig  # noqa: E402
from tram_dist.run.config import METHOD_ARGS  # noqa: E402

LAUNCHER = Path(__file__).resolve().parent / "train_m2d2.py"

# The default comparison: Table 3's fourteen trained rows in the paper's order (the optimizers,
# the trust-region regularizers, ASAM + each, the four TRAM variants) on the shipped pretrained
# tiny GPT-2, fine-tuned on math at the same lr, steps, batch and seeds for every method. The
# budget (steps, batch, seeds, 2 runs at a time) was chosen by wall time only, before any result
# was seen, and kept when the default grew from 9 to 14 methods (runs now fork from a preloaded
# forkserver on CPU: tram_dist.run.processes). The lr is the pretraining peak lr (2e-3) / 4,
# fixed before any comparison was run.
DEFAULT_METHODS = ("adamw,sam,asam,fsam,trpo,r3f,mesa,asam+trpo,asam+r3f,asam+mesa,"
                   "tram-x,tram-theta-prev,tram-theta0,tram-fisher")
DEFAULT_SEEDS = 3
DEFAULT_MAX_STEPS = 25
DEFAULT_BATCH_SIZE = 8
DEFAULT_BLOCK_SIZE = 128
DEFAULT_LR = 5e-4
DEFAULT_EVAL_INTERVAL = 0
DEFAULT_JOBS = max(1, min(2, os.cpu_count() or 1))  # one run per core, one thread each
DEFAULT_OUTPUT = "runs/compare"


def preset_defaults(path: str) -> dict:
    """compare's launcher flags from a preset, so that a preset's run is compared as it is."""
    config = RunConfig.from_yaml(path)
    if config.train_domain is None:
        raise CompareError(f"--config {path} names no train_domain; add one or pass --train-domain")
    return dict(model=config.model, train_domain=config.train_domain, max_steps=config.max_steps,
                batch_size=config.batch_size, block_size=config.block_size or 0, lr=config.lr,
                eval_interval=config.eval_interval)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                usage="%(prog)s [options] [-- launcher flags]",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    a = p.add_argument
    a("--methods", default=DEFAULT_METHODS, help=f"comma-separated methods (default {DEFAULT_METHODS}); "
      f"any of {', '.join(METHODS)}")
    a("--seeds", type=int, default=DEFAULT_SEEDS, help="run seeds 0..N-1 (default %(default)s)")
    a("--sweep", action="append", default=[], metavar="NAME=v1,v2,...",
      help="run each value as --method-arg NAME=v for the methods that take NAME; repeatable")
    a("--output-dir", default=DEFAULT_OUTPUT, help="where runs/, compare.json/.md/.png go")
    a("--jobs", type=int, default=DEFAULT_JOBS, help="runs at a time (default %(default)s: one per "
      "core, at most 2; 1 = sequential); each gets cores / jobs threads unless OMP_NUM_THREADS is set")
    a("--resume-existing", action="store_true", help="skip runs whose eval.json exists")
    a("--config", help="a launcher preset (configs/*.yaml) given to every run; the launcher flags "
      "below then default to the preset's values instead of the tiny CPU comparison's")
    g = p.add_argument_group("launcher flags given to every run")
    g.add_argument("--model", default=str(PRETRAINED_TINY), help="local folder or hub name "
                   "(default: the shipped pretrained tiny GPT-2, tram_dist/data/pretrained/tiny-gpt2-m2d2)")
    g.add_argument("--train-domain", default="math", help="fine-tuning domain (default %(default)s)")
    g.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS, help="optimizer steps (default %(default)s)")
    g.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="global blocks per step "
                   "(default %(default)s)")
    g.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="tokens per block "
                   "(default %(default)s; 0: the model's context)")
    g.add_argument("--lr", type=float, default=DEFAULT_LR, help="peak learning rate (default %(default)s)")
    g.add_argument("--eval-interval", type=int, default=DEFAULT_EVAL_INTERVAL, help="evaluate every N "
                   "steps (default %(default)s: only at the end)")
    g.add_argument("--analysis", action="store_true", help="add epsilon-sharpness and CKA (Table 5)")
    g.add_argument("--method-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="--method-arg for every run (refused if a listed method rejects it: use --sweep)")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = build_parser()
    try:
        preset = parser.parse_known_args(argv)[0].config
        if preset:
            parser.set_defaults(**preset_defaults(preset))
        args = parser.parse_args(argv)
        methods = parse_methods(args.methods, METHODS)
        if args.jobs < 1:
            raise CompareError(f"--jobs {args.jobs} must be >= 1")
        if args.max_steps < 1:
            raise CompareError(f"--max-steps {args.max_steps} must be >= 1 (a comparison of training runs)")
        allowed = METHOD_ARGS + ("sigma",)
        sweeps = [parse_sweep(s, allowed) for s in args.sweep]
        check_method_args(args.method_arg, methods)
        expand_runs(methods, args.seeds, sweeps)  # refuses a sweep no method takes, bad values
        model = args.model
        if model.startswith(("/", ".", "~")) and not Path(model).expanduser().exists():
            # (a hub name "owner/name" is left to the launcher)
            raise CompareError(f"--model {model} does not exist; pass a local model folder or a hub name")
        common = ["--config", args.config] if args.config else []
        common += ["--model", model, "--train-domain", args.train_domain,
                  "--max-steps", str(args.max_steps), "--lr", repr(args.lr),
                  "--batch-size", str(args.batch_size), "--eval-interval", str(args.eval_interval)]
        if args.block_size:
            common += ["--block-size", str(args.block_size)]
        if args.analysis:
            common.append("--analysis")
        for pair in args.method_arg:
            common += ["--method-arg", pair]
        report = compare(methods, seeds=args.seeds, output_dir=args.output_dir, launcher=LAUNCHER,
                         common=common, extra=extra, sweeps=sweeps, jobs=args.jobs,
                         resume_existing=args.resume_existing)
    except (CompareError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
