"""``Run``: one fine-tuning run on M2D2 data, built from a ``RunConfig``.

    from tram_dist import Run, RunConfig
    run = Run(RunConfig.from_yaml("configs/tiny.yaml", output_dir="runs/a"))
    summary = run.train()        # resumes first when config.resume is set; evaluates; exports

Everything is checked before any data is tokenized or any weight loaded (the config, the data
folder, the model's config, the batch layout, the DeepSpeed file, the output folder, the
checkpoint to resume). The run owns the data order, the RNG state, the LR schedule, checkpoint
rotation and resume lookup, the global metrics (``metrics.jsonl``, ``evals.jsonl``), the
results table (``eval.json``, ``eval.md``) and the export (``final/``); the engine
(``tram_dist.runs``) owns the model, the optimizer, the TRAM step and its checkpoint layout.
Under torchrun / deepspeed every rank builds the same ``Run`` and calls the same methods.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from ..checkpoint_files import CheckpointError, check_same_run, remove_temporaries
from ..data import (EvalLoader, TokenCache, TrainLoader, batch_layout, embedded_source, eval_blocks,
                    load_tokenizer, resolve_source, train_blocks)
from ..data.m2d2 import LocalSource
from ..evaluate import (eval_summary, evaluate_domains, evaluate_loss, json_safe, write_eval_json,
                        write_eval_md)
from . import checkpoints as ckpt
from .config import ConfigError, RunConfig
from .distributed import Dist, barrier, from_rank0, init_distributed, shutdown
from .model import build_model, context_length, first_line, model_config
from .report import Reporter, check_backends

LR_END = 1e-7  # polynomial decay's final lr (Hugging Face's default for this schedule)
LR_POWER = 1.0  # linear decay (Hugging Face and fairseq default)
# the DeepSpeed resolver names the run's options as fields, not flags
DS_FIELDS = {"--batch-size": "batch_size", "--micro-batch-size": "micro_batch_size",
             "--grad-accum": "grad_accum", "--max-grad-norm": "max_grad_norm", "--lr": "lr",
             "--warmup-steps": "warmup_steps", "--max-steps": "max_steps", "--bf16": "bf16"}


class NonFiniteRun(RuntimeError):
    """A NaN or infinite loss or parameter: the run stops without exporting."""


def engine_kind(config: RunConfig, world_size: int) -> str:
    """The engine run class (``tram_dist.runs``: single, ddp, fsdp, deepspeed) of ``config``."""
    engine = config.engine
    if engine == "auto":
        return "deepspeed" if config.deepspeed_config else "ddp" if world_size > 1 else "single"
    if engine == "single" and world_size > 1:
        raise ConfigError("engine", f"'single' in a world of {world_size} processes; use 'ddp' "
                          "(or 'auto') under torchrun")
    return {"single": "single", "ddp": "ddp", "fsdp2": "fsdp"}.get(engine, "deepspeed")


def needs_process_group(config: RunConfig) -> bool:
    return config.engine not in ("auto", "single") or bool(config.deepspeed_config)


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated by this process, or on CPU its peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def fmt(v: float) -> str:
    return f"{v:.2f}" if math.isfinite(v) else str(v)


class Run:
    """A fine-tuning run (module docstring). ``dist`` defaults to the launcher's environment
    (a process group is started where the engine needs one)."""

    def __init__(self, config: RunConfig, dist_info: Optional[Dist] = None):
        self.config = config.replace().validate()  # a copy: the run fills in train_domain
        self.dist = dist_info or init_distributed(sharded=needs_process_group(self.config))
        self.kind = engine_kind(self.config, self.dist.world_size)
        self.out = Path(self.config.output_dir)
        self.step_count, self.history, self.config_changes = 0, [], {}
        self.skipped_steps, self._skips_in_a_row = 0, 0  # nonfinite="skip": steps without an update
        self.engine_run = self.loader = self.scheduler = self.reporter = None
        check_backends(self.config.report_to)
        self._check_inputs()
        self._check_output()
        self.resume_from = (ckpt.resume_point(self.config.resume, self.out, self.dist)
                            if self.config.resume else None)
        if self.resume_from is not None:
            self._check_resume(self.resume_from)

    # ------------------------------------------------------------------ checks before work
    def _check_inputs(self) -> None:
        c, d = self.config, self.dist
        from ..runs import check_method_options

        try:  # the method's options, on a placeholder parameter (errors from real work pass through)
            check_method_options(c, c.method_options())
        except (ValueError, TypeError) as e:
            raise ConfigError("method_args", f"{c.method}: {first_line(e)}") from e
        self.source = resolve_source(c.data_dir, c.hub, c.cache_dir)
        if c.train_domain is None:
            if self.source.name != embedded_source().name:
                raise ConfigError("train_domain", "is required with data_dir / hub (e.g. math_l1 or "
                                  "Society_and_social_sciences)")
            c.train_domain = json.loads((self.source.root / "manifest.json").read_text())["train_domain"]
        if c.eval_domains:
            domains = [c.train_domain] + [x for x in c.eval_domains if x != c.train_domain]
        elif isinstance(self.source, LocalSource):
            domains = [c.train_domain] + [x for x in self.source.domains() if x != c.train_domain]
        else:
            raise ConfigError("eval_domains", "is required with hub (Table 3 lists the 10 zero-shot "
                              "domains; see configs/gpt2_*.yaml)")
        self.eval_domains = domains
        if isinstance(self.source, LocalSource):  # cheap; the hub is checked on load
            self.source.check(c.train_domain, ("train", "valid") if c.max_steps else ("valid",))
            for dom in domains:
                self.source.check(dom, (c.eval_split,))

        self.tokenizer = load_tokenizer(None if c.model == "tiny" else c.model)
        self.model_config = model_config(c.model, self.tokenizer, c.dropout)
        context = context_length(self.model_config)
        block = c.block_size or context
        if block is None:
            raise ConfigError("block_size", f"model {c.model} does not state its context length; set it")
        if context is not None and block > context:
            raise ConfigError("block_size", f"{block} exceeds the context of model {c.model} "
                              f"({context} tokens); use {context} or less")
        if block < 2:
            raise ConfigError("block_size", f"{block} must be at least 2")
        vocab = getattr(self.model_config, "vocab_size", None)
        if vocab is not None and len(self.tokenizer) > vocab:
            raise ConfigError("model", f"the tokenizer has {len(self.tokenizer)} tokens but {c.model} "
                              f"only {vocab} embeddings; use the model's own tokenizer")
        self.block_size = block
        self.micro, self.accum = batch_layout(c.batch_size, d.world_size, c.micro_batch_size, c.grad_accum)
        self.ds_config = self._deepspeed_config() if self.kind == "deepspeed" else None
        self._zero3_config()  # checks what building the model partitioned needs, before any data work

    def _deepspeed_config(self) -> dict:
        import importlib.util

        from ..ds_config import resolve_ds_config, zero_stage
        from ..runs import check_ds_config

        c = self.config
        source = c.deepspeed_config or {"zero_optimization": {"stage": int(c.engine[4])}}
        cfg = resolve_ds_config(
            source, global_batch_size=c.batch_size, micro_batch_size=self.micro, grad_accum=self.accum,
            world_size=self.dist.world_size, lr=c.lr, betas=tuple(c.betas),
            eps=c.method_args.get("eps", 1e-8), weight_decay=c.weight_decay,
            max_grad_norm=c.max_grad_norm, bf16=c.bf16, flags=DS_FIELDS,
            hidden_size=getattr(self.model_config, "hidden_size", None))
        check_ds_config(cfg, str(c.deepspeed_config or "deepspeed_config"))
        if c.engine.startswith("zero") and zero_stage(cfg) != int(c.engine[4]):
            raise ConfigError("engine", f"{c.engine} but {c.deepspeed_config} sets stage "
                              f"{zero_stage(cfg)}; make them agree or set engine 'auto'")
        cfg["gradient_clipping"] = 0.0  # checked against max_grad_norm; the TRAM step clips
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("engine", f"{c.engine} needs the deepspeed package: pip install "
                              "--no-build-isolation deepspeed")
        return cfg

    def _check_output(self) -> None:
        c, out = self.config, self.out
        if out.exists() and not out.is_dir():
            raise ckpt.DiskError(f"output_dir {out} is a file; pass a folder")
        if not c.resume and not c.overwrite and out.is_dir() and any(out.iterdir()):
            raise ConfigError("output_dir", f"{out} already holds a run; resume it, set overwrite "
                              "to replace it, or pass another output_dir")
        barrier()  # every rank has looked at output_dir before rank 0 writes into it
        error = None
        if self.dist.main:
            try:
                ckpt.check_writable(out)
            except ckpt.DiskError as e:
                error = str(e)
        error = from_rank0(error)  # every rank stops, not only rank 0
        if error is not None:
            raise ckpt.DiskError(error)

    def _check_resume(self, path: Path) -> None:
        ckpt.check_engine(path, self.kind, self.dist)
        saved = json.loads((path / "run.json").read_text())
        current = ckpt.run_settings(self.config, self.block_size)
        if "method_arg" in saved and "method_args" not in saved:  # written before method_args
            saved["method_args"] = saved.pop("method_arg")
        try:
            changed = check_same_run(saved, current, allow_change=self.config.allow_config_change)
        except CheckpointError as e:
            raise ConfigError("resume", str(e)) from None
        self.config_changes = {k: [saved[k], current[k]] for k in changed}

    # ------------------------------------------------------------------ building
    def build(self) -> "Run":
        """Prepare the output folder, the data, the model, the engine and the schedule (every
        rank; done by ``train`` when not done before)."""
        if self.engine_run is not None:
            return self
        from ..runs import RunError, build_run

        c, d, out = self.config, self.dist, self.out
        if d.main:
            if c.overwrite and not c.resume and out.is_dir():
                shutil.rmtree(out)
            out.mkdir(parents=True, exist_ok=True)
            remove_temporaries(out)  # what an interrupted save left behind
            self._write_resolved_config()
            if self.config_changes:
                with open(out / "config_changes.jsonl", "a") as f:
                    f.write(json.dumps({"resumed_from": str(self.resume_from),
                                        "changed": self.config_changes}) + "\n")
        barrier()
        self.reporter = Reporter(c.report_to, out, c.to_dict(), run_name=out.name, main=d.main)
        cache = TokenCache(self.tokenizer, c.cache_dir)
        if c.max_steps:
            self.loader = TrainLoader(train_blocks(self.source, cache, c.train_domain, self.block_size),
                                      c.batch_size, self.micro, self.accum, seed=c.seed,
                                      rank=d.rank, world_size=d.world_size)
        self.valid = EvalLoader(eval_blocks(self.source, cache, c.train_domain, "valid", self.block_size),
                                c.eval_batch_size, d.rank, d.world_size)
        self.tests = {dom: EvalLoader(eval_blocks(self.source, cache, dom, c.eval_split, self.block_size),
                                      c.eval_batch_size, d.rank, d.world_size) for dom in self.eval_domains}
        module = build_model(c.model, self.model_config, c.seed, c.gradient_checkpointing,
                             zero3_config=self._zero3_config())
        try:
            self.engine_run = build_run(self.kind, module, dist=d, args=c,
                                        method_kwargs=c.method_options(), ds_config=self.ds_config)
        except RunError as e:  # a model or setting the engine cannot run
            raise ConfigError("engine", f"{c.method}: {first_line(e)}") from e
        if c.max_steps:
            from transformers import get_polynomial_decay_schedule_with_warmup

            self.scheduler = get_polynomial_decay_schedule_with_warmup(
                self.engine_run.optimizer, c.warmup_steps, c.max_steps,
                lr_end=min(LR_END, c.lr / 10), power=LR_POWER)
        torch.manual_seed(c.seed + d.rank)  # dropout streams differ per rank
        if self.resume_from is not None:
            self.resume(self.resume_from)
        return self

    def _zero3_config(self) -> Optional[dict]:
        """The DeepSpeed config when the model is built partitioned (ZeRO-3 with zero_init)."""
        from ..ds_config import zero_stage

        if self.kind != "deepspeed" or zero_stage(self.ds_config) != 3 or not self.config.zero_init:
            return None
        import importlib.util

        if importlib.util.find_spec("accelerate") is None:  # transformers' HfDeepSpeedConfig needs it
            raise ConfigError("zero_init", "building the model partitioned needs accelerate "
                              "(transformers' zero.Init path): pip install 'accelerate>=1.1', or set "
                              "zero_init false (--no-zero-init)")
        return self.ds_config

    def _write_resolved_config(self) -> None:
        import yaml

        resolved = {**self.config.to_dict(), "block_size": self.block_size,
                    "micro_batch_size": self.micro, "grad_accum": self.accum,
                    "eval_domains": self.eval_domains}
        derived = {"engine": self.kind, "world_size": self.dist.world_size, "source": self.source.name,
                   "tokens_per_step": self.config.batch_size * self.block_size,
                   "model_built_partitioned": self._zero3_config() is not None}
        text = ("# Resolved run (RunConfig fields); derived values under _derived.\n"
                + yaml.safe_dump({**resolved, "_derived": derived}, sort_keys=False))
        (self.out / "config.yaml").write_text(text)
        if self.ds_config is not None:
            (self.out / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2) + "\n")

    # ------------------------------------------------------------------ the public steps
    @property
    def model(self):
        """The Hugging Face model (under FSDP2 / ZeRO: its sharded module)."""
        return self.build().engine_run.module

    @property
    def optimizer(self):
        """The optimizer the LR schedule drives."""
        return self.build().engine_run.optimizer

    def resume(self, checkpoint: str | os.PathLike = "latest") -> int:
        """Load a checkpoint (a folder, or 'latest' in output_dir) into the built run: model,
        optimizer, data position, schedule, evaluations so far, RNG. Returns the step."""
        path = Path(checkpoint) if str(checkpoint) != "latest" else ckpt.resume_point("latest", self.out, self.dist)
        if self.engine_run is None:
            self.resume_from = path
            self._check_resume(path)
            self.build()
            return self.step_count
        c, run = self.config, self.engine_run
        client = run.load_checkpoint(path)
        if client.get("method") != c.method:
            raise ConfigError("method", f"{path} was written by method {client.get('method')}, not "
                              f"{c.method}; resume with the same method")
        self.step_count, self.history = int(client["step"]), list(client.get("history", []))
        self.skipped_steps, self._skips_in_a_row = int(client.get("skipped_steps", 0)), 0
        if self.loader is not None:
            self.loader.load_state_dict(client["data"])
        if self.scheduler is not None and client.get("scheduler"):
            self.scheduler.load_state_dict(client["scheduler"])
            if "lr" in self.config_changes:  # allow_config_change: the new peak lr drives it
                self.scheduler.base_lrs = [c.lr for _ in self.scheduler.base_lrs]
                for group, fn in zip(run.optimizer.param_groups, self.scheduler.lr_lambdas):
                    group["lr"] = c.lr * fn(self.scheduler.last_epoch)
        ckpt.set_rng_state(path / f"rng_rank{self.dist.rank}.pt")  # required by the manifest check
        if self.dist.main:  # the logs continue from the resumed step, without the redone steps
            ckpt.truncate_jsonl(self.out / "metrics.jsonl", self.step_count)
            ckpt.truncate_jsonl(self.out / "evals.jsonl", self.step_count)
        return self.step_count

    def save_checkpoint(self) -> Path:
        """Every rank calls: a checkpoint of the current step (refused with a NaN parameter)."""
        from ..runs import parameters_finite

        self.build()
        if not parameters_finite(self.engine_run.module, self.dist.device):
            self._stop_non_finite(f"step {self.step_count}: a parameter is NaN or infinite after the update")
        client = {"step": self.step_count, "method": self.config.method,
                  "data": self.loader.state_dict() if self.loader else None,
                  "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                  "history": self.history, "skipped_steps": self.skipped_steps}
        first = not ckpt.checkpoints(self.out)
        path = ckpt.save(self.engine_run, self.out, self.step_count, client, self.dist,
                         self.config.keep_checkpoints, ckpt.run_settings(self.config, self.block_size))
        if first:
            ckpt.check_room(self.out, path, self.config.keep_checkpoints, self.dist)
        return path

    def evaluate(self, step: Optional[int] = None) -> dict:
        """Validation perplexity of the training domain and the table's perplexities; appended
        to evals.jsonl and to the run's history."""
        from tqdm import tqdm

        self.build()
        c, d, run = self.config, self.dist, self.engine_run
        step = self.step_count if step is None else step
        autocast = torch.bfloat16 if c.bf16 else None
        v = evaluate_loss(run.eval_model, self.valid, device=d.device, autocast_dtype=autocast)
        ppl = evaluate_domains(run.eval_model, self.tests, device=d.device, autocast_dtype=autocast)
        record = {"step": step, "valid_ppl": v.ppl, **eval_summary(ppl, c.train_domain)}
        if d.main:
            with open(self.out / "evals.jsonl", "a") as f:
                f.write(json.dumps(json_safe(record)) + "\n")
            self.reporter.log("eval", record, step)
            doms = ", ".join(f"{k} {fmt(x)}" for k, x in ppl.items())
            tqdm.write(f"eval step {step}: {c.train_domain} valid ppl {fmt(v.ppl)} | "
                       f"{c.eval_split}: {doms} | ZS Avg {fmt(record['zs_avg'])}")
        self.history.append(record)
        return record

    def train(self) -> dict:
        """Train to max_steps (from the resumed step), evaluate, write the table, export final/.
        Returns the summary of the evaluation selected by the training domain's validation
        perplexity (the paper's model selection)."""
        self.build()
        self._train_loop()
        if not self.history or self.history[-1]["step"] != self.step_count:
            self.evaluate()
        return self._finish()

    def _train_loop(self) -> None:
        from tqdm import tqdm

        c, d, run = self.config, self.dist, self.engine_run
        tokens_per_step = c.batch_size * self.block_size
        bar = tqdm(total=c.max_steps, initial=self.step_count, disable=not d.main, dynamic_ncols=True,
                   mininterval=1.0, desc=c.method)
        metrics_file = open(self.out / "metrics.jsonl", "a") if d.main else contextlib.nullcontext()
        with metrics_file as mf, contextlib.closing(bar):
            while self.step_count < c.max_steps:
                epoch = self.loader.position.epoch
                batches = [{k: (v if k == "sample_index" else v.to(d.device, non_blocking=True))
                            for k, v in mb.items()} for mb in self.loader.next()]
                if d.device.type == "cuda":
                    torch.cuda.synchronize(d.device)
                t0 = time.perf_counter()
                skipped_before = run.step.skipped_steps
                m = run.step(batches)
                lr = run.optimizer.param_groups[0]["lr"]
                self.scheduler.step()
                loss, loss2 = m.loss, m.perturbed_loss  # global; reading them waits for the step
                dt = time.perf_counter() - t0
                if run.step.skipped_steps > skipped_before:  # nonfinite="skip": theta restored, no update
                    self.skipped_steps += 1
                    self._skips_in_a_row += 1
                    if self._skips_in_a_row >= c.max_skipped_steps:
                        self._stop_non_finite(f"step {self.step_count + 1}: {self._skips_in_a_row} steps in a "
                                              f"row skipped for a NaN or infinite loss or gradient "
                                              f"(max_skipped_steps)")
                else:
                    self._skips_in_a_row = 0
                    if not math.isfinite(loss) or (loss2 is not None and not math.isfinite(loss2)):
                        self._stop_non_finite(f"step {self.step_count + 1}: the loss is {loss} (perturbed {loss2})")
                self.step_count += 1
                if d.main:
                    record = self._record(m, epoch, lr, dt, tokens_per_step)
                    mf.write(json.dumps(json_safe(record)) + "\n")
                    mf.flush()
                    self.reporter.log("train", record, self.step_count)
                    post = {"loss": f"{loss:.3f}", "ppl": f"{math.exp(min(loss, 50)):.1f}",
                            "tok/s": f"{tokens_per_step / dt:.0f}"}
                    if m.divergence is not None:
                        post["d"] = f"{m.divergence:.2e}"
                    if self.skipped_steps:
                        post["skipped"] = self.skipped_steps
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
                if c.eval_interval and self.step_count % c.eval_interval == 0 and self.step_count < c.max_steps:
                    self.evaluate()
                if c.save_interval and self.step_count % c.save_interval == 0:
                    self.save_checkpoint()

    def _record(self, m, epoch: int, lr: float, dt: float, tokens_per_step: int) -> dict:
        return {"step": self.step_count, "epoch": epoch, "loss": m.loss, "perturbed_loss": m.perturbed_loss,
                "divergence": m.divergence, "divergence_clamped": m.divergence_clamped,
                "radius": m.radius, "grad_norm": m.grad_norm, "eps_norm": m.eps_norm,
                "eps_applied": m.eps_applied, "penalty": m.penalty, "clip_norm": m.clip_norm,
                "ascent_skipped": m.ascent_skipped, "step_skipped": m.step_skipped,
                "skipped_steps": self.skipped_steps, "lr": lr,
                "tokens_per_s": tokens_per_step / dt, "step_time_s": dt,
                "peak_mem_mb": peak_memory_mb(self.dist.device)}

    def _finish(self) -> dict:
        from tqdm import tqdm

        c, d = self.config, self.dist
        best = min(self.history, key=lambda r: r["valid_ppl"] if math.isfinite(r["valid_ppl"]) else math.inf)
        name = c.method if c.max_steps else "zero-shot"
        summary = {k: best[k] for k in ("train_domain", "domains", "in_domain_ppl", "zs_avg")}
        extra = {"analysis": self.analysis()} if c.analysis else {}
        if c.nonfinite == "skip":
            extra["skipped_steps"] = self.skipped_steps
        if d.main:
            write_eval_json(self.out / "eval.json", summary, method=name, model=c.model, step=best["step"],
                            valid_ppl=best["valid_ppl"], split=c.eval_split,
                            selected_by="lowest training-domain validation perplexity", **extra)
            write_eval_md(self.out / "eval.md", [(name, summary)],
                          title=f"{c.model} on {c.train_domain}: {c.eval_split} perplexity")
            if c.analysis:
                with open(self.out / "eval.md", "a") as f:
                    f.write("\n" + analysis_table(name, extra["analysis"], self.step_count) + "\n")
        self.export()
        self.reporter.close()
        if d.main:
            tqdm.write("\n" + (self.out / "eval.md").read_text().strip() + "\n")  # the results table
            tqdm.write(f"done: {self.out}/eval.json (step {best['step']}, {c.train_domain} "
                       f"{fmt(summary['in_domain_ppl'])}, ZS Avg {fmt(summary['zs_avg'])})")
        return summary

    def analysis(self) -> dict:
        """The paper's Table 5 for the current model: epsilon-sharpness and CKA to the starting
        model (rebuilt from model and seed as the run built it), per evaluation domain."""
        from tqdm import tqdm

        from ..analysis import table5_analysis

        self.build()
        start = build_model(self.config.model, self.model_config, self.config.seed).to(self.dist.device)
        if self.dist.main:
            tqdm.write(f"analysis: epsilon-sharpness and CKA on {len(self.tests)} domains")
        return table5_analysis(self.engine_run.eval_model, start, self.tests)

    def export(self, path: Optional[str | os.PathLike] = None) -> Path:
        """``save_pretrained`` (safetensors, full fp32 weights, the tokenizer) to ``path``
        (default output_dir/final), written whole or not at all; refused with NaN weights."""
        from ..runs import parameters_finite

        self.build()
        if not parameters_finite(self.engine_run.module, self.dist.device):
            self._stop_non_finite(f"step {self.step_count}: a parameter is NaN or infinite")
        final = Path(path) if path is not None else self.out / "final"
        tmp = final.parent / f".{final.name}.tmp"
        if self.dist.main:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        self.engine_run.save_final(tmp, self.tokenizer)
        barrier()
        if self.dist.main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        barrier()
        return final

    def _stop_non_finite(self, what: str) -> None:
        last = ckpt.checkpoints(self.out)
        raise NonFiniteRun(f"{what}; training stopped and nothing was exported (no checkpoint holds "
                           f"NaN). Last good checkpoint: {last[-1] if last else 'none'}. Lower lr or "
                           "set max_grad_norm, then resume or start again")

    def close(self) -> None:
        """End the process group (launchers call it at exit)."""
        shutdown()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def analysis_table(name: str, analysis: dict, step: int) -> str:
    doms = list(analysis["sharpness"])
    head = "| " + " | ".join([f"analysis (final model, step {step})", *doms]) + " |"
    rule = "|---|" + "---:|" * len(doms)
    sharp = "| " + " | ".join([f"{name}: epsilon-sharpness %",
                               *(f"{analysis['sharpness'][k]:.3g}" for k in doms)]) + " |"
    cka = "| " + " | ".join([f"{name}: CKA to the start", *(f"{analysis['cka'][k]:.4f}" for k in doms)]) + " |"
    return "\n".join([head, rule, sharp, cka])


__all__ = ["Run", "NonFiniteRun", "engine_kind", "peak_memory_mb", "analysis_table"]
