"""Perplexity of a causal LM over M2D2 domains, summed exactly across ranks; Table 3 writers.

    ppl = evaluate_domains(model, {"math": loader, "art": loader2})   # {name: perplexity}
    summary = eval_summary(ppl, train_domain="math")                  # + in_domain_ppl, zs_avg
    write_eval_json(out / "eval.json", summary); write_eval_md(out / "eval.md", [("tram", summary)])

Protocol (notes/data-and-models.md): perplexity = exp(total token cross-entropy / number of
predicted tokens) over the whole split. Each rank sums its token losses and counts in float64;
one all_reduce(SUM) of (loss_sum, count) per domain gives the exact global value (never a mean
of per-rank means). Samples marked ``is_pad`` (duplicates a sharded loader adds so that every
rank runs the same number of forward passes) contribute nothing.

The model is only called: ``model(input_ids=..., attention_mask=...)`` returning logits (a
tensor, a tuple whose first item is the logits, or an object with ``.logits``). Plain, DDP,
FSDP2 and DeepSpeed engines all qualify; nothing is gathered. Under FSDP / ZeRO-3 every rank
must call this with loaders of equal length (EvalLoader guarantees it).

    python -m tram_dist.evaluate runs/*/eval.json > table.md   # one Table-3 row per run
"""
from __future__ import annotations

import json
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class EvalResult:
    """Global (all-rank) totals for one domain split."""

    loss_sum: float  # sum of token cross-entropies, nats
    num_tokens: int  # predicted tokens

    @property
    def loss(self) -> float:
        return self.loss_sum / self.num_tokens if self.num_tokens else float("nan")

    @property
    def ppl(self) -> float:
        return math.exp(self.loss) if self.num_tokens else float("nan")


def _logits(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    raise TypeError(f"cannot find logits in the model output of type {type(out).__name__}")


def _model_device(model) -> torch.device:
    dev = getattr(model, "device", None)  # DeepSpeed engines and HF models expose one
    if isinstance(dev, torch.device):
        return dev
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def token_loss_sums(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None,
                    chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropies, number of predicted tokens) of one batch, float64.

    Position t's logits predict labels[t + 1]; labels == -100 are skipped; `weight` [b] (0 for
    padding samples) masks whole samples. Cross-entropy runs in float32 over chunks of rows so
    a bf16 [b, T, 50257] logits tensor is never copied whole to float32.
    """
    logits, targets = logits[:, :-1], labels[:, 1:]
    if weight is not None:
        targets = targets.masked_fill(~weight.bool()[:, None].to(targets.device), IGNORE_INDEX)
    logits = logits.reshape(-1, logits.size(-1))
    targets = targets.reshape(-1).to(logits.device)
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for i in range(0, targets.numel(), chunk):
        ce = F.cross_entropy(logits[i:i + chunk].float(), targets[i:i + chunk],
                             ignore_index=IGNORE_INDEX, reduction="sum")
        total += ce.double()
    count = (targets != IGNORE_INDEX).sum().to(torch.float64)
    return total, count


def _all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


@torch.no_grad()
def evaluate_loss(model, batches: Iterable[dict], *, device: torch.device | None = None,
                  autocast_dtype: torch.dtype | None = None, group=None) -> EvalResult:
    """Global token loss sum and count of `model` over this rank's `batches` (see module doc).

    Batches hold input_ids, attention_mask and optionally labels (default: input_ids where the
    attention mask is 1) and is_pad [b] (default: no padding samples).
    """
    device = device or _model_device(model)
    was_training = getattr(model, "training", False)
    model.eval()
    autocast = (torch.autocast(device_type=device.type, dtype=autocast_dtype)
                if autocast_dtype is not None else nullcontext())
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    try:
        for batch in batches:
            input_ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            mask = torch.ones_like(input_ids) if mask is None else mask.to(device)
            labels = batch.get("labels")
            labels = (input_ids.masked_fill(mask == 0, IGNORE_INDEX) if labels is None
                      else labels.to(device))
            pad = batch.get("is_pad")
            weight = None if pad is None else ~pad.to(device)
            with autocast:
                out = model(input_ids=input_ids, attention_mask=mask)
            loss, count = token_loss_sums(_logits(out), labels, weight)
            totals[0] += loss.to(device)
            totals[1] += count.to(device)
    finally:
        if was_training:
            model.train()
    totals = _all_reduce_sum(totals, group)
    return EvalResult(float(totals[0]), int(round(float(totals[1]))))


def perplexity(model, batches: Iterable[dict], **kwargs) -> float:
    """exp(mean token cross-entropy) over all ranks' batches."""
    return evaluate_loss(model, batches, **kwargs).ppl


