"""Pretrain the launcher's tiny GPT-2 on the six embedded domains, deterministically on CPU.

    python scripts/pretrain_tiny.py                 # rewrites tram_dist/data/pretrained/tiny-gpt2-m2d2/
    python scripts/pretrain_tiny.py --out /tmp/x    # or writes /tmp/x
    python scripts/pretrain_tiny.py --check         # regenerate into a temporary folder and compare
                                                    # every shipped file byte for byte (exit 1 if not)
    python scripts/pretrain_tiny.py --stop-after 10 --out /tmp/y --no-eval
        # the shipped run's first 10 steps only (tests): manifest.json's trajectory["10"] must
        # equal the shipped manifest's

The model is `launch/train_m2d2.py --model tiny` (tram_dist.data.pretrained.TINY: GPT-2 with 4
layers, 4 heads, width 128, context 256, vocabulary = the shipped 2,291-token BPE), trained with
AdamW on an equal mixture of the six domains' train splits: every step takes BLOCKS_PER_DOMAIN
windows of 256 tokens from each domain's train stream (the launcher's stream format: one
paragraph per line, EOS after each), at offsets drawn from one seeded torch.Generator, in a
fixed domain order. Validation and test splits are never trained on.

Determinism: one thread (torch, OpenMP, MKL), torch.use_deterministic_algorithms(True), MKL's
conditional numerical reproducibility pinned to its AVX2 code path and ATen's kernels to AVX2
(so a machine with AVX-512 computes what an AVX2 machine computes), a fixed seed for the
initialisation, the dropout masks and the data order. The same torch / transformers versions
then reproduce every output file byte for byte; manifest.json records the versions, the recipe,
the sha256 of every file and of the weights after TRAJECTORY_STEPS (tests/data/
test_pretrained_regen.py reruns the shipped run's first steps and compares that digest: the full
3.5-minute rerun is too long for the suite).
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # before torch is imported: these are read once, at load time
    for key, value in {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MKL_CBWR": "AVX2",
                       "ATEN_CPU_CAPABILITY": "avx2", "RAYON_NUM_THREADS": "1",
                       "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "",
                       "TRANSFORMERS_VERBOSITY": "error"}.items():
        os.environ[key] = value

import argparse
import filecmp
import hashlib
import inspect
import json
import math
import platform
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tram_dist.data import (EMBEDDED_CORPUS, EMBEDDED_TOKENIZER, EvalBlocks, EvalLoader,  # noqa: E402
                            load_tokenizer, tokenize_file)
from tram_dist.data.pretrained import MANIFEST, PRETRAINED_TINY, TINY, tiny_config  # noqa: E402
from tram_dist.evaluate import evaluate_loss  # noqa: E402

DOMAINS = ("math", "physics", "cs", "biology", "economics", "art")  # fixed order of the draws
# The recipe (every value that changes the weights). The step count is the only one the tests
# change; --check regenerates with exactly these.
RECIPE = dict(
    seed=0,
    steps=360,
    block_size=256,  # the model's whole context, so every position embedding is trained
    blocks_per_domain=1,  # 6 domains x 1 window = 6 blocks = 1,536 tokens per step
    lr=2e-3,
    warmup_steps=36,  # linear warmup, then linear decay to 0 at `steps`
    betas=(0.9, 0.95),
    adam_eps=1e-8,
    weight_decay=0.01,  # on matrices and embeddings; none on biases and LayerNorm
    max_grad_norm=1.0,
    dropout="config default (0.1)",
)
EVAL_BATCH = 16


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warmup over `warmup` steps, linear decay to 0 at `steps` (never negative)."""
    return max(0.0, min((step + 1) / warmup, (steps - step) / max(1, steps - warmup)))


def token_streams(tokenizer, split: str, tmp: Path) -> dict[str, torch.Tensor]:
    """Each domain's `split` as one token stream, in the launcher's format (tokenize_file)."""
    out = {}
    for dom in DOMAINS:
        path = tmp / f"{dom}.{split}.bin"
        tokenize_file(EMBEDDED_CORPUS / dom / f"{split}.txt", tokenizer, path)
        dtype = np.uint16 if len(tokenizer) <= 65536 else np.int32
        out[dom] = torch.from_numpy(np.fromfile(path, dtype=dtype).astype(np.int64))
    return out


