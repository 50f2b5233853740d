"""One training step for every method, engine and launcher.

For a TRAM-family optimizer the step runs (Algorithm 1 / 2):

  pass 1   forward + backward at theta over every micro-batch (x + z for TRAMFisher)
  target   forward at the trust-region target (no grad): noised inputs, or the swapped-in
           previous / pretrained / EMA parameters; d = token-weighted mean divergence
  ascent   theta <- theta + eps from the accumulated pass-1 gradient (one all-reduce)
  pass 2   forward + backward at theta + eps over the same micro-batches
  descent  restore theta bit-exactly, base optimizer step on the pass-2 gradients

A plain optimizer (the AdamW baseline) runs pass 1 and the descent only. Every micro-batch
loss is weighted by its share of the global token count, so k micro-batches on n ranks give
the gradient of one step on the concatenated global batch. Any exception between the passes
restores the parameters before it propagates.
"""
from __future__ import annotations

import contextlib
import warnings
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor

from .divergence import Partial, get_divergence, token_mask
from .dropout import TARGET_DROPOUT, RNGState, eval_mode
from .engines import default_engine
from .engines.base import Engine
from .optim import PerturbedOptimizer
from .regularizers import TrustRegionPenalty
from .trust_region import NoisyInputs, ParamTarget

META_KEYS = ("sample_index",)


_DEFERRED = ("loss", "perturbed_loss", "eps_applied", "penalty")


@dataclass
class StepMetrics:
    """What one step did. Every number is global (the same on every rank) except ``tokens``.

    ``loss``, ``perturbed_loss``, ``eps_applied`` and ``penalty`` need a sum over ranks; the step starts it
    as one non-blocking all-reduce after pass 2 (or none on one process) and the first read of
    any of the three waits for it, so the step itself adds no blocking collective or host sync.
    """

    step: int
    loss: Optional[float]              # pass-1 loss (at x + z for TRAMFisher), token-weighted global mean
    perturbed_loss: Optional[float]    # pass-2 loss at theta + eps, token-weighted global mean
    divergence: Optional[float]        # d as measured, global token-weighted mean (TRAM)
    grad_norm: Optional[float]         # the perturbation norm ||T g|| (global)
    eps_norm: Optional[float]          # ||eps||_2 intended (global, exact in float32)
    ascent_skipped: bool               # non-finite d or norm, or zero gradient: plain descent
    step_skipped: bool                 # no update at all: fp16 overflow (pass 1 or 2), or skip_nonfinite
    tokens: int                        # tokens with labels on this rank
    clip_norm: Optional[float] = None  # pass-2 gradient norm before clipping
    eps_applied: Optional[float] = None  # ||eps|| as written into the working dtype (global)
    radius: Optional[float] = None     # the ascent radius used (lambda * max(d, 0) + nu for TRAM)
    lr: Optional[float] = None         # the base optimizer's lr (first group) for this step
    divergence_clamped: bool = False   # d < 0 (float rounding around 0) was taken as 0
    penalty: Optional[float] = None    # TRPO / R3F / MESA: the KL of loss + lambda * KL (pass 1, global mean)
    _deferred: Any = field(default=None, repr=False, compare=False)

    def __getattribute__(self, name):
        if name in _DEFERRED:
            pending = object.__getattribute__(self, "_deferred")
            if pending is not None:
                object.__setattr__(self, "_deferred", None)
                pending.fill(self)
        return object.__getattribute__(self, name)

    def as_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out.pop("_deferred", None)
        return out