def evaluate_domains(model, loaders: Mapping[str, Iterable[dict]], **kwargs) -> dict[str, float]:
    """{domain: perplexity} for each (domain -> this rank's batches) in `loaders`, in order.
    Every rank must pass the same domains in the same order (each domain is one all_reduce)."""
    return {name: perplexity(model, batches, **kwargs) for name, batches in loaders.items()}


def zs_average(ppls: Mapping[str, float], train_domain: str) -> float:
    """ZS Avg. (Table 3): mean perplexity over the evaluated domains other than the training one."""
    zs = [v for k, v in ppls.items() if k != train_domain]
    return sum(zs) / len(zs) if zs else float("nan")


def eval_summary(ppls: Mapping[str, float], train_domain: str) -> dict:
    """The eval.json record: train_domain, domains {name: ppl}, in_domain_ppl, zs_avg."""
    return {"train_domain": train_domain, "domains": dict(ppls),
            "in_domain_ppl": ppls.get(train_domain, float("nan")),
            "zs_avg": zs_average(ppls, train_domain)}


def _atomic_write(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def json_safe(obj):
    """NaN / inf -> None, recursively, so the file is strict JSON (e.g. ZS Avg. of no domain)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_eval_json(path: str | os.PathLike, summary: Mapping, **extra) -> None:
    """Write `summary` (plus any extra keys, e.g. method, step) as eval.json."""
    _atomic_write(path, json.dumps(json_safe({**summary, **extra}), indent=2) + "\n")


def format_table(rows: Sequence[tuple[str, Mapping]], digits: int = 2) -> str:
    """A Markdown table like Table 3: the training domain first, then the zero-shot domains (in
    the first row's order), then ZS Avg.; one row per (name, summary)."""
    if not rows:
        return ""
    first = rows[0][1]
    train = first["train_domain"]
    zs = [d for d in first["domains"] if d != train]
    for name, s in rows[1:]:
        zs += [d for d in s["domains"] if d != train and d not in zs]
    head = ["run", train, *zs, "ZS Avg."]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]

    def cell(v):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"

    for name, s in rows:
        if s["train_domain"] != train:
            raise ValueError(f"row {name!r} was trained on {s['train_domain']!r}, not {train!r}; "
                             "tabulate one training domain per table")
        vals = [s["domains"].get(train), *[s["domains"].get(d) for d in zs], s.get("zs_avg")]
        lines.append("| " + " | ".join([name] + [cell(v) for v in vals]) + " |")
    return "\n".join(lines) + "\n"


def write_eval_md(path: str | os.PathLike, rows: Sequence[tuple[str, Mapping]], title: str | None = None) -> None:
    """Write eval.md: a Table-3-style perplexity table (lower is better)."""
    text = (f"# {title}\n\n" if title else "") + format_table(rows)
    text += "\nPerplexity (lower is better); ZS Avg. = mean over the zero-shot domains.\n"
    _atomic_write(path, text)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Tabulate eval.json files as one Markdown table.")
    p.add_argument("files", nargs="+", help="eval.json files; the row name is 'method' or the folder")
    args = p.parse_args(argv)
    rows = []
    for f in args.files:
        s = json.loads(Path(f).read_text())
        rows.append((s.get("method") or Path(f).parent.name, s))
    print(format_table(rows), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