def batch(streams: dict[str, torch.Tensor], gen: torch.Generator, block: int, per_domain: int) -> torch.Tensor:
    rows = []
    for dom in DOMAINS:
        tokens = streams[dom]
        for start in torch.randint(0, len(tokens) - block + 1, (per_domain,), generator=gen).tolist():
            rows.append(tokens[start:start + block])
    return torch.stack(rows)


def evaluate(model, tokenizer, tmp: Path, split: str, block: int) -> dict:
    """Perplexity per domain and of the mixture (token-weighted), the launcher's protocol."""
    per, loss_sum, count = {}, 0.0, 0
    streams = token_streams(tokenizer, split, tmp)
    for dom in DOMAINS:
        blocks = EvalBlocks(streams[dom].numpy(), block, pad_id=tokenizer.eos_token_id, name=dom)
        r = evaluate_loss(model, EvalLoader(blocks, EVAL_BATCH, rank=0, world_size=1))
        per[dom], loss_sum, count = r.ppl, loss_sum + r.loss_sum, count + r.num_tokens
    return {"domains": {k: round(v, 4) for k, v in per.items()},
            "mixture": round(math.exp(loss_sum / count), 4)}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def versions() -> dict:
    import safetensors
    import tokenizers
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "safetensors": safetensors.__version__,
            "numpy": np.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine()}


TRAJECTORY_STEPS = (10,)  # the weights' digest after these steps goes into manifest.json


def weights_digest(model) -> str:
    """sha256 of every tensor of the state dict (name, dtype, shape, bytes), in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def pretrain(out: Path, steps: int, do_eval: bool = True, log=print, stop_after: int | None = None) -> dict:
    """Train with RECIPE (but `steps`), write the model, tokenizer and manifest.json to `out`.
    `stop_after`: run only the first steps of that schedule (the manifest says so)."""
    from transformers import GPT2LMHeadModel

    recipe = {**RECIPE, "steps": steps}
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    tokenizer = load_tokenizer("tiny")
    block = recipe["block_size"]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        train = token_streams(tokenizer, "train", tmp)
        torch.manual_seed(recipe["seed"])
        model = GPT2LMHeadModel(tiny_config(tokenizer))
        n_params = sum(p.numel() for p in model.parameters())
        init = evaluate(model, tokenizer, tmp, "test", block) if do_eval else None
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe["weight_decay"]},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=recipe["lr"], betas=recipe["betas"], eps=recipe["adam_eps"])
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, steps, recipe["warmup_steps"]))
        gen = torch.Generator().manual_seed(recipe["seed"])
        model.train()
        log(f"pretraining {n_params:,} parameters for {steps} steps of "
            f"{len(DOMAINS) * recipe['blocks_per_domain']} x {block} tokens (1 thread)")
        losses, trajectory = [], {}
        for step in range(steps if stop_after is None else min(steps, stop_after)):
            ids = batch(train, gen, block, recipe["blocks_per_domain"])
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe["max_grad_norm"])
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if step + 1 in TRAJECTORY_STEPS:
                trajectory[str(step + 1)] = weights_digest(model)
            if (step + 1) % 20 == 0 or step + 1 == steps:
                log(f"step {step + 1}/{steps}: loss {sum(losses[-20:]) / len(losses[-20:]):.4f} "
                    f"({time.perf_counter() - t0:.0f} s)")
        train_s = time.perf_counter() - t0
        model.eval()
        result = None
        if do_eval:
            result = {"init_test": init, "valid": evaluate(model, tokenizer, tmp, "valid", block),
                      "test": evaluate(model, tokenizer, tmp, "test", block)}
    write(model, out, recipe, n_params, losses, result, trajectory, stop_after)
    return {"train_s": train_s, "total_s": time.perf_counter() - t0, "eval": result,
            "final_loss": losses[-1] if losses else None}


def write(model, out: Path, recipe: dict, n_params: int, losses: list, result, trajectory: dict,
          stop_after: int | None = None) -> None:
    """Write the generated files next to any README.md in `out`, then manifest.json (their
    sha256); files of an earlier run that this one does not write are removed."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmpdir:
        tmp = Path(tmpdir)
        kwargs = {}
        if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
            kwargs["safe_serialization"] = True  # transformers 4.x (5.x writes only safetensors)
        model.save_pretrained(tmp, **kwargs)
        # The shipped tokenizer's files verbatim (tokenizer.save_pretrained would write the
        # running transformers version's format; these load under 4.x and 5.x alike).
        for src in sorted(EMBEDDED_TOKENIZER.iterdir()):
            if src.is_file():
                shutil.copyfile(src, tmp / src.name)
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        for name in files:
            (tmp / name).chmod(0o644)  # save_pretrained may leave 0600
        manifest = {
            "description": "tiny GPT-2 (tram_dist.data.pretrained.TINY) pretrained by "
                           "scripts/pretrain_tiny.py on the six embedded domains' train splits",
            "regenerate": "python scripts/pretrain_tiny.py",
            "recipe": {**recipe, "betas": list(recipe["betas"]), "domains": list(DOMAINS)},
            "architecture": TINY, "num_parameters": n_params,
            "final_train_loss": round(losses[-1], 6) if losses else None,
            "eval": result, "versions": versions(),
            "files": {name: sha256(tmp / name) for name in files},
            "trajectory": trajectory,  # weights_digest after each of TRAJECTORY_STEPS
        }
        if stop_after is not None:
            manifest["stopped_after"] = stop_after
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        (tmp / MANIFEST).chmod(0o644)
        for name in files + [MANIFEST]:
            os.replace(tmp / name, out / name)
    for p in out.iterdir():
        if p.is_file() and p.name not in files + [MANIFEST, "README.md"]:
            p.unlink()