class _GlobalSums:
    """This rank's [pass-1 loss sum, pass-2 loss sum, applied ||eps||^2 partial], summed over
    the data-parallel group by one async all-reduce, turned into means on first read."""

    def __init__(self, step: "TrainStep", partials: Tensor, n_global: int, *, has_loss2: bool,
                 has_applied: bool, has_penalty: bool = False):
        self.step, self.partials, self.n_global = step, partials, n_global
        self.has_loss2, self.has_applied, self.has_penalty = has_loss2, has_applied, has_penalty
        engine = step.engine
        self.work = None
        if engine.world_size > 1:
            self.work = dist.all_reduce(partials, op=dist.ReduceOp.SUM, group=engine.dp_group,
                                        async_op=True)

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work = None

    def fill(self, m: "StepMetrics") -> None:
        self.wait()
        loss_sum, loss2_sum, applied_sq, penalty_sum = self.partials.tolist()
        n = max(self.n_global, 1)
        object.__setattr__(m, "loss", loss_sum / n)
        object.__setattr__(m, "penalty", penalty_sum / n if self.has_penalty else None)
        object.__setattr__(m, "perturbed_loss", loss2_sum / n if self.has_loss2 else None)
        if self.has_applied:
            applied = math.sqrt(max(applied_sq, 0.0))
            object.__setattr__(m, "eps_applied", applied)
            self.step._check_applied(applied, object.__getattribute__(m, "eps_norm"))


