"""The SAM family as one core: TRAM, SAM, ASAM, FisherSAM and TRAMFisher.

Every member perturbs theta <- theta + eps with

    eps = s * w(theta, g) * g,   s = radius / sqrt(sum_i w_i g_i^2)

where the sum runs over every parameter slice with a gradient, in every group, on every rank
(one number), and the classes differ only in the radius and the weight w:

    SAM         radius rho        w = 1                     (eps = rho g / ||g||)
    ASAM        radius rho        w = (|theta| + eta)^2     (eps = rho T^2 g / ||T g||)
    TRAM        radius d + nu     w = |theta|^2             (Eq. 7)
    FisherSAM   radius rho        w = 1 / (1 + eta g^2)     (eps = rho f^-1 g / sqrt(g^T f^-1 g))
    TRAMFisher  as FisherSAM, with g (and so f) taken at noised inputs x + z (Algorithm 2)

Usage mirrors the SAM wrapper users know::

    opt = TRAM(model.parameters(), torch.optim.AdamW, nu=1e-5, lr=2e-5, betas=(0.9, 0.99))
    model(**batch).loss.backward()      # pass 1
    opt.first_step(d)                   # ascent
    model(**batch).loss.backward()      # pass 2
    opt.second_step()                   # restore (bit exact) + base optimizer step
"""
from __future__ import annotations

import inspect
import math
import warnings
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import kernels
from .divergence import Partial
from .engines import default_engine
from .engines.base import Engine, SliceGroup
from .trust_region import TARGET, ParamTarget

ON_NONFINITE = ("skip", "raise")
_PERSISTENT = (TARGET,)  # state keys that a checkpoint must carry (the backup is transient)


class NonFiniteAscentError(FloatingPointError):
    """The divergence or the perturbation norm was NaN or infinite (``on_nonfinite='raise'``)."""