def check(shipped: Path, log=print) -> int:
    """Regenerate with the shipped recipe into a temporary folder; compare every file."""
    manifest = json.loads((shipped / MANIFEST).read_text())
    steps = manifest["recipe"]["steps"]
    with tempfile.TemporaryDirectory() as tmpdir:
        made = Path(tmpdir) / "model"
        pretrain(made, steps, do_eval=manifest.get("eval") is not None, log=log)
        names = sorted(p.name for p in made.iterdir())
        want = sorted(p.name for p in shipped.iterdir() if p.is_file() and p.name != "README.md")
        bad = [n for n in sorted(set(names) | set(want))
               if n not in names or n not in want or not filecmp.cmp(made / n, shipped / n, shallow=False)]
    if bad:
        log(f"MISMATCH: {', '.join(bad)} differ from {shipped} (versions now: {versions()}, "
            f"recorded: {manifest.get('versions')})")
        return 1
    log(f"OK: {len(want)} files of {shipped} regenerated byte for byte")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=PRETRAINED_TINY, help="output folder (default: "
                   "the shipped tram_dist/data/pretrained/tiny-gpt2-m2d2)")
    p.add_argument("--steps", type=int, default=RECIPE["steps"], help="optimizer steps")
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity evaluation")
    p.add_argument("--stop-after", type=int, help="stop after this many steps of the --steps "
                   "schedule (the shipped run's first steps; tests)")
    p.add_argument("--check", action="store_true", help="regenerate the shipped folder in a "
                   "temporary folder and compare byte for byte (exit 1 on a difference)")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps {args.steps} must be >= 1")
    if args.stop_after is not None and not 1 <= args.stop_after <= args.steps:
        p.error(f"--stop-after {args.stop_after} must be in 1..{args.steps}")
    if args.check:
        return check(PRETRAINED_TINY)
    r = pretrain(args.out, args.steps, do_eval=not args.no_eval, stop_after=args.stop_after)
    print(f"wrote {args.out} ({r['train_s']:.0f} s training, {r['total_s']:.0f} s in all)")
    if r["eval"]:
        for split in ("init_test", "valid", "test"):
            e = r["eval"][split]
            doms = ", ".join(f"{k} {v:.2f}" for k, v in e["domains"].items())
            print(f"{split} perplexity: mixture {e['mixture']:.2f} | {doms}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
