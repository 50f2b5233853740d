"""``TramTrainer``: ``transformers.Trainer`` with a TRAM-family method (any of ``METHODS``).

    trainer = TramTrainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                          method="tram-theta-prev", method_kwargs={"nu": 1e-5})
    trainer.train()

Trainer's loop calls ``training_step`` once per micro-batch and then ``optimizer.step()``; a
TRAM step needs every micro-batch of the optimizer step at once (pass 1 over all of them,
the ascent, pass 2 over all of them). So ``training_step`` only collects micro-batches until
the last one of the step (accelerate's ``sync_gradients``), then runs the whole step through
``TrainStep``: both passes, the restore and the base optimizer's update. The optimizer that
Trainer holds (``TrainerOptimizer``) shares TRAM's ``param_groups`` (so Trainer's LR scheduler
drives the base optimizer) and state dict (so checkpoints carry TRAM's trust-region target and
counters), and its ``step()`` does nothing: the update has already happened.

DeepSpeed ZeRO-1/2/3 (``TrainingArguments(deepspeed=config)``, "auto" fields filled by
transformers): Trainer's optimizer, which accelerate hands to ``deepspeed.initialize``, is the
*base* optimizer (ZeRO partitions it, as ``tram_dist.engines.deepspeed.initialize`` does); on the
first step the TRAM optimizer is built around the partitioned base on a ``ZeroEngine``, and
``TrainStep`` runs the prepared ``DeepSpeedEngine``. Clipping stays in the step (the config's
``gradient_clipping`` is set to 0 so DeepSpeed does not clip twice); checkpoints are DeepSpeed's
plus TRAM's per-rank state beside them (``tram_rank{r}.pt``), resumed on the same world size.

Written against transformers 5.x's loop (``training_step`` per micro-batch, ``_clip_grad_norm``
and ``_get_grad_norm`` for the logged ``grad_norm``). Runs single-process, under DDP and under
DeepSpeed ZeRO-2/3 (both tested on CPU at 2 ranks with gloo, DeepSpeed with
``DS_ACCELERATOR=cpu``); Trainer's FSDP options and fp16 loss scaling are refused with a message.
"""
from __future__ import annotations

import inspect
import math
import os
import warnings
from typing import Any, Dict, List, Optional

import torch
from transformers import Trainer

from ..methods import METHODS, build_method
from ..optim import PerturbedOptimizer
from ..step import StepMetrics, TrainStep
from ..trust_region import ParamTarget

# method_kwargs that go to TrainStep; every other name goes to build_method
_STEP_OPTIONS = ("divergence", "target_dropout", "divergence_fraction", "causal", "seed", "skip_nonfinite")
# build_method options that TrainingArguments already owns (one source of truth for each)
_FROM_ARGS = {"lr": "learning_rate", "betas": "adam_beta1 / adam_beta2", "eps": "adam_epsilon",
              "weight_decay": "weight_decay"}
_BUILD_OPTIONS = tuple(n for n in inspect.signature(build_method).parameters
                       if n not in ("method", "model", "engine", *_FROM_ARGS))
# StepMetrics fields logged as "tram/<name>": averaged over the steps since the last log,
# ascent_skipped summed (the number of skipped ascents). "tram/grad_norm" is the ascent's
# ||T g|| at pass 1; Trainer's own "grad_norm" is the descent gradient's norm (see below).
_LOGGED = ("divergence", "radius", "grad_norm", "eps_norm", "eps_applied", "perturbed_loss", "penalty")