class TrainStep:
    """Callable running one optimizer step on this rank's micro-batches.

    Args:
        model: a Hugging Face causal-LM or sequence-classification model (plain, DDP, FSDP2 or
            a DeepSpeed engine), called as ``model(**batch)`` and returning ``.loss``/``.logits``.
        optimizer: a ``PerturbedOptimizer`` (TRAM, SAM, ...) or any torch optimizer (baseline).
        trust_region: ``NoisyInputs`` (TRAM-d_x, TRAMFisher) or a ``ParamTarget`` (TRAM-d_theta).
        divergence: ``"kl"`` (forward KL, Eq. 4/5), ``"kl-reverse"``, ``"kl-symmetric"``,
            ``"l2"``, ``"mmd"`` or a callable ``(target_logits, logits, mask) -> (sum, count)``.
        autocast_dtype: ``torch.bfloat16`` or ``torch.float16`` to run the passes in autocast.
        scaler: a ``torch.amp.GradScaler`` for fp16 (unscaled once per pass; overflow skips).
        max_grad_norm: clip the pass-2 (descent) gradients to this norm.
        seed: seeds the input noise together with the step and the global sample index.
        engine: the engine adapter; defaults to the optimizer's (single process / DDP).
        target_dropout: how the target forward sees dropout (see ``tram_dist.dropout``):
            ``"shared"`` (default: the masks of the pass-1 forward it is compared with, so d
            measures the trust region and not dropout noise), ``"off"`` (eval mode) or
            ``"independent"`` (fresh masks, as the authors' code).
        divergence_fraction: compute d on this fraction of the sequences of each step (chosen
            by a hash of (seed, step, global sample index): deterministic and the same at any
            world size); 1 (default) uses all of them. With shared dropout masks a subset
            needs its own no-grad forward at theta, so d costs 2 x fraction forwards.
        skip_nonfinite: when a loss of this step (pass 1 or 2) or, without loss scaling, a
            reduced gradient is NaN or infinite on any rank, restore theta, drop the gradients
            and skip the update (``StepMetrics.step_skipped``, counted in ``.skipped_steps``)
            instead of stepping on it. Costs one small all-reduce and a host sync per step.
            Under loss scaling an overflowing gradient is the scaler's to skip, as before.

    Every call puts the model in train mode (as ``transformers.Trainer`` does); evaluation
    helpers put it in eval mode and back.
    """

    def __init__(self, model, optimizer, *, trust_region=None, divergence="kl", autocast_dtype=None,
                 scaler=None, max_grad_norm: Optional[float] = None, seed: int = 0,
                 engine: Optional[Engine] = None, causal: Optional[bool] = None,
                 target_dropout: str = "shared", divergence_fraction: float = 1.0,
                 skip_nonfinite: bool = False):
        from .integrations.accelerate import unwrap_optimizer

        optimizer = unwrap_optimizer(optimizer)  # accelerate's wrapper: this step steps what is inside
        self.model = model
        self.optimizer = optimizer
        self.perturbed = isinstance(optimizer, PerturbedOptimizer)
        self.engine = engine or (optimizer.engine if self.perturbed else default_engine(optimizer))
        self.engine.bind_model(model)
        self.trust_region = trust_region
        self.divergence = get_divergence(divergence)
        if autocast_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"autocast_dtype must be None, torch.bfloat16 or torch.float16, got {autocast_dtype}")
        self.autocast_dtype = autocast_dtype
        self.scaler = scaler
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
        self.max_grad_norm = max_grad_norm
        self.seed = int(seed)
        self.causal = causal
        if target_dropout not in TARGET_DROPOUT:
            raise ValueError(f"target_dropout must be one of {', '.join(TARGET_DROPOUT)}, got {target_dropout!r}")
        self.target_dropout = target_dropout
        if not isinstance(divergence_fraction, (int, float)) or isinstance(divergence_fraction, bool) \
                or not 0.0 < divergence_fraction <= 1.0:
            raise ValueError(f"divergence_fraction must be a number in (0, 1], got {divergence_fraction!r}")
        if divergence_fraction < 1.0 and getattr(optimizer, "divergence_reduction", "") == "released":
            raise ValueError("divergence_fraction < 1 is not defined for the released code's d' "
                             "(a mean over the whole batch); use 1.0 with tram-released-*")
        self.divergence_fraction = float(divergence_fraction)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.skipped_steps = 0  # steps skipped for a non-finite loss or gradient (skip_nonfinite)
        self._warned_applied = False
        self._pending: Optional[_GlobalSums] = None
        self._warned_index = False
        self._baseline_steps = 0
        self.penalty = trust_region if isinstance(trust_region, TrustRegionPenalty) else None
        self._check_method()
        target = self.penalty.target if self.penalty is not None else trust_region
        if isinstance(target, ParamTarget):
            optimizer.attach_trust_region(target)

    def _check_method(self) -> None:
        opt, tr = self.optimizer, self.trust_region
        if not self.perturbed:
            if isinstance(tr, TrustRegionPenalty):
                raise ValueError(f"{tr!r} keeps its target beside each parameter slice: wrap "
                                 f"{type(opt).__name__} in tram_dist.optim.Descent (build_method "
                                 f"'{tr.name}' does)")
            if tr is not None:
                raise ValueError(f"trust_region={tr!r} needs a TRAM optimizer; {type(opt).__name__} "
                                 f"takes none")
            return
        name = type(opt).__name__
        if self.penalty is not None:
            if opt.needs_divergence or opt.pass1_at_noised_inputs:
                raise ValueError(f"{tr!r} is a regularizer of the loss; {name} sizes its ascent by "
                                 f"its own trust region: use Descent or ASAM with it (build_method "
                                 f"'{tr.name}' or 'asam+{tr.name}')")
            return
        if not opt.has_ascent:
            raise ValueError(f"{name} has no ascent: give it a TrustRegionPenalty (build_method "
                             f"'trpo', 'r3f' or 'mesa'), or use the base optimizer alone")
        if opt.needs_divergence and not isinstance(tr, (NoisyInputs, ParamTarget)):
            raise ValueError(f"{name} needs a trust region: NoisyInputs(sigma), PreviousParams(), "
                             f"PretrainedParams() or EMAParams(decay); got {tr!r}")
        if opt.pass1_at_noised_inputs and not isinstance(tr, NoisyInputs):
            raise ValueError(f"{name} runs pass 1 at noised inputs: pass trust_region=NoisyInputs(sigma)")
        if not opt.needs_divergence and not opt.pass1_at_noised_inputs and tr is not None:
            raise ValueError(f"{name} has a fixed radius rho and takes no trust region; got {tr!r}")

    # ------------------------------------------------------------------ helpers
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device = next(iter(self.model.parameters())).device.type
        return torch.autocast(device_type=device, dtype=self.autocast_dtype)

    def _no_grad_model(self):
        # DDP's forward would sync buffers; a no-grad target forward needs the inner module.
        from torch.nn.parallel import DistributedDataParallel
        return self.model.module if isinstance(self.model, DistributedDataParallel) else self.model

    def _is_causal(self, logits: Tensor) -> bool:
        return logits.dim() == 3 if self.causal is None else self.causal

    def _split(self, batch: Dict[str, Any], offset: int):
        inputs = {k: v for k, v in batch.items() if k not in META_KEYS}
        index = batch.get("sample_index")
        if index is None:
            if not self._warned_index:
                warnings.warn("micro-batches carry no 'sample_index': input noise is seeded by the "
                              "position on this rank and is not invariant to the world size",
                              RuntimeWarning, stacklevel=3)
                self._warned_index = True
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            n = next(iter(inputs.values())).shape[0]
            index = torch.arange(n) + offset + rank * 1_000_000
        return inputs, torch.as_tensor(index).reshape(-1).cpu()

    @staticmethod
    def _count(inputs: Dict[str, Tensor]) -> Tensor:
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError("each micro-batch needs 'labels' (use -100 for tokens without a label)")
        if labels.dim() >= 2:  # causal LM: position i predicts labels[i + 1]
            return (labels[:, 1:] != -100).sum()
        return (labels != -100).sum()

    def _global_counts(self, n_local: int, seqs_local: int, d_tokens_local: int):
        """(labelled tokens, sequences, labelled tokens of the rows d uses) of the global batch:
        one small all-reduce."""
        if self.engine.world_size == 1:
            return n_local, seqs_local, d_tokens_local
        t = torch.tensor([float(n_local), float(seqs_local), float(d_tokens_local)],
                         device=self.engine_device())
        self.engine.all_reduce_sum_(t)
        return tuple(int(v) for v in t.tolist())

    def _divergence_rows(self, parts) -> List[Optional[Tensor]]:
        """Per micro-batch, the rows d is computed on (None: all of them)."""
        opt = self.optimizer
        if self.divergence_fraction >= 1.0 or not (self.perturbed and opt.needs_divergence):
            return [None] * len(parts)
        from .trust_region import _sample_seed
        step = self._noise_step()
        limit = self.divergence_fraction * float(1 << 63)
        return [torch.tensor([_sample_seed(self.seed + 7919, step, int(i)) < limit for i in index.tolist()],
                             dtype=torch.bool) for _, index in parts]

    @staticmethod
    def _subset(inputs: Dict[str, Tensor], rows: Optional[Tensor]) -> Dict[str, Tensor]:
        if rows is None:
            return inputs
        return {k: v[rows.to(v.device)] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in inputs.items()}

    def engine_device(self):
        return next(iter(self.model.parameters())).device

    def _noise_step(self) -> int:
        return self.optimizer.step_count if self.perturbed else self._baseline_steps

    def _backward(self, loss: Tensor, weight: float, sync: bool) -> None:
        loss = loss * weight
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        self.engine.backward(self.model, loss, sync=sync)

    # ------------------------------------------------------------------ the step
    def __call__(self, micro_batches: Union[Dict[str, Any], Sequence[Dict[str, Any]]]) -> StepMetrics:
        if isinstance(micro_batches, dict):
            micro_batches = [micro_batches]
        if not micro_batches:
            raise ValueError("TrainStep needs at least one micro-batch")
        if self._pending is not None:  # last step's metric sums: long done, never left unwaited
            self._pending.wait()
            self._pending = None
        self.model.train()
        parts, offset = [], 0
        for mb in micro_batches:
            inputs, index = self._split(mb, offset)
            offset += index.numel()
            parts.append((inputs, index))
        self._rows = self._divergence_rows(parts)
        counts = [self._count(inputs) for inputs, _ in parts]
        counts += [self._count(self._subset(inputs, rows)) for (inputs, _), rows in zip(parts, self._rows)
                   if rows is not None]
        counts = torch.stack(counts).tolist()  # one sync
        n_local, n_rows_local = sum(counts[:len(parts)]), sum(counts[len(parts):])
        n_global, self._seqs_global, self._d_tokens_global = self._global_counts(n_local, offset, n_rows_local)
        counts = counts[:len(parts)]
        if self._d_tokens_global == 0:  # no labelled token in the chosen rows anywhere: use all
            self._rows = [None] * len(parts)
        if n_global == 0:
            raise ValueError("the global batch has no token with a label (all labels are -100)")
        world = self.engine.world_size
        # engines average gradients over ranks: weight each micro-batch mean by its token share
        weights = [c * world / n_global for c in counts]
        try:
            if self.penalty is not None:
                return self._penalized_step(parts, counts, weights, n_local, n_global)
            if self.perturbed:
                return self._perturbed_step(parts, counts, weights, n_local, n_global)
            return self._plain_step(parts, counts, weights, n_local, n_global)
        except BaseException:
            if self.perturbed:
                self.optimizer.restore()
            raise

    def _forward_backward(self, parts, counts, weights) -> Tensor:
        """Forward + backward over every micro-batch; returns the token-weighted loss sum."""
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.engine_device())
        last = len(parts) - 1
        for i, (inputs, _) in enumerate(parts):
            with self._autocast():
                out = self.model(**inputs)
            loss_sum += out.loss.detach().float() * counts[i]
            self._backward(out.loss, weights[i], sync=i == last)
            del out
        return loss_sum

    def _divergence_inputs(self, inputs, index, logits, rng, rows):
        """The inputs, indices, pass-1-side logits and RNG state d compares on (a subset of
        rows with ``divergence_fraction`` < 1). A subset's dropout masks cannot be replayed
        from the full forward's, so with shared masks the subset gets its own no-grad forward
        at theta, whose RNG state the target forward then replays."""
        if rows is None:
            return inputs, index, logits, rng
        sub = self._subset(inputs, rows)
        sub_index = index[rows]
        if self.target_dropout != "shared" or not sub_index.numel():
            return sub, sub_index, logits[rows.to(logits.device)], None
        rng = RNGState.capture(self.engine_device())
        with torch.no_grad(), self._autocast():
            sub_logits = self._no_grad_model()(**sub).logits
        return sub, sub_index, sub_logits, rng

    def _released(self) -> bool:
        return getattr(self.optimizer, "divergence_reduction", "token_mean") == "released"

    def _divergence_denominator(self, n_global: int, parts) -> float:
        """d is a mean over the labelled tokens; the released code's d' (``TRAMReleased``) is
        F.kl_div's mean over every element (sequences x positions x vocabulary) divided
        again by the number of sequences (here of the global batch)."""
        if not self._released():
            return float(self._d_tokens_global if any(r is not None for r in self._rows) else n_global)
        elements_per_sequence = self._logit_elements_per_sequence
        return float(self._seqs_global) ** 2 * elements_per_sequence

    def _divergence_sum(self, target_logits: Tensor, logits: Tensor, inputs) -> Tensor:
        """Sum over this micro-batch's labelled tokens of d(target || current) (every position
        for the released code's d', whose mean has no mask)."""
        if self._released():
            self._logit_elements_per_sequence = logits[0].numel()
            mask = torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)
            total, _ = self.divergence(target_logits, logits, mask)
            return total.float()
        mask = token_mask(logits, inputs.get("labels"), inputs.get("attention_mask"),
                          causal=self._is_causal(logits))
        total, _ = self.divergence(target_logits, logits, mask)
        return total.float()

    def _plain_step(self, parts, counts, weights, n_local, n_global) -> StepMetrics:
        lr = _lr_of(self.optimizer)
        loss_sum = self._forward_backward(parts, counts, weights)
        clip = None
        skipped = False
        opt = self.optimizer
        if self._nonfinite(loss_sum):
            self.engine.discard_grads()
            opt.zero_grad(set_to_none=True)
            self._baseline_steps += 1
            return self._metrics(self._baseline_steps, loss_sum, None, n_local, n_global, None, lr=lr,
                                 step_skipped=True)
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        if self.max_grad_norm is not None:
            clip = float(self.engine.clip_grad_norm_(self.max_grad_norm))
        if self.scaler is not None:
            before = self.scaler.get_scale()
            self.engine.base_step(scaler=self.scaler)
            self.scaler.update()
            skipped = self.scaler.get_scale() < before
        else:
            self.engine.base_step()
            skipped = bool(getattr(self.engine, "step_skipped", False))  # DeepSpeed's loss scaler
        opt.zero_grad(set_to_none=True)
        self._baseline_steps += 1
        return self._metrics(self._baseline_steps, loss_sum, None, n_local, n_global, None, lr=lr,
                             step_skipped=skipped, clip=clip)

    def _perturbed_step(self, parts, counts, weights, n_local, n_global) -> StepMetrics:
        opt, tr = self.optimizer, self.trust_region
        step = opt.step_count
        lr = _lr_of(opt)
        noisy_pass1 = opt.pass1_at_noised_inputs
        noisy_target = opt.needs_divergence and isinstance(tr, NoisyInputs)
        param_target = opt.needs_divergence and isinstance(tr, ParamTarget)
        share_masks = opt.needs_divergence and self.target_dropout == "shared"
        device = self.engine_device()
        d_sum = torch.zeros((), dtype=torch.float32, device=device)
        kept: List[tuple] = []  # (pass-1 logits, the RNG state their forward started from)
        loss_sum = torch.zeros((), dtype=torch.float32, device=device)

        # pass 1: gradient at theta (at x + z for TRAMFisher)
        for i, (inputs, index) in enumerate(parts):
            noise = (tr.applied(self.model, seed=self.seed, step=step, sample_index=index)
                     if noisy_pass1 else contextlib.nullcontext())
            rng = RNGState.capture(device) if share_masks else None
            with self._autocast(), noise:
                out = self.model(**inputs)
            loss_sum += out.loss.detach().float() * counts[i]
            self._backward(out.loss, weights[i], sync=i == len(parts) - 1)
            logits = out.logits.detach() if opt.needs_divergence else None
            del out
            if opt.needs_divergence:
                d_inputs, d_index, logits, rng = self._divergence_inputs(inputs, index, logits, rng, self._rows[i])
            if noisy_target:  # d_x: same parameters, inputs x + z
                if d_index.numel():
                    d_sum += self._divergence_at_noise(d_inputs, d_index, logits, step, rng)
            elif param_target:
                kept.append((d_inputs, logits, rng))
            del logits

        if self._pass1_overflowed():
            return self._metrics(step, loss_sum, None, n_local, n_global, None, lr=lr,
                                 step_skipped=True)

        # the target forward at theta_{t-1} / theta_0 / EMA, swapped into the parameters in place
        if param_target:
            opt.swap_in_target()
            inner = self._no_grad_model()
            for inputs, logits, rng in kept:
                if not logits.shape[0]:
                    continue
                with torch.no_grad(), self._autocast(), self._target_dropout(inner, rng):
                    target_logits = inner(**inputs).logits
                d_sum += self._divergence_sum(target_logits, logits, inputs).to(device)
                del target_logits
            kept.clear()

        divergence = None
        if opt.needs_divergence:
            local = d_sum / self._divergence_denominator(n_global, parts)
            divergence = Partial(local) if self.engine.world_size > 1 else local
        ascent = opt.first_step(divergence, zero_grad=True)

        # pass 2: gradient at theta + eps over the same micro-batches
        loss2_sum = self._forward_backward(parts, counts, weights)

        clip, skipped = self._descend(loss_sum, loss2_sum)
        return self._metrics(step + 1, loss_sum, loss2_sum, n_local, n_global, ascent, lr=lr,
                             step_skipped=skipped, clip=clip)

    def _penalized_step(self, parts, counts, weights, n_local, n_global) -> StepMetrics:
        """loss + lambda * KL (TRPO, MESA, R3F), alone (Descent) or under ASAM's ascent.

        TRPO / MESA: one no-grad target forward per micro-batch at the swapped-in theta_{t-1} /
        EMA, kept for both passes. R3F: a second forward at x + z in every pass, with gradient.
        """
        opt, pen = self.optimizer, self.penalty
        step = opt.step_count
        lr = _lr_of(opt)
        device = self.engine_device()
        rngs: List[Optional[RNGState]] = [None] * len(parts)
        targets = None
        if isinstance(pen.target, ParamTarget):
            opt.swap_in_target(before_backward=True)
            inner = self._no_grad_model()
            targets = []
            for i, (inputs, _) in enumerate(parts):
                if self.target_dropout == "shared":
                    rngs[i] = RNGState.capture(device)
                off = eval_mode(inner) if self.target_dropout == "off" else contextlib.nullcontext()
                with torch.no_grad(), self._autocast(), off:
                    targets.append(inner(**inputs).logits.detach())
            opt.swap_out_target()

        loss_sum, penalty_sum = self._penalized_passes(parts, counts, weights, targets, rngs, step)
        ascent, loss2_sum = None, None
        if opt.has_ascent:
            if self._pass1_overflowed():
                return self._metrics(step, loss_sum, None, n_local, n_global, None, lr=lr,
                                     step_skipped=True, penalty_sum=penalty_sum)
            ascent = opt.first_step(None, zero_grad=True)
            loss2_sum, _ = self._penalized_passes(parts, counts, weights, targets, rngs, step)
        clip, skipped = self._descend(loss_sum, loss2_sum, penalty_sum)
        return self._metrics(step + 1, loss_sum, loss2_sum, n_local, n_global, ascent, lr=lr,
                             step_skipped=skipped, clip=clip, penalty_sum=penalty_sum)

    def _penalized_passes(self, parts, counts, weights, targets, rngs, step):
        """One forward + backward of loss + lambda * KL over every micro-batch; returns the
        token-weighted loss sum and the KL sum (both detached)."""
        pen = self.penalty
        device = self.engine_device()
        loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        penalty_sum = torch.zeros((), dtype=torch.float32, device=device)
        for i, (inputs, index) in enumerate(parts):
            if pen.noisy and rngs[i] is None and self.target_dropout == "shared":
                rngs[i] = RNGState.capture(device)  # the clean forward's masks, for x + z
                replay = contextlib.nullcontext()
            else:
                replay = rngs[i].replayed() if rngs[i] is not None else contextlib.nullcontext()
            with self._autocast(), replay:
                out = self.model(**inputs)
            if pen.noisy:  # R3F: the same model at x + z, with gradient
                with self._autocast(), self._target_dropout(self.model, rngs[i]), \
                        pen.target.applied(self.model, seed=self.seed, step=step, sample_index=index):
                    target_logits = self.model(**inputs).logits
            else:
                target_logits = targets[i]
            mask = token_mask(out.logits, inputs.get("labels"), inputs.get("attention_mask"),
                              causal=self._is_causal(out.logits))
            kl = pen.kl_sum(target_logits, out.logits, mask)
            total = out.loss + pen.lam * kl / max(counts[i], 1)
            loss_sum += out.loss.detach().float() * counts[i]
            penalty_sum += kl.detach().float()
            self._backward(total, weights[i], sync=i == len(parts) - 1)
            del out, target_logits, kl, total
        return loss_sum, penalty_sum

    def _pass1_overflowed(self) -> bool:
        """fp16: unscale pass 1's gradients once; on an overflow drop them and skip the step."""
        scaler, opt = self.scaler, self.optimizer
        if scaler is None:
            # an engine with its own loss scaler (DeepSpeed fp16 under ZeRO-1/2) checks, unscales
            # and skips itself
            check = getattr(self.engine, "pass1_overflowed", None)
            return bool(check()) if check is not None else False
        scaler.unscale_(opt)
        if not _found_inf(scaler, opt):
            return False
        opt.zero_grad(set_to_none=True)
        scaler.update()
        return True

    def _descend(self, *loss_sums):
        """Restore theta and step the base optimizer on the pass-2 gradients (the scaler's
        update with it); returns (pass-2 norm before clipping or None, step skipped by fp16 or
        by ``skip_nonfinite``)."""
        if self._nonfinite(*loss_sums):
            self.optimizer.second_step(skip_update=True)
            return None, True
        scaler = self.scaler
        before = scaler.get_scale() if scaler is not None else None
        clip = self.optimizer.second_step(scaler=scaler, max_grad_norm=self.max_grad_norm)
        if scaler is None:  # an engine that skipped its own base step (DeepSpeed's loss scaler)
            return (None if clip is None else float(clip)), bool(getattr(self.engine, "step_skipped", False))
        scaler.update()
        return (None if clip is None else float(clip)), scaler.get_scale() < before

    def _nonfinite(self, *loss_sums) -> bool:
        """``skip_nonfinite``: whether on any rank a loss sum of this step or (without loss
        scaling) a reduced gradient is NaN or infinite; counts the skip. False when off (no
        collective)."""
        if not self.skip_nonfinite:
            return False
        device = self.engine_device()
        checks = [t.detach().float().reshape(()).to(device) for t in loss_sums if t is not None]
        scaled = self.scaler is not None or getattr(self.engine, "loss_scale", 1.0) != 1.0
        if not scaled:  # max |g| is NaN or inf exactly when an element is (no overflow in a sum)
            checks += [torch.linalg.vector_norm(sl.grad, float("inf")).float().reshape(()).to(device)
                       for group in self.engine.slice_groups() for sl in group.slices if sl.grad is not None]
        bad = (~torch.isfinite(torch.stack(checks))).any().float().reshape(1) if checks else \
            torch.zeros(1, device=device)
        self.engine.all_reduce_sum_(bad)
        if bad.item() > 0:
            self.skipped_steps += 1
            return True
        return False

    def _target_dropout(self, model, rng: Optional[RNGState]):
        """The dropout the target forward sees (``target_dropout``)."""
        if self.target_dropout == "off":
            return eval_mode(model)
        if self.target_dropout == "shared" and rng is not None:
            return rng.replayed()
        return contextlib.nullcontext()

    def _divergence_at_noise(self, inputs, index, logits, step, rng) -> Tensor:
        inner = self._no_grad_model()
        with torch.no_grad(), self._autocast(), self._target_dropout(inner, rng), \
                self.trust_region.applied(inner, seed=self.seed, step=step, sample_index=index):
            target_logits = inner(**inputs).logits
        return self._divergence_sum(target_logits, logits, inputs)

    def _metrics(self, step, loss_sum, loss2_sum, n_local, n_global, ascent, *, lr, step_skipped,
                 clip=None, penalty_sum=None) -> StepMetrics:
        ascent = ascent or {}
        device = loss_sum.device
        applied = ascent.get("applied_sq")
        if applied is not None:
            # parameter-shaped: ranks holding a replica of another's slices (DDP: all but rank 0,
            # HSDP: all but the first replica group) add zeros, so the sum over dp_group counts
            # each element once; the losses beside it are per-sample and count on every rank
            applied = self.engine.param_partial(applied)
        zero = torch.zeros((), dtype=torch.float32, device=device)
        partials = torch.stack([loss_sum.float().reshape(()),
                                (loss2_sum if loss2_sum is not None else zero).float().reshape(()).to(device),
                                (applied if applied is not None else zero).reshape(()).to(device),
                                (penalty_sum if penalty_sum is not None else zero).float().reshape(()).to(device)])
        sums = _GlobalSums(self, partials, n_global, has_loss2=loss2_sum is not None,
                           has_applied=applied is not None, has_penalty=penalty_sum is not None)
        self._pending = sums
        return StepMetrics(
            step=step, loss=None, perturbed_loss=None,
            divergence=ascent.get("divergence"), grad_norm=ascent.get("grad_norm"),
            eps_norm=ascent.get("eps_norm"), ascent_skipped=bool(ascent.get("ascent_skipped", False)),
            step_skipped=step_skipped, tokens=n_local, clip_norm=clip,
            eps_applied=0.0 if ascent.get("ascent_skipped") else None,
            radius=ascent.get("radius"), lr=lr,
            divergence_clamped=bool(ascent.get("divergence_clamped", False)), _deferred=sums)

    def _check_applied(self, applied: float, intended: Optional[float]) -> None:
        if self._warned_applied or not intended or applied >= 0.5 * intended:
            return
        self._warned_applied = True
        warnings.warn(
            f"only {applied:.3g} of the intended ||eps|| = {intended:.3g} survived rounding to the "
            f"working dtype: the ascent hardly happens (bf16 keeps 8 bits of mantissa). Use fp32 "
            f"working parameters (bf16 autocast instead), or a larger radius (radius_scale / rho); "
            f"StepMetrics.eps_applied reports it every step. Shown once.", RuntimeWarning, stacklevel=2)


def _lr_of(optimizer) -> Optional[float]:
    groups = getattr(optimizer, "param_groups", None)
    return float(groups[0]["lr"]) if groups else None


def _found_inf(scaler, optimizer) -> bool:
    # GradScaler records per-optimizer overflow flags in unscale_(); read them (one sync)
    state = scaler._per_optimizer_states[id(optimizer)]
    return bool(sum(v.item() for v in state["found_inf_per_device"].values()))