class PerturbedOptimizer(Optimizer):
    """Shared core of the family. Subclasses set ``rule`` and ``hyperparameters`` and say how
    the radius is chosen (``_radius``)."""

    rule: str = "identity"                     # the weight w, see kernels.RULES
    divergence_reduction: str = "token_mean"   # how TrainStep averages d (TRAMReleased: "released")
    hyperparameters: Dict[str, float] = {}     # name -> default, all must be >= 0
    needs_divergence: bool = False             # first_step takes d (TRAM)
    pass1_at_noised_inputs: bool = False       # pass 1 at x + z (TRAMFisher)
    has_ascent: bool = True                    # False: Descent (a regularized loss, one pass)

    def __init__(self, params, base_optimizer, *, on_nonfinite: str = "skip",
                 engine: Optional[Engine] = None, **kwargs):
        name = type(self).__name__
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"{name}: on_nonfinite must be one of {ON_NONFINITE}, got {on_nonfinite!r}")
        own = {k: kwargs.pop(k) for k in list(kwargs) if k in self.hyperparameters}
        if isinstance(base_optimizer, Optimizer):
            _dedup_in_place(name, base_optimizer.param_groups)
        elif params is not None:
            params = _as_groups(params)
            _dedup_in_place(name, params)
        defaults = {**self.hyperparameters, **own}
        self._check_hyperparameters(defaults)

        if isinstance(base_optimizer, Optimizer):
            if kwargs:
                raise ValueError(
                    f"{name}: unknown option(s) {sorted(kwargs)}: not a {name} hyperparameter "
                    f"({sorted(self.hyperparameters)}); options of an optimizer instance are set "
                    f"when you construct it (or pass its class instead)")
            base = base_optimizer
            base_params = [p for g in base.param_groups for p in g["params"]]
            if params is not None:
                given = [p for g in _as_groups(params) for p in g["params"]]
                if {id(p) for p in given} != {id(p) for p in base_params}:
                    raise ValueError(
                        f"{name}: the parameters given differ from those of the base optimizer "
                        f"instance; pass the same parameters (or params=None)")
            super().__init__(base.param_groups, defaults)
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer):
            _check_base_kwargs(name, base_optimizer, kwargs, self.hyperparameters)
            super().__init__(params, defaults)
            base = base_optimizer(self.param_groups, **kwargs)
        else:
            raise TypeError(f"{name}: base_optimizer must be a torch.optim.Optimizer subclass or "
                            f"instance, got {base_optimizer!r}")
        self.base = base
        # One list of group dicts for both: an LR scheduler on the wrapper drives the base.
        self.param_groups = base.param_groups
        self.defaults.update(base.defaults)
        self.on_nonfinite = on_nonfinite
        self.engine: Engine = engine if engine is not None else default_engine(self)
        self.engine.bind(self)
        self.trust_region: Optional[ParamTarget] = None
        self.step_count = 0          # completed TRAM steps (first_step + second_step)
        self.skipped_ascents = 0     # steps whose ascent was skipped (non-finite d or norm)
        self.clamped_divergences = 0  # steps whose finite d < 0 (rounding) was taken as 0
        self.measure_applied = True   # measure ||eps|| as written (one read pass; a metric)
        self._warned_nonfinite = False
        self._phase = "idle"         # idle | swapped | perturbed | ascent_skipped
        self._touched: List[SliceGroup] = []  # slices swapped or perturbed, until restored
        self.last_ascent: Dict[str, Any] = {}

    @property
    def base_optimizer(self) -> Optimizer:
        """The inner optimizer (``.base``); the name davda54/sam code uses."""
        return self.base

    # ------------------------------------------------------------------ hyperparameters
    def _check_hyperparameters(self, options: Dict[str, Any]) -> None:
        for key in self.hyperparameters:
            value = options.get(key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{type(self).__name__}: {key} must be a finite number >= 0, got {value!r}")

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        if hasattr(self, "base"):
            self.base.add_param_group(param_group)   # appends to the shared list
            for key, value in self.hyperparameters.items():
                param_group.setdefault(key, self.defaults.get(key, value))
        else:
            super().add_param_group(param_group)
        self._check_hyperparameters({k: param_group[k] for k in self.hyperparameters})

    def _radius(self, options: Dict[str, Any], divergence: Optional[float]) -> float:
        return float(options["rho"])

    # ------------------------------------------------------------------ trust region
    def attach_trust_region(self, target: ParamTarget) -> None:
        """Create ``target``'s parameter-shaped buffer beside every trainable slice."""
        if self.trust_region is not None and self.trust_region is not target:
            raise ValueError(f"{type(self).__name__} already has trust region {self.trust_region!r}")
        self.trust_region = target
        for group in self.engine.slice_groups(with_grad_only=False):
            for sl in group.slices:
                if TARGET not in sl.state:
                    sl.state[TARGET] = target.init_buffer(sl)

    @torch.no_grad()
    def swap_in_target(self, *, before_backward: bool = False) -> None:
        """Put the trust-region target into the parameters for the target forward pass.

        Call after pass 1's backward. theta_t goes to the backup (the swap space), and
        ``first_step`` writes theta_t + eps straight from it. ``before_backward``: a target
        forward before any gradient exists (the regularizers), for every trainable slice,
        undone by ``swap_out_target``.
        """
        self._expect("idle", "swap_in_target")
        if self.trust_region is None:
            raise RuntimeError("swap_in_target: no parameter trust region attached "
                               "(attach_trust_region(PreviousParams()) or PretrainedParams() first)")
        self._touched = self.engine.slice_groups(with_grad_only=not before_backward)
        for group in self._touched:
            params = [s.param for s in group.slices]
            targets = [s.state[TARGET] for s in group.slices]
            if self.engine.needs_backup:
                kernels.swap_in_(params, targets, [self._backup(s) for s in group.slices])
            else:  # the master keeps theta_t
                kernels.restore_(params, targets)
        self.engine.publish()
        self._phase = "swapped"

    @torch.no_grad()
    def swap_out_target(self) -> None:
        """Put theta_t back after a target forward that no ascent follows (the trust-region
        regularizers: TRPO, MESA), and let the target advance as after TRAM's ascent."""
        self._expect("swapped", "swap_out_target")
        groups = self._touched
        self._restore_groups(groups)
        self._trust_region_update(groups)
        self._touched = []
        self._phase = "idle"

    def _backup(self, sl) -> Tensor:
        buf = sl.state.get("backup")
        if buf is None or buf.shape != sl.param.shape or buf.dtype != sl.param.dtype:
            buf = sl.state["backup"] = torch.empty_like(sl.param)
        return buf

    # ------------------------------------------------------------------ the ascent
    @torch.no_grad()
    def first_step(self, divergence=None, zero_grad: bool = True) -> Dict[str, Any]:
        """Perturb theta to theta + eps using the current gradients (pass 1).

        ``divergence``: the trust-region distance d (TRAM only), a number or 0-d tensor, or a
        ``Partial`` (this rank's contribution, summed over the data-parallel group).
        Returns the ascent metrics (also kept in ``last_ascent``).
        """
        if self._phase not in ("idle", "swapped"):
            raise RuntimeError(f"first_step called while {self._phase}: call second_step first")
        name = type(self).__name__
        if self.needs_divergence and divergence is None:
            self.restore()
            raise ValueError(f"{name}.first_step needs the trust-region divergence d")
        if not self.needs_divergence and divergence is not None:
            self.restore()
            raise ValueError(f"{name}.first_step takes no divergence (its radius is rho)")
        swapped = self._phase == "swapped"
        engine = self.engine
        groups = engine.slice_groups()
        device = _device_of(groups)

        # Local partial sums of w g^2 and (w g)^2 per group; theta is read where it is exact.
        # Per group because groups may have their own radius: ||eps||^2 = sum_g s_g^2 (w g)^2_g.
        sums = torch.zeros(max(len(groups), 1), 2, dtype=torch.float32, device=device)
        for i, group in enumerate(groups):
            thetas = self._thetas(group, swapped)
            grads = [s.grad for s in group.slices]
            eta = float(group.options.get("eta", 0.0))
            sums[i] += self._local_sums(thetas, grads, eta, device)

        # The one collective TRAM adds: sharded norm partials and/or a per-rank divergence.
        packed = []
        if engine.grads_sharded:  # zeros on replicas of another rank's shards (HSDP): counted once
            packed.append(engine.param_partial(sums).reshape(-1))
        partial_d = isinstance(divergence, Partial)
        if partial_d:
            packed.append(torch.as_tensor(divergence.value, dtype=torch.float32, device=device).reshape(1))
        if packed:
            vec = engine.all_reduce_sum_(torch.cat(packed))
            if engine.grads_sharded:
                sums = vec[:sums.numel()].reshape(sums.shape)
            d_tensor = vec[-1] if partial_d else None
        else:
            d_tensor = None
        if not partial_d and divergence is not None:
            d_tensor = torch.as_tensor(divergence, dtype=torch.float32)

        flat = sums.reshape(-1)
        values = torch.cat([flat, d_tensor.reshape(1).to(flat.device)]) if d_tensor is not None else flat
        values = values.tolist()  # the one host sync of the step
        per_group = [(values[2 * i], values[2 * i + 1]) for i in range(sums.shape[0])]
        d = values[-1] if d_tensor is not None else None
        norm_sq = sum(n for n, _ in per_group)
        norm = math.sqrt(norm_sq) if norm_sq >= 0 else float("nan")

        reason = None
        if d is not None and not math.isfinite(d):
            reason = f"non-finite divergence d={d}"
        elif not math.isfinite(norm):
            reason = f"non-finite perturbation norm {norm}"
        elif norm == 0.0:
            reason = "zero gradient (perturbation norm is 0)"
        # KL >= 0: a finite negative d is rounding noise around 0. Take it as 0 (the ascent is
        # then nu), count it, and never skip the ascent for it.
        d_clamped = d is not None and math.isfinite(d) and d < 0
        if d_clamped:
            self.clamped_divergences += 1

        metrics = {"divergence": d, "divergence_clamped": d_clamped, "grad_norm": norm,
                   "eps_norm": 0.0, "radius": 0.0, "ascent_skipped": reason is not None,
                   "applied_sq": None}
        if reason is not None:
            self._skip_ascent(reason, swapped, groups)
        else:
            d_used = max(d, 0.0) if d is not None else None
            eps_sq_total, radius_sq_weighted = 0.0, 0.0
            for (n_g, e_g), group in zip(per_group, groups):
                radius = self._radius(group.options, d_used)
                scale = self._scale(radius, norm)
                eps_sq_total += scale * scale * max(e_g, 0.0)
                radius_sq_weighted += radius * radius * max(n_g, 0.0)
                self._perturb(group, scale, swapped)
            metrics["eps_norm"] = math.sqrt(eps_sq_total)
            # The size of the ascent in the method's own metric (||T^-1 eps||, ||f^1/2 eps||):
            # the radius itself when all groups share it, their norm-weighted mean otherwise.
            metrics["radius"] = math.sqrt(radius_sq_weighted / norm_sq)
            if self.measure_applied:
                # What the next forward sees: theta + eps rounded to the working dtype, minus
                # theta_t (the backup, or the master) in that dtype. A device tensor: this
                # rank's partial, summed over ranks with the step's deferred metrics (no sync).
                applied = torch.zeros((), dtype=torch.float32, device=device)
                for group in groups:
                    applied += kernels.diff_sq([s.param for s in group.slices],
                                               self._thetas(group, True), device=device)
                metrics["applied_sq"] = applied
            self._touched = groups
            self._phase = "perturbed"
        if swapped:
            self._trust_region_update(groups)
        engine.publish()
        self.last_ascent = metrics
        if zero_grad:
            engine.discard_grads()
        return metrics

    def _local_sums(self, thetas, grads, eta: float, device) -> Tensor:
        """This rank's [sum w g^2, sum (w g)^2]: the squared norm, and ||eps||^2 / s^2."""
        return kernels.sum_sq(thetas, grads, rule=self.rule, eta=eta, device=device, with_eps_sq=True)

    def _scale(self, radius: float, norm: float) -> float:
        return radius / norm

    def _perturb(self, group: SliceGroup, scale: float, swapped: bool) -> None:
        """theta <- theta + scale * w * g on this group's slices (backing theta up first)."""
        thetas = self._thetas(group, swapped)
        params = [s.param for s in group.slices]
        grads = [s.grad for s in group.slices]
        eta = float(group.options.get("eta", 0.0))
        if swapped or not self.engine.needs_backup:
            kernels.perturb_(params, grads, scale=scale, rule=self.rule, eta=eta, sources=thetas)
        else:
            kernels.perturb_(params, grads, scale=scale, rule=self.rule, eta=eta,
                             backups=[self._backup(s) for s in group.slices])

    def _thetas(self, group: SliceGroup, swapped: bool) -> List[Tensor]:
        if swapped and self.engine.needs_backup:
            return [s.state["backup"] for s in group.slices]
        return [s.theta for s in group.slices]

    def _trust_region_update(self, groups: List[SliceGroup]) -> None:
        tr = self.trust_region
        for group in groups:
            for sl in group.slices:
                theta_t = sl.state["backup"] if self.engine.needs_backup else sl.theta
                tr.after_target_forward(sl, theta_t, theta_is_backup=self.engine.needs_backup)

    def _skip_ascent(self, reason: str, swapped: bool, groups: List[SliceGroup]) -> None:
        if swapped:
            self._restore_groups(groups)
            self._touched = []
        if self.on_nonfinite == "raise" and "zero gradient" not in reason:
            self._phase = "idle"
            raise NonFiniteAscentError(f"{type(self).__name__}: ascent not applied: {reason}. "
                                       f"Parameters are unchanged. Pass on_nonfinite='skip' to take a "
                                       f"plain descent step instead.")
        self.skipped_ascents += 1
        if not self._warned_nonfinite:
            warnings.warn(f"{type(self).__name__}: skipping the ascent ({reason}); this step is a plain "
                          f"descent. Skips are counted in .skipped_ascents; this warning is shown once.",
                          RuntimeWarning, stacklevel=3)
            self._warned_nonfinite = True
        self._phase = "ascent_skipped"

    # ------------------------------------------------------------------ restore and descent
    @torch.no_grad()
    def _restore_groups(self, groups: List[SliceGroup]) -> None:
        for group in groups:
            params = [s.param for s in group.slices]
            if self.engine.needs_backup:
                kernels.restore_(params, [s.state["backup"] for s in group.slices])
            else:
                kernels.restore_(params, [s.theta for s in group.slices])
        self.engine.publish()

    @torch.no_grad()
    def restore(self) -> None:
        """Undo a perturbation or a target swap now (exception paths, skipped steps).

        Safe to call in any phase; a no-op when nothing is perturbed.
        """
        if self._phase in ("perturbed", "swapped") and self._touched:
            self._restore_groups(self._touched)
        self._touched = []
        self._phase = "idle"

    def second_step(self, zero_grad: bool = True, *, scaler=None,
                    max_grad_norm: Optional[float] = None, skip_update: bool = False) -> Optional[Tensor]:
        """Restore theta bit-exactly and step the base optimizer on the pass-2 gradients.

        ``scaler``: a ``torch.amp.GradScaler`` whose scaled pass-2 gradients are unscaled here
        (the caller calls ``scaler.update()``). ``max_grad_norm``: clip the pass-2 gradients.
        Returns the pass-2 gradient norm when clipping. ``skip_update``: restore theta and drop
        the gradients without an update (a step with a non-finite loss or gradient); the step
        counts and the trust-region bookkeeping run as after an fp16-overflow skip.
        """
        allowed = ("perturbed", "ascent_skipped") if self.has_ascent else ("idle",)
        if self._phase not in allowed:
            raise RuntimeError(f"second_step called while {self._phase}: call first_step first")
        with torch.no_grad():
            # engines without a backup restore in their base step (DeepSpeed copies the master
            # back); without that step the master is written back here
            if self._phase == "perturbed" and (self.engine.needs_backup or skip_update):
                self._restore_groups(self._touched)
            self._touched = []
        total_norm = None
        if skip_update:
            self.engine.discard_grads()
        else:
            if scaler is not None:
                scaler.unscale_(self.base)
            if max_grad_norm is not None:
                total_norm = self.engine.clip_grad_norm_(max_norm=max_grad_norm)
            self.engine.base_step(scaler=scaler)
        with torch.no_grad():
            if self.trust_region is not None:
                for group in self.engine.slice_groups(with_grad_only=False):
                    for sl in group.slices:
                        self.trust_region.end_of_step(sl)
        self._phase = "idle"
        self.step_count += 1
        self._opt_called = True  # what LR schedulers check to know the optimizer has stepped
        if zero_grad:
            self.zero_grad(set_to_none=True)
        return total_norm

    def step(self, closure: Optional[Callable] = None, divergence=None):
        """Closure style: ``closure`` zeroes grads, computes the loss and calls backward.

        Runs pass 1, the ascent, pass 2 and the descent; returns the pass-1 loss. For TRAM,
        ``divergence`` is d or a callable returning d, called after pass 1.
        """
        if closure is None:
            raise RuntimeError(f"{type(self).__name__}.step needs a closure that re-evaluates the "
                               f"loss and calls backward (or use first_step / second_step)")
        closure = torch.enable_grad()(closure)
        loss = closure()
        d = divergence() if callable(divergence) else divergence
        try:
            self.first_step(d, zero_grad=True)
            closure()
        except BaseException:
            self.restore()
            raise
        self.second_step(zero_grad=False)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        return {"base": self.base.state_dict(), "tram": self.tram_state_dict()}

    def tram_state_dict(self) -> Dict[str, Any]:
        """TRAM's own state (trust-region buffers of this rank's slices, counters), without the
        base optimizer's: engines whose base state is saved elsewhere (ZeRO) save only this."""
        index = {id(p): i for i, p in enumerate(self.engine.state_keys())}
        own = {}
        for p, st in self.state.items():
            kept = {k: v for k, v in st.items() if k in _PERSISTENT}
            if kept and id(p) in index:
                own[index[id(p)]] = kept
        return {
            "state": own,
            "step_count": self.step_count,
            "skipped_ascents": self.skipped_ascents,
            "clamped_divergences": self.clamped_divergences,
            "trust_region": None if self.trust_region is None else self.trust_region.state_dict(),
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if "base" not in state_dict and "state" in state_dict and "param_groups" in state_dict:
            self._load_plain_state_dict(state_dict)
            return
        if "base" not in state_dict or "tram" not in state_dict:
            raise ValueError(f"{type(self).__name__}.load_state_dict: expected a dict with 'base' and "
                             f"'tram' (from {type(self).__name__}.state_dict()), got keys {sorted(state_dict)}")
        self.base.load_state_dict(state_dict["base"])
        # torch rebuilds the base's group dicts on load: share them again.
        self.param_groups = self.base.param_groups
        self.load_tram_state_dict(state_dict["tram"])

    def _load_plain_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """A torch optimizer's state dict: the base optimizer's own (porting a plain AdamW run),
        or davda54/sam's SAM wrapper's (its ``old_p`` / ``e_w`` are transient and dropped)."""
        transient = ("old_p", "e_w")
        state = {k: {n: v for n, v in st.items() if n not in transient}
                 for k, st in state_dict["state"].items()}
        dropped = any(n in transient for st in state_dict["state"].values() for n in st)
        state = {k: st for k, st in state.items() if st}
        groups = [{k: v for k, v in g.items() if k not in ("rho", "adaptive")}
                  for g in state_dict["param_groups"]]
        for mine, given in zip(self.param_groups, groups):
            for key in self.hyperparameters:   # keep our hyperparameters where the dict has none
                given.setdefault(key, mine[key])
        warnings.warn(
            f"{type(self).__name__}.load_state_dict: got a plain optimizer state dict"
            f"{' (davda54/sam style: old_p / e_w dropped)' if dropped else ''}; it is loaded into the "
            f"base optimizer {type(self.base).__name__} and {type(self).__name__}'s own state "
            f"(trust-region buffers, counters) starts fresh", UserWarning, stacklevel=3)
        self.base.load_state_dict({"state": state, "param_groups": groups})
        self.param_groups = self.base.param_groups
        self._phase = "idle"

    def load_tram_state_dict(self, own: Dict[str, Any]) -> None:
        keys = self.engine.state_keys()
        for i, kept in own["state"].items():
            p = keys[int(i)]
            for k, v in kept.items():
                cur = self.state[p].get(k)
                if cur is not None and cur.shape == v.shape:
                    cur.copy_(v)
                else:
                    self.state[p][k] = v.to(device=p.device).clone()  # its own dtype (EMA: master's)
        self.step_count = int(own["step_count"])
        self.skipped_ascents = int(own["skipped_ascents"])
        self.clamped_divergences = int(own.get("clamped_divergences", 0))
        if self.trust_region is not None and own.get("trust_region") is not None:
            self.trust_region.load_state_dict(own["trust_region"])
        self._phase = "idle"

    def _expect(self, phase: str, what: str) -> None:
        if self._phase != phase:
            raise RuntimeError(f"{what} called while {self._phase}")

    def __repr__(self) -> str:
        hp = "".join(f"{k}={self.defaults[k]}, " for k in self.hyperparameters)
        return f"{type(self).__name__}({hp}base={type(self.base).__name__})"


class Descent(PerturbedOptimizer):
    """No ascent: the base optimizer's step on the pass-1 gradients, with the family's machinery
    (engines, trust-region buffers beside each slice, checkpoints). The Adam rows of the
    trust-region regularizers (TRPO, MESA, R3F) run on it: ``TrainStep`` adds the penalty to
    the loss, and ``second_step`` follows pass 1 directly."""

    has_ascent = False

    def __init__(self, params, base_optimizer, **kwargs):
        super().__init__(params, base_optimizer, **kwargs)

    def first_step(self, divergence=None, zero_grad: bool = True):
        raise RuntimeError("Descent has no ascent: call second_step after pass 1")

    def step(self, closure: Optional[Callable] = None, divergence=None):
        loss = torch.enable_grad()(closure)() if closure is not None else None
        self.second_step(zero_grad=False)
        return loss


class SAM(PerturbedOptimizer):
    """SAM (Foret et al. 2021): eps = rho * g / ||g||."""

    rule = "identity"
    hyperparameters = {"rho": 0.05}

    def __init__(self, params, base_optimizer, rho: float = 0.05, **kwargs):
        if "adaptive" in kwargs:
            raise ValueError("SAM(adaptive=...) is davda54/sam's switch to ASAM; here ASAM is its own "
                             "class: use ASAM(params, base, rho=..., eta=0) for adaptive=True "
                             "(eta=0 is davda54's T = |theta|), SAM(...) without 'adaptive' otherwise")
        super().__init__(params, base_optimizer, rho=rho, **kwargs)


class ASAM(PerturbedOptimizer):
    """ASAM (Kwon et al. 2021, Eq. 2): eps = rho * T^2 g / ||T g||, T = |theta| + eta."""

    rule = "adaptive"
    hyperparameters = {"rho": 0.5, "eta": 0.01}

    def __init__(self, params, base_optimizer, rho: float = 0.5, eta: float = 0.01, **kwargs):
        super().__init__(params, base_optimizer, rho=rho, eta=eta, **kwargs)


class TRAM(PerturbedOptimizer):
    """TRAM (Eq. 7): eps = (lambda d + nu) * theta^2 g / ||theta g||, d the trust-region divergence.

    ``radius_scale`` (lambda, default 1: the paper's Eq. 7 exactly) multiplies d. A per-token
    KL between nearby models is tiny (O(lr^2) for d_theta(t-1)), so at lambda = 1 the ascent
    can be far smaller than SAM's rho; lambda sizes it without changing how it adapts to d.
    """

    rule = "adaptive"
    hyperparameters = {"nu": 1e-5, "radius_scale": 1.0}
    needs_divergence = True

    def __init__(self, params, base_optimizer, nu: float = 1e-5, radius_scale: float = 1.0, **kwargs):
        super().__init__(params, base_optimizer, nu=nu, radius_scale=radius_scale, **kwargs)

    def _radius(self, options, divergence):
        return float(options["radius_scale"]) * float(divergence) + float(options["nu"])


class TRAMReleased(PerturbedOptimizer):
    """The ascent of the authors' released code (tomsherborne/tram_optimizer), not Eq. 7.

    Re-derived from its ``tram.py`` and ``kl.py``: every parameter moves by

        eps = s * theta^2,   s = logit_scale * d' / (||theta g||_2 + 1e-12)

    with no gradient factor (the shift has the sign of +1 for every parameter), and d' the
    KL of ``F.kl_div(reduction="mean")`` (a mean over batch x positions x vocabulary) divided
    again by the batch size: ``TrainStep`` computes d' that way, over the global batch, for
    this class. ``logit_scale`` is the released code's hand-set multiplier "which may be
    needed for CLM"; the paper gives no value, the default 1 applies none. A negative d'
    (rounding) is taken as 0, as for TRAM.
    """

    rule = "adaptive"                      # the norm ||theta g|| (eta 0: T = |theta|)
    hyperparameters = {"logit_scale": 1.0}
    needs_divergence = True
    divergence_reduction = "released"     # d' = KL mean over B x T x V, / B (TrainStep)

    def __init__(self, params, base_optimizer, logit_scale: float = 1.0, **kwargs):
        super().__init__(params, base_optimizer, logit_scale=logit_scale, **kwargs)

    def _radius(self, options, divergence):
        return float(options["logit_scale"]) * float(divergence)

    def _scale(self, radius: float, norm: float) -> float:
        return radius / (norm + 1e-12)

    def _local_sums(self, thetas, grads, eta: float, device) -> Tensor:
        # [sum theta^2 g^2, sum theta^4]: the norm, and ||eps||^2 / s^2 with eps = s theta^2
        norm_sq = kernels.sum_sq(thetas, grads, rule="adaptive", eta=0.0, device=device)
        eps_sq = torch.zeros((), dtype=torch.float32, device=norm_sq.device)
        for theta in thetas:
            for start in range(0, theta.numel(), kernels.CHUNK):
                t = theta.reshape(-1)[start:start + kernels.CHUNK].float()  # may be theta itself
                eps_sq += t.square().square_().sum()
        return torch.stack([norm_sq.reshape(()), eps_sq])

    def _perturb(self, group: SliceGroup, scale: float, swapped: bool) -> None:
        # no fused kernel for this rule: torch, chunked, in place (it is not the paper's method)
        sources = self._thetas(group, swapped)
        for sl, theta in zip(group.slices, sources):
            if not swapped and self.engine.needs_backup:
                self._backup(sl).copy_(sl.param)
                theta = sl.state["backup"]
            flat_p, flat_t = sl.param.reshape(-1), theta.reshape(-1)
            for start in range(0, flat_p.numel(), kernels.CHUNK):
                t = flat_t[start:start + kernels.CHUNK].float()
                flat_p[start:start + kernels.CHUNK].copy_(t + scale * t * t)


class FisherSAM(PerturbedOptimizer):
    """Fisher-SAM (Kim et al. 2022, Eq. 8): eps = rho * f^-1 g / sqrt(g^T f^-1 g), f = 1 + eta g^2."""

    rule = "fisher"
    hyperparameters = {"rho": 0.1, "eta": 0.1}

    def __init__(self, params, base_optimizer, rho: float = 0.1, eta: float = 0.1, **kwargs):
        super().__init__(params, base_optimizer, rho=rho, eta=eta, **kwargs)


class TRAMFisher(FisherSAM):
    """TRAM-Fisher (Algorithm 2): Fisher-SAM's eps with g, and so f, taken at noised inputs x + z.

    The optimizer math is Fisher-SAM's; ``TrainStep`` runs pass 1 at x + z (NoisyInputs).
    Algorithm 2 writes eps without a scale; we keep Fisher-SAM's gamma (rho), default 0.1 as
    the paper's FSAM baseline; rho=1 is Algorithm 2 literally. Algorithm 2 has no d, so
    ``radius_scale`` (default 1) multiplies rho: the radius is radius_scale * rho, the same
    knob as TRAM's for sweeps over the size of the ascent.
    """

    hyperparameters = {"rho": 0.1, "eta": 0.1, "radius_scale": 1.0}
    pass1_at_noised_inputs = True

    def __init__(self, params, base_optimizer, rho: float = 0.1, eta: float = 0.1,
                 radius_scale: float = 1.0, **kwargs):
        PerturbedOptimizer.__init__(self, params, base_optimizer, rho=rho, eta=eta,
                                    radius_scale=radius_scale, **kwargs)

    def _radius(self, options, divergence):
        return float(options["radius_scale"]) * float(options["rho"])


def _as_groups(params) -> List[Dict[str, Any]]:
    params = list(params)
    if params and isinstance(params[0], dict):
        return [{**g, "params": list(g["params"])} for g in params]
    return [{"params": params}]


def _dedup_in_place(name: str, groups: List[Dict[str, Any]]) -> None:
    """A parameter listed twice in a group (a tied weight from
    ``named_parameters(remove_duplicate=False)``) would be perturbed and restored twice, and the
    second backup would hold theta + eps: keep its first occurrence only."""
    for group in groups:
        seen, kept = set(), []
        for p in group["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                kept.append(p)
        if len(kept) != len(group["params"]):
            warnings.warn(f"{name}: {len(group['params']) - len(kept)} parameter(s) listed more than "
                          f"once in a param group (tied weights?); each is used once", UserWarning,
                          stacklevel=4)
            group["params"][:] = kept


def _check_base_kwargs(name: str, cls: type, kwargs: Dict[str, Any], own: Dict[str, float]) -> None:
    sig = inspect.signature(cls.__init__)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return
    accepted = [k for k in sig.parameters if k not in ("self", "params")]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {unknown}: not a {name} hyperparameter "
                         f"({sorted(own)}) nor an argument of {cls.__name__} ({accepted})")


def _device_of(groups: List[SliceGroup]):
    for g in groups:
        for s in g.slices:
            return s.param.device
    return torch.device("cpu")