class TrainerOptimizer(torch.optim.Optimizer):
    """The optimizer Trainer holds and accelerate wraps, around the one ``TrainStep`` runs.

    ``param_groups``, ``state``, ``state_dict`` and ``load_state_dict`` are the wrapped
    optimizer's; ``step()`` is a no-op because ``TramTrainer.training_step`` has already run
    the whole step when Trainer calls it. Like accelerate's own wrapper, it never calls
    ``Optimizer.__init__``: it owns no parameters.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, trust_region=None):
        self.optimizer = optimizer
        self.trust_region = trust_region

    # properties, not copies: TRAM's load_state_dict rebinds its param_groups list
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups):
        self.optimizer.param_groups = groups

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, state):
        self.optimizer.state = state

    @property
    def defaults(self):
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, defaults):
        self.optimizer.defaults = defaults

    def step(self, closure=None):
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> Dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        opt = self.optimizer
        # Resuming: TRAM restores its trust region's own state only when one is attached, and
        # the first TrainStep attaches it later. Attach now, on the prepared parameters; the
        # checkpoint's targets are copied into those buffers, and TrainStep keeps them.
        if isinstance(opt, PerturbedOptimizer) and isinstance(self.trust_region, ParamTarget) \
                and state_dict.get("tram", {}).get("state"):
            opt.attach_trust_region(self.trust_region)
        opt.load_state_dict(state_dict)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def __repr__(self) -> str:
        return f"TrainerOptimizer({self.optimizer!r})"


class TramTrainer(Trainer):
    """``transformers.Trainer`` running ``method`` (a name of ``tram_dist.methods.METHODS``).

    ``method_kwargs``: the method's options (``nu``, ``rho``, ``eta``, ``sigma``, ``noise``,
    ``radius_scale``, ``lam``, ``decay``, ``logit_scale``, ``on_nonfinite``,
    ``base_optimizer``: passed to ``build_method``) and the step's (``divergence``,
    ``target_dropout``, ``divergence_fraction``, ``causal``, ``seed``, ``skip_nonfinite``: passed
    to ``TrainStep``; ``seed`` defaults to ``args.seed``). The learning rate, Adam's betas and eps, and the
    weight decay come from ``TrainingArguments`` (decay on the parameters Trainer decays, as
    Trainer groups them); ``args.optim`` is not used (the base optimizer is AdamW unless
    ``base_optimizer`` says otherwise).

    What Trainer sees: ``loss`` is the step's pass-1 loss, the token-weighted mean over the
    global batch; ``grad_norm`` is the norm of the gradient the base optimizer stepped on
    (pass 2 for an ascent method), before clipping at ``args.max_grad_norm``;
    ``learning_rate`` is the base optimizer's. Each training log also carries TRAM's metrics
    as ``tram/divergence``, ``tram/radius``, ``tram/grad_norm`` (the ascent's ||T g||),
    ``tram/eps_norm``, ``tram/eps_applied``, ``tram/perturbed_loss`` (means over the steps
    since the last log), ``tram/ascent_skipped`` (their number), ``tram/penalty``
    (TRPO/R3F/MESA) and, with ``skip_nonfinite``, ``tram/step_skipped`` (the steps skipped for
    a non-finite loss or gradient), so every ``report_to`` integration gets them.
    """

    def __init__(self, *args, method: str = "tram-theta-prev",
                 method_kwargs: Optional[Dict[str, Any]] = None, **kwargs):
        if method not in METHODS:
            raise ValueError(f"TramTrainer: unknown method {method!r}; choose one of {', '.join(METHODS)}")
        method_kwargs = dict(method_kwargs or {})
        for name in method_kwargs:
            if name in _FROM_ARGS:
                raise ValueError(f"TramTrainer: {name} comes from TrainingArguments "
                                 f"({_FROM_ARGS[name]}), not method_kwargs")
            if name not in _BUILD_OPTIONS and name not in _STEP_OPTIONS:
                raise ValueError(f"TramTrainer: unknown method_kwargs entry {name!r}; method options: "
                                 f"{', '.join(_BUILD_OPTIONS)}; step options: {', '.join(_STEP_OPTIONS)}")
        optimizers = kwargs.get("optimizers", (None, None))
        if optimizers[0] is not None or kwargs.get("optimizer_cls_and_kwargs") is not None:
            raise ValueError("TramTrainer builds its optimizer from method / method_kwargs; do not pass "
                             "optimizers=(optimizer, ...) or optimizer_cls_and_kwargs")
        if optimizers[1] is not None:
            raise ValueError("TramTrainer: pass the schedule through TrainingArguments (lr_scheduler_type, "
                             "warmup_steps, ...): a scheduler built before the optimizer cannot drive it")
        super().__init__(*args, **kwargs)
        self.method = method
        self.method_kwargs = method_kwargs
        self._check_supported()
        self.tram_optimizer: Optional[torch.optim.Optimizer] = None  # the optimizer TrainStep runs
        self.trust_region = None
        self.train_step: Optional[TrainStep] = None
        self._micro_batches: List[Dict[str, Any]] = []  # this optimizer step's, until its last one
        self._window: List[StepMetrics] = []            # the steps since the last training log
        self._descent_norm: Optional[float] = None
        self._zero_engine = None       # DeepSpeed: the ZeroEngine of the prepared DeepSpeedEngine
        self._tram_resume: Optional[str] = None  # DeepSpeed: the checkpoint whose TRAM state to load

    def _check_supported(self) -> None:
        a = self.args
        if self.is_fsdp_enabled:
            raise NotImplementedError(
                "TramTrainer: Trainer's FSDP options are not supported (untested: accelerate enables FSDP "
                "only on GPU-type devices); use TrainStep on a fully_shard model (tram_dist.engines.FSDP2Engine) "
                "or Trainer's deepspeed= option (ZeRO-1/2/3)")
        if self.is_deepspeed_enabled:
            import torch.distributed as dist

            if dist.is_initialized() and dist.get_world_size() != a.world_size:
                raise RuntimeError(
                    f"TramTrainer: DeepSpeed runs {dist.get_world_size()} ranks but accelerate counts "
                    f"{a.world_size} (on a host without GPUs its PartialState finds no backend, and transformers "
                    f"filled the config's batch sizes for that world); before TrainingArguments set "
                    f"ACCELERATE_USE_DEEPSPEED=true, create accelerate.PartialState(backend='gloo') and pass "
                    f"accelerator_config={{'use_configured_state': True}}, use_cpu=False")
            cfg = self.accelerator.state.deepspeed_plugin.deepspeed_config
            if "optimizer" in cfg:
                raise ValueError("TramTrainer: remove the DeepSpeed config's optimizer section: TRAM wraps the "
                                 "base optimizer it builds (AdamW, lr / betas / eps / weight_decay from "
                                 "TrainingArguments), which ZeRO then partitions")
            from ..ds_config import zero_stage, zero_support_error

            if zero_stage(cfg) not in (1, 2, 3):
                raise NotImplementedError("TramTrainer: the DeepSpeed config needs zero_optimization.stage 1, 2 "
                                          "or 3 (the TRAM ZeRO engine); without ZeRO use DDP (no deepspeed=)")
            problem = zero_support_error(cfg, "TramTrainer's DeepSpeed config")
            if problem is not None:
                raise NotImplementedError(problem)
        if a.fp16:
            raise NotImplementedError("TramTrainer: fp16 loss scaling is not supported (accelerate's scaler "
                                      "would step once per optimizer step, TRAM unscales per pass); use bf16")
        if self.compute_loss_func is not None or self.label_smoother is not None:
            raise ValueError("TramTrainer: TrainStep weights the model's own loss by token counts; "
                             "compute_loss_func and label_smoothing_factor are not used by it")
        optim = str(getattr(a.optim, "value", a.optim))  # an OptimizerNames member
        if "adamw" not in optim and "base_optimizer" not in self.method_kwargs:
            warnings.warn(f"TramTrainer: args.optim={optim!r} is not used; the base optimizer is "
                          f"torch.optim.AdamW (method_kwargs base_optimizer=... for another)", UserWarning)

    # ------------------------------------------------------------------ the optimizer
    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
                  {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        build = {k: v for k, v in self.method_kwargs.items() if k not in _STEP_OPTIONS}
        opt, trust_region = build_method(
            self.method, groups, lr=self.args.learning_rate, betas=(self.args.adam_beta1, self.args.adam_beta2),
            eps=self.args.adam_epsilon, weight_decay=self.args.weight_decay, **build)
        self.tram_optimizer, self.trust_region = opt, trust_region
        if self.is_deepspeed_enabled:
            # accelerate hands Trainer's optimizer to deepspeed.initialize: give it the base optimizer
            # for ZeRO to partition; _zero_optimizer wraps the partitioned base on the first step
            self._configure_deepspeed()
            self.optimizer = opt.base if isinstance(opt, PerturbedOptimizer) else opt
            return self.optimizer
        self.optimizer = TrainerOptimizer(opt, trust_region)
        return self.optimizer

    def _configure_deepspeed(self) -> None:
        """Before accelerate's deepspeed.initialize: TrainStep clips (at ``args.max_grad_norm``,
        which transformers also wrote into ``gradient_clipping``), so DeepSpeed must not clip
        again; under optimizer offload DeepSpeed steps the torch base optimizer as given."""
        from ..ds_config import offloads_optimizer

        cfg = self.accelerator.state.deepspeed_plugin.deepspeed_config
        cfg["gradient_clipping"] = 0.0
        if offloads_optimizer(cfg) and "zero_force_ds_cpu_optimizer" not in cfg:
            cfg["zero_force_ds_cpu_optimizer"] = False

    def _zero_optimizer(self, ds_engine):
        """DeepSpeed: the optimizer TrainStep runs on the prepared engine and its ZeroEngine: the
        method rebuilt around the base optimizer ZeRO now partitions (as
        ``tram_dist.engines.deepspeed.initialize`` builds it), or ZeRO's optimizer for ``adamw``
        (``tram_dist.integrations.accelerate.zero_method``, shared with ``tram_on_deepspeed``)."""
        from .accelerate import zero_method

        opt, engine = zero_method(ds_engine, self.tram_optimizer)
        self.tram_optimizer, self._zero_engine = opt, engine
        return opt, engine

    def _train_step(self, model) -> TrainStep:
        """The TrainStep for the prepared (possibly DDP-wrapped) model, built on first use."""
        step = self.train_step
        zero = self.is_deepspeed_enabled
        if step is None or step.model is not model or (not zero and step.optimizer is not self.tram_optimizer):
            opts = {k: v for k, v in self.method_kwargs.items() if k in _STEP_OPTIONS}
            opts.setdefault("seed", self.args.seed)
            if zero:
                opts["engine"] = self._zero_optimizer(model)[1]
            # Clipping belongs to the descent, inside the step. An infinite bound clips nothing
            # (grads * 1.0, bit-exact) and still returns the norm Trainer logs as grad_norm.
            clip = self.args.max_grad_norm
            max_norm = clip if clip and clip > 0 else math.inf
            self.train_step = TrainStep(model, self.tram_optimizer, trust_region=self.trust_region,
                                        max_grad_norm=max_norm, **opts)
            if zero and self._tram_resume is not None:  # after TrainStep attached the trust region
                if isinstance(self.tram_optimizer, PerturbedOptimizer):
                    self._load_tram_state(self.tram_optimizer, self._tram_resume)
                self._tram_resume = None
        return self.train_step

    # ------------------------------------------------------------------ DeepSpeed checkpoints
    # Trainer saves and loads the DeepSpeed checkpoint (model, ZeRO partitions, base optimizer
    # state) itself; TRAM's own state (trust-region targets, counters) is per rank, beside it.
    _TRAM_FILE = "tram_rank{}.pt"

    def _save_optimizer_and_scheduler(self, output_dir):
        super()._save_optimizer_and_scheduler(output_dir)
        if self.is_deepspeed_enabled and isinstance(self.tram_optimizer, PerturbedOptimizer) \
                and self._zero_engine is not None:
            import torch.distributed as dist

            world = dist.get_world_size() if dist.is_initialized() else 1
            torch.save({"world_size": world, "tram": self.tram_optimizer.tram_state_dict()},
                       os.path.join(output_dir, self._TRAM_FILE.format(self.args.process_index)))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if self.is_deepspeed_enabled and checkpoint is not None:
            self._tram_resume = checkpoint  # loaded when the TRAM optimizer is built (_zero_optimizer)

    def _load_tram_state(self, opt, checkpoint: str) -> None:
        import torch.distributed as dist

        from ..safe_load import load_tensors

        path = os.path.join(checkpoint, self._TRAM_FILE.format(self.args.process_index))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"TramTrainer: {path} is missing: this DeepSpeed checkpoint holds no "
                                    f"TRAM state for rank {self.args.process_index}")
        saved = load_tensors(path)
        world = dist.get_world_size() if dist.is_initialized() else 1
        if saved["world_size"] != world:
            raise ValueError(f"TramTrainer: {path} holds TRAM state of one rank of {saved['world_size']}; this "
                             f"run has {world} ranks (ZeRO TRAM state resumes on the same world size)")
        opt.load_tram_state_dict(saved["tram"])

    # ------------------------------------------------------------------ the step
    def train(self, *args, **kwargs):
        # micro-batches of a step that an exception interrupted must not join the next one
        self._micro_batches, self._window = [], []
        return super().train(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Collect the micro-batch; on the last of the optimizer step run the whole TRAM step.

        Returns the step's loss (a global token mean) on that call and 0 on the others, so that
        Trainer's logged ``loss`` (its sum over calls per optimizer step) is the step's loss.
        ``num_items_in_batch`` is not needed: TrainStep counts the global tokens itself."""
        self._micro_batches.append(self._prepare_inputs(inputs))
        if not self.accelerator.sync_gradients:
            return torch.zeros((), device=self.args.device)
        micro_batches, self._micro_batches = self._micro_batches, []
        self._add_sample_index(micro_batches)
        metrics = self._train_step(model)(micro_batches)
        self._window.append(metrics)
        self._descent_norm = metrics.clip_norm
        return torch.tensor(metrics.loss, dtype=torch.float32, device=self.args.device)

    def _add_sample_index(self, micro_batches) -> None:
        """Seed input noise (TRAM-d_x, TRAM-Fisher, R3F) by each sample's position in the global
        batch of this step, as the sampler feeds it: micro-batch i of rank r holds positions
        (i * world + r) * per_device_batch + j, the order in which accelerate deals batches to
        ranks. The same sample then gets the same noise at any world size and accumulation
        split with the same global batch. A dataset's own ``sample_index`` column is kept
        (pass ``remove_unused_columns=False`` so that Trainer does not drop it)."""
        world, rank = max(self.args.world_size, 1), self.args.process_index
        size = self._train_batch_size
        for i, mb in enumerate(micro_batches):
            if "sample_index" in mb:
                continue
            n = next(v for v in mb.values() if torch.is_tensor(v)).shape[0]
            mb["sample_index"] = torch.arange(n) + (i * world + rank) * size

    # Trainer asks for the gradient norm after training_step: the step has already clipped
    # and applied the descent gradient (and zeroed it), so report the norm the step measured.
    def _clip_grad_norm(self, model):
        return self._descent_norm

    def _get_grad_norm(self, model, grad_norm=None):
        return self._descent_norm if grad_norm is None else grad_norm

    # ------------------------------------------------------------------ logging
    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        if "loss" in logs and self._window:  # a training log: add TRAM's metrics since the last
            logs = {**logs, **self._tram_logs()}
            self._window = []
        super().log(logs, start_time)

    def _tram_logs(self) -> Dict[str, float]:
        out: Dict[str, float] = {}
        for name in _LOGGED:
            values = [getattr(m, name) for m in self._window]
            values = [float(v) for v in values if v is not None]
            if values:
                out[f"tram/{name}"] = sum(values) / len(values)
        if isinstance(self.tram_optimizer, PerturbedOptimizer) and self.tram_optimizer.has_ascent:
            out["tram/ascent_skipped"] = float(sum(m.ascent_skipped for m in self._window))
        if self.method_kwargs.get("skip_nonfinite"):
            out["tram/step_skipped"] = float(sum(m.step_skipped for m in self._window))
        return out


__all__ = ["TramTrainer", "TrainerOptimizer"]
