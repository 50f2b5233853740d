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
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor

from .divergence import Partial, get_divergence, token_mask
from .engines import default_engine
from .engines.base import Engine
from .optim import PerturbedOptimizer
from .trust_region import NoisyInputs, ParamTarget

META_KEYS = ("sample_index",)


@dataclass
class StepMetrics:
    step: int
    loss: float                        # pass-1 loss (at x + z for TRAMFisher), this rank's tokens
    perturbed_loss: Optional[float]    # pass-2 loss at theta + eps
    divergence: Optional[float]        # d, global token-weighted mean (TRAM)
    grad_norm: Optional[float]         # the perturbation norm ||T g|| (global)
    eps_norm: Optional[float]          # ||eps||_2 (global)
    ascent_skipped: bool               # non-finite d or norm: plain descent this step
    step_skipped: bool                 # fp16 overflow in pass 1 or 2: no update at all
    tokens: int                        # tokens with labels on this rank
    clip_norm: Optional[float] = None  # pass-2 gradient norm before clipping

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


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
    """

    def __init__(self, model, optimizer, *, trust_region=None, divergence="kl", autocast_dtype=None,
                 scaler=None, max_grad_norm: Optional[float] = None, seed: int = 0,
                 engine: Optional[Engine] = None, causal: Optional[bool] = None):
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
        self._warned_index = False
        self._baseline_steps = 0
        self._check_method()
        if isinstance(trust_region, ParamTarget):
            optimizer.attach_trust_region(trust_region)

    def _check_method(self) -> None:
        opt, tr = self.optimizer, self.trust_region
        if not self.perturbed:
            if tr is not None:
                raise ValueError(f"trust_region={tr!r} needs a TRAM optimizer; {type(opt).__name__} "
                                 f"takes none")
            return
        name = type(opt).__name__
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

    def _global_tokens(self, n_local: int) -> int:
        if self.engine.world_size == 1:
            return n_local
        t = torch.tensor([float(n_local)], device=self.engine_device())
        self.engine.all_reduce_sum_(t)
        return int(t.item())

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
        parts, offset = [], 0
        for mb in micro_batches:
            inputs, index = self._split(mb, offset)
            offset += index.numel()
            parts.append((inputs, index))
        counts = torch.stack([self._count(inputs) for inputs, _ in parts]).tolist()  # one sync
        n_local = sum(counts)
        n_global = self._global_tokens(n_local)
        if n_global == 0:
            raise ValueError("the global batch has no token with a label (all labels are -100)")
        world = self.engine.world_size
        # engines average gradients over ranks: weight each micro-batch mean by its token share
        weights = [c * world / n_global for c in counts]
        try:
            if self.perturbed:
                return self._perturbed_step(parts, counts, weights, n_local, n_global)
            return self._plain_step(parts, counts, weights, n_local)
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

    def _divergence_sum(self, target_logits: Tensor, logits: Tensor, inputs) -> Tensor:
        """Sum over this micro-batch's labelled tokens of d(target || current)."""
        mask = token_mask(logits, inputs.get("labels"), inputs.get("attention_mask"),
                          causal=self._is_causal(logits))
        total, _ = self.divergence(target_logits, logits, mask)
        return total.float()

    def _plain_step(self, parts, counts, weights, n_local) -> StepMetrics:
        loss_sum = self._forward_backward(parts, counts, weights)
        clip = None
        skipped = False
        opt = self.optimizer
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
        opt.zero_grad(set_to_none=True)
        self._baseline_steps += 1
        return StepMetrics(step=self._baseline_steps, loss=float(loss_sum) / max(n_local, 1), perturbed_loss=None,
                           divergence=None, grad_norm=None, eps_norm=None, ascent_skipped=False,
                           step_skipped=skipped, tokens=n_local, clip_norm=clip)

    def _perturbed_step(self, parts, counts, weights, n_local, n_global) -> StepMetrics:
        opt, tr, scaler = self.optimizer, self.trust_region, self.scaler
        step = opt.step_count
        last = len(parts) - 1
        noisy_pass1 = opt.pass1_at_noised_inputs
        noisy_target = opt.needs_divergence and isinstance(tr, NoisyInputs)
        param_target = opt.needs_divergence and isinstance(tr, ParamTarget)
        d_sum = torch.zeros((), dtype=torch.float32, device=self.engine_device())
        kept_logits: List[Tensor] = []
        loss_sum = 0.0

        # pass 1: gradient at theta (at x + z for TRAMFisher)
        for i, (inputs, index) in enumerate(parts):
            noise = (tr.applied(self.model, seed=self.seed, step=step, sample_index=index)
                     if noisy_pass1 else contextlib.nullcontext())
            with self._autocast(), noise:
                out = self.model(**inputs)
            loss_sum = loss_sum + out.loss.detach().float() * counts[i]
            self._backward(out.loss, weights[i], sync=i == last)
            logits = out.logits.detach() if opt.needs_divergence else None
            del out
            if noisy_target:  # d_x: same parameters, inputs x + z
                d_sum = d_sum + self._divergence_at_noise(inputs, index, logits, step)
            elif param_target:
                kept_logits.append(logits)
            del logits

        if scaler is not None:
            scaler.unscale_(opt)
            if _found_inf(scaler, opt):
                before = scaler.get_scale()
                opt.zero_grad(set_to_none=True)
                scaler.update()
                return self._metrics(step, loss_sum, None, n_local, None, step_skipped=True)

        # the target forward at theta_{t-1} / theta_0 / EMA, swapped into the parameters in place
        if param_target:
            opt.swap_in_target()
            inner = self._no_grad_model()
            for (inputs, _), logits in zip(parts, kept_logits):
                with torch.no_grad(), self._autocast():
                    target_logits = inner(**inputs).logits
                d_sum = d_sum + self._divergence_sum(target_logits, logits, inputs).to(d_sum.device)
                del target_logits
            kept_logits.clear()

        divergence = None
        if opt.needs_divergence:
            local = d_sum / n_global
            divergence = Partial(local) if self.engine.world_size > 1 else local
        ascent = opt.first_step(divergence, zero_grad=True)

        # pass 2: gradient at theta + eps over the same micro-batches
        loss2_sum = self._forward_backward(parts, counts, weights)

        before = scaler.get_scale() if scaler is not None else None
        clip = opt.second_step(scaler=scaler, max_grad_norm=self.max_grad_norm)
        skipped = False
        if scaler is not None:
            scaler.update()
            skipped = scaler.get_scale() < before
        return self._metrics(step + 1, loss_sum, loss2_sum, n_local, ascent, step_skipped=skipped,
                             clip=None if clip is None else float(clip))

    def _divergence_at_noise(self, inputs, index, logits, step) -> Tensor:
        inner = self._no_grad_model()
        with torch.no_grad(), self._autocast(), \
                self.trust_region.applied(inner, seed=self.seed, step=step, sample_index=index):
            target_logits = inner(**inputs).logits
        return self._divergence_sum(target_logits, logits, inputs)

    @staticmethod
    def _metrics(step, loss_sum, loss2_sum, n_local, ascent, *, step_skipped, clip=None) -> StepMetrics:
        ascent = ascent or {}
        n = max(n_local, 1)
        return StepMetrics(
            step=step, loss=float(loss_sum) / n,
            perturbed_loss=None if loss2_sum is None else float(loss2_sum) / n,
            divergence=ascent.get("divergence"), grad_norm=ascent.get("grad_norm"),
            eps_norm=ascent.get("eps_norm"), ascent_skipped=bool(ascent.get("ascent_skipped", False)),
            step_skipped=step_skipped, tokens=n_local, clip_norm=clip)


def _found_inf(scaler, optimizer) -> bool:
    # GradScaler records per-optimizer overflow flags in unscale_(); read them (one sync)
    state = scaler._per_optimizer_states[id(optimizer)]
    return bool(sum(v.item() for v in state["found_inf_per_device"].values()))
