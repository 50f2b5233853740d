"""The two analyses of Section 5 / Table 5: CKA representation similarity and epsilon-sharpness.

    cka = representation_similarity(pretrained, finetuned, en_batches)          # Table 5(b)
    ckas = representation_similarity_by_domain(pretrained, finetuned, {"en": b1, "de": b2})
    phi = epsilon_sharpness(model, en_batches)                                  # Table 5(a), in %
    phis = epsilon_sharpness_by_domain(model, {"en": b1, "de": b2})

CKA (Kornblith et al. 2019; Eq. 12, Appendix B.2) is linear CKA on column-centred features,
computed from the p x p feature Grams, never the n x n example Gram: 50k tokens x 768 features
needs three 768 x 768 float64 matrices, not a 50k x 50k one. The model variant streams: each
batch adds its rows to running sums (sum x, sum y, X^T X, Y^T Y, Y^T X) and one all-reduce of
those sums gives every data-parallel rank the CKA of all ranks' rows.

Epsilon-sharpness (Keskar et al. 2017; Eq. 10-11 with A = I, Appendix B.1) is
``100 * (max_{y in C_eps} f(theta + y) - f(theta)) / (1 + f(theta))`` with the box
``|y_i| <= eps (|theta_i| + 1)``, maximised by projected SGD ascent. The box is element-wise,
so it is projected on each rank's local slice of every parameter (an FSDP2 shard or a ZeRO
partition is just a smaller box); the full parameter is never gathered. The model's parameters,
gradients, requires_grad flags and train/eval modes are restored exactly afterwards.

Under DeepSpeed ZeRO-1/2/3 the model is the DeepSpeed engine (a run's ``eval_model``) and the
work goes through the library's ZeRO engine (``tram_dist.engines.deepspeed.ZeroEngine``, the
one TRAM steps with): its ``slice_groups`` give this rank's working-precision slices, their
fp32 masters and the reduced gradient slices, ``backward`` / ``discard_grads`` run and drop the
ascent's gradients, ``publish`` all-gathers the written slices for the next forward, and the
losses and token counts are summed over its data-parallel group.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

# batch keys that describe samples rather than feed the model (tram_dist.step, EvalLoader)
META_KEYS = ("sample_index", "is_pad")
IGNORE_INDEX = -100


# ------------------------------------------------------------------------------------------
# linear CKA
# ------------------------------------------------------------------------------------------
class _CKAStats:
    """Running sums from which centred linear CKA follows exactly, in float64.

    With n rows, column sums s_x, s_y and raw Grams X^T X, Y^T Y, Y^T X, the centred Grams
    are G - s s^T / n (the mean is removed once, at the end), so rows can arrive in any
    number of chunks and on any number of ranks.
    """

    def __init__(self):
        self.n = 0.0
        self.sums: Optional[List[Tensor]] = None  # sum_x, sum_y, xx, yy, yx

    def update(self, x: Tensor, y: Tensor) -> None:
        x, y = x.detach().to(torch.float64), y.detach().to(torch.float64)
        y = y.to(x.device)
        parts = [x.sum(0), y.sum(0), x.T @ x, y.T @ y, y.T @ x]
        if self.sums is None:
            self.sums = parts
        else:
            for total, part in zip(self.sums, parts):
                total += part
        self.n += x.shape[0]

    def all_reduce(self, group=None) -> None:
        """Sum the statistics over ``group``; every rank must call this with at least one row
        (an empty rank cannot know the feature sizes)."""
        if self.sums is None:
            raise ValueError("batches: this rank has no rows; every rank needs at least one row")
        flat = torch.cat([torch.tensor([self.n], dtype=torch.float64, device=self.sums[0].device)]
                         + [t.reshape(-1) for t in self.sums])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        self.n = float(flat[0])
        offset = 1
        for t in self.sums:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def cka(self, names=("X", "Y")) -> float:
        if self.sums is None or self.n < 2:
            raise ValueError(f"{names[0]}, {names[1]}: CKA needs at least 2 rows, got {int(self.n)}")
        sum_x, sum_y, xx, yy, yx = self.sums
        n = self.n
        cxx = xx - torch.outer(sum_x, sum_x) / n
        cyy = yy - torch.outer(sum_y, sum_y) / n
        cyx = yx - torch.outer(sum_y, sum_x) / n
        norm_x, norm_y = torch.linalg.matrix_norm(cxx), torch.linalg.matrix_norm(cyy)
        for name, norm in zip(names, (norm_x, norm_y)):
            if not norm > 0:
                raise ValueError(f"{name}: every column is constant, so CKA is undefined")
        return float(cyx.pow(2).sum() / (norm_x * norm_y))


def _check_matrix(name: str, m, n: Optional[int] = None) -> Tensor:
    m = torch.as_tensor(m)
    if m.dim() != 2:
        raise ValueError(f"{name} must be 2-D (examples x features), got shape {tuple(m.shape)}")
    if n is not None and m.shape[0] != n:
        raise ValueError(f"{name} must have the same number of rows as X ({n}), got {m.shape[0]}")
    if m.shape[0] < 2 or m.shape[1] < 1:
        raise ValueError(f"{name} needs at least 2 rows and 1 column, got shape {tuple(m.shape)}")
    if not m.is_floating_point():
        m = m.to(torch.float64)
    if not bool(torch.isfinite(m).all()):
        raise ValueError(f"{name} has non-finite entries")
    return m


def linear_cka(X, Y, *, chunk_rows: int = 8192) -> float:
    """Centred linear CKA of Eq. 12: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), columns centred.

    X is (n, p1) and Y is (n, p2), one row per example (or token). Computed in float64 from
    p x p Grams, ``chunk_rows`` rows at a time, so n can be the number of tokens of a split.
    """
    X = _check_matrix("X", X)
    Y = _check_matrix("Y", Y, n=X.shape[0])
    stats = _CKAStats()
    for start in range(0, X.shape[0], chunk_rows):
        stats.update(X[start:start + chunk_rows], Y[start:start + chunk_rows])
    return stats.cka()


# ------------------------------------------------------------------------------------------
# shared helpers: modes, wrappers, batches
# ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _eval_mode(*models):
    """eval() inside; every submodule's own train/eval flag restored afterwards (a model may
    mix them, e.g. a frozen encoder kept in eval mode)."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, training in saved:
            m.training = training


def _unwrap_ddp(model):
    # DDP's forward may broadcast buffers (a collective); the wrapped module computes the same
    from torch.nn.parallel import DistributedDataParallel
    return model.module if isinstance(model, DistributedDataParallel) else model


def _is_dtensor(t) -> bool:
    return hasattr(t, "to_local") and hasattr(t, "device_mesh")


def _local(t: Tensor) -> Tensor:
    """This rank's data of a parameter or gradient: an FSDP2 DTensor's shard, else the tensor."""
    return t.to_local() if _is_dtensor(t) else t


def _reshard(model) -> None:
    """FSDP2 keeps the root unit gathered after a forward without backward; reshard every unit
    so the next forward all-gathers the shards as they are now (no collective)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _dp_group(model):
    """The group whose ranks hold different data: FSDP2's (1-D) mesh, DDP's group, else WORLD."""
    first = next(iter(model.parameters()), None)
    if first is not None and _is_dtensor(first):
        return first.device_mesh.get_group()
    return getattr(model, "process_group", None)


def _model_device(model) -> torch.device:
    for p in model.parameters():
        return _local(p).device
    return torch.device("cpu")


def _to(batch: Mapping, device) -> dict:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


# ------------------------------------------------------------------------------------------
# representation similarity (Table 5b)
# ------------------------------------------------------------------------------------------
def _hidden_rows(model, inputs: dict, layer: int, rows: str, keep: Optional[Tensor]) -> Tensor:
    out = model(**inputs, output_hidden_states=True)
    hidden = out.hidden_states[layer]
    if rows == "first":  # one row per example: the token a classification head reads
        return hidden[:, 0] if keep is None else hidden[:, 0][keep.to(hidden.device)]
    mask = inputs.get("attention_mask")
    mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device) if mask is None \
        else mask.to(hidden.device).bool()
    if keep is not None:
        mask = mask & keep.to(hidden.device)[:, None]
    return hidden[mask]


@torch.no_grad()
def representation_similarity(model_a, model_b, batches: Iterable[Mapping], *, layer: int = -1,
                              rows: str = "tokens") -> float:
    """Linear CKA between ``hidden_states[layer]`` of two models over the same batches.

    rows="tokens": every position with attention_mask == 1 is a row (the default);
    rows="first": one row per example, position 0 (<s> / [CLS]: the representation under a
    classification head, Appendix B.2's "base model output for each example").
    Samples flagged ``is_pad`` are skipped; ``labels`` are not passed (no loss is needed).
    Both models run in eval mode without grad; their modes are restored afterwards. Under
    torch.distributed every rank passes its own batches and gets the CKA of all ranks' rows;
    under FSDP2 / ZeRO-3 ranks must run the same number of batches (forward gathers weights).
    """
    if rows not in ("tokens", "first"):
        raise ValueError(f"rows must be 'tokens' or 'first', got {rows!r}")
    stats = _CKAStats()
    net_a, net_b = _unwrap_ddp(model_a), _unwrap_ddp(model_b)
    device_a, device_b = _model_device(net_a), _model_device(net_b)
    try:
        with _eval_mode(net_a, net_b):
            for batch in batches:
                inputs = {k: v for k, v in batch.items() if k not in META_KEYS and k != "labels"}
                pad = batch.get("is_pad")
                keep = None if pad is None else ~torch.as_tensor(pad).bool().reshape(-1)
                x = _hidden_rows(net_a, _to(inputs, device_a), layer, rows, keep)
                y = _hidden_rows(net_b, _to(inputs, device_b), layer, rows, keep)
                stats.update(x, y)
    finally:
        _reshard(net_a)
        _reshard(net_b)
    if _distributed():
        stats.all_reduce(_dp_group(model_a))
    return stats.cka(names=("model_a hidden states", "model_b hidden states"))


def representation_similarity_by_domain(model_a, model_b, batches_by_domain: Mapping[str, Iterable[Mapping]],
                                        **kwargs) -> Dict[str, float]:
    """{domain: CKA} with one ``representation_similarity`` call per domain, in order (every
    rank must pass the same domains in the same order)."""
    return {name: representation_similarity(model_a, model_b, batches, **kwargs)
            for name, batches in batches_by_domain.items()}


# ------------------------------------------------------------------------------------------
# epsilon-sharpness (Table 5a)
# ------------------------------------------------------------------------------------------
def _model_loss(model, inputs: dict) -> Tensor:
    return model(**inputs).loss


def _label_count(labels: Optional[Tensor]) -> int:
    """Tokens a mean loss averages over, as TrainStep counts them: 2-D labels are a causal LM
    (position i predicts labels[i + 1]), 1-D labels one per example; no labels: weight 1."""
    if labels is None:
        return 1
    if labels.dim() >= 2:
        return int((labels[:, 1:] != IGNORE_INDEX).sum())
    return int((labels != IGNORE_INDEX).sum())


def _prepare(batches: Sequence[Mapping]):
    """(model inputs, weight) per batch. ``is_pad`` samples get label -100; a batch of padding
    only keeps its labels (a finite loss for the forward every rank must run) at weight 0."""
    prepared = []
    for i, batch in enumerate(batches):
        inputs = {k: v for k, v in batch.items() if k not in META_KEYS}
        labels, pad = inputs.get("labels"), batch.get("is_pad")
        all_pad = pad is not None and bool(torch.as_tensor(pad).all())
        if labels is not None and pad is not None and not all_pad:
            pad = torch.as_tensor(pad).bool().reshape(-1, *([1] * (labels.dim() - 1)))
            labels = inputs["labels"] = labels.masked_fill(pad.to(labels.device), IGNORE_INDEX)
        count = _label_count(labels)
        if count == 0:
            raise ValueError(f"batches[{i}] has no token with a label (all labels are -100)")
        prepared.append((inputs, 0 if all_pad else count))
    return prepared


def _check_sharpness_args(epsilon, lr, steps, accumulation_steps) -> None:
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a finite number > 0, got {epsilon!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if steps is not None and not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps must be an int >= 1 or None, got {steps!r}")
    if not (isinstance(accumulation_steps, int) and accumulation_steps >= 1):
        raise ValueError(f"accumulation_steps must be an int >= 1, got {accumulation_steps!r}")


def _is_deepspeed_engine(model) -> bool:
    return type(model).__module__.startswith("deepspeed") and hasattr(model, "zero_optimization_stage")


def _zero_engine(model, engine):
    """The ``ZeroEngine`` that measures ``model`` under DeepSpeed ZeRO, or None for plain, DDP
    and FSDP2 models. ``model`` is the DeepSpeed engine (or, with ``engine`` given, its module);
    the adapter is ``engine``, else the one ``tram_dist.engines.deepspeed.initialize`` attached
    to the ZeRO optimizer, else a new one for that optimizer."""
    if engine is not None:
        ds = getattr(engine, "ds", None)
        if ds is None or not _is_deepspeed_engine(ds):
            raise TypeError(f"engine must be the ZeroEngine of a DeepSpeed run, got {type(engine).__name__}")
        if model is not ds and model is not ds.module:
            raise ValueError("engine: model is neither this ZeroEngine's DeepSpeed engine nor its module")
        return engine
    if _is_deepspeed_engine(model):
        if getattr(model, "optimizer", None) is None:
            raise NotImplementedError("epsilon_sharpness needs a DeepSpeed engine with its ZeRO optimizer "
                                      "(the ascent's gradients are reduced and sliced by it); this one has none")
        found = getattr(model.optimizer, "tram_engine", None)
        if found is not None:
            return found
        from .engines.deepspeed import ZeroEngine
        return ZeroEngine(model)  # raises for what the ZeRO engine does not run (stage 0, offload, fp16)
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise NotImplementedError(
            "epsilon_sharpness supports plain, DDP and FSDP2 (fully_shard) models and DeepSpeed engines; "
            "these are ZeRO-3 partitioned parameters without their engine: pass the DeepSpeed engine "
            "(a run's eval_model), or engine=<its ZeroEngine>")
    return None


def _averages_grads(model) -> bool:
    """Whether backward already averages gradients over the data-parallel ranks (DDP, FSDP)."""
    from torch.nn.parallel import DistributedDataParallel
    if isinstance(model, DistributedDataParallel):
        return True
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        if isinstance(model, FullyShardedDataParallel):
            return True
    except ImportError:
        pass
    return any(_is_dtensor(p) for p in model.parameters())


def epsilon_sharpness(model, batches: Iterable[Mapping], epsilon: float = 1e-5, *, lr: float = 8e-5,
                      steps: Optional[int] = None, accumulation_steps: int = 4,
                      loss_fn: Optional[Callable[[object, dict], Tensor]] = None, engine=None) -> float:
    """Keskar et al.'s epsilon-sharpness (Eq. 10, A = I) in percent, by projected SGD ascent.

    f is the mean loss over ``batches``: ``loss_fn(model, inputs)`` (default
    ``model(**inputs).loss``) weighted by each batch's labelled-token count (TrainStep's rule;
    weight 1 per batch without labels), summed over all data-parallel ranks.

    Ascent (Appendix B.1, after Juneja et al. 2023): plain SGD with ``lr`` (8e-5), each step
    accumulating the gradient of ``accumulation_steps`` (4) consecutive batches (batches of
    32 examples in the paper), then y <- clip(y + lr g, -eps(|theta|+1), eps(|theta|+1)).
    B.1 does not give the number of steps; ``steps=None`` makes one pass over ``batches``
    (ceil(len / accumulation_steps) steps, as one SGD epoch over the evaluation split would).
    Steps take consecutive batches, wrapping around the list, so every step accumulates
    exactly ``accumulation_steps`` batches and every batch is used at least once. The
    perturbation y is kept apart from theta (float32 or wider) so that steps of lr * g ~ 1e-8
    are not rounded away when added to theta.

    phi = 100 * (max(f(theta + y), f(theta)) - f(theta)) / (1 + f(theta)); y = 0 is in the
    box, so the maximum is never below f(theta).

    The model runs in eval mode (no dropout: f is deterministic). Only parameters with
    requires_grad are perturbed. Every parameter's local data, ``.grad``, requires_grad and
    every module's train/eval flag are restored bit-exactly, also on an exception.
    Under torch.distributed each rank passes its own batches, the same number on every rank.

    Engines: plain modules (replicated on every rank: gradients are summed here), DDP, FSDP2
    (``fully_shard``) and DeepSpeed ZeRO-1/2/3 (fp32 or bf16). Under ZeRO, ``model`` is the
    DeepSpeed engine (a run's ``eval_model``; every forward goes through it, also the ones
    ``loss_fn`` is given) and ``engine`` the library's ``ZeroEngine`` for it, found on the ZeRO
    optimizer when omitted (``tram_dist.engines.deepspeed.initialize`` attaches it); with
    ``engine`` given, ``model`` may also be the DeepSpeed engine's module. Each rank ascends on
    its slice of the partition (the box needs only element-wise theta), theta being the fp32
    master and y + theta written, rounded, into the working-precision slice (bf16 or fp32),
    which ``publish`` all-gathers for the next forward. The working slices are restored from
    a copy and re-published, bit-exactly, and DeepSpeed's gradient buffers are emptied (the
    state after an optimizer step); the fp32 master is never written. Measure between
    optimizer steps: gradients of a step in progress raise RuntimeError.
    """
    _check_sharpness_args(epsilon, lr, steps, accumulation_steps)
    batches = list(batches)  # several passes, in the same order each time
    if not batches:
        raise ValueError("batches is empty: epsilon-sharpness needs at least one batch")
    zero = _zero_engine(model, engine)
    loss_fn = loss_fn or _model_loss
    steps = steps or math.ceil(len(batches) / accumulation_steps)
    if zero is not None:
        model, group, world = zero.ds, zero.dp_group, zero.world_size
        grad_scale = world  # ZeRO averages the reduced gradients over the data-parallel ranks
    else:
        group = _dp_group(model)
        world = dist.get_world_size(group) if _distributed() else 1
        # DDP / FSDP average gradients over ranks: scale back up to the gradient of the global sum
        grad_scale = world if _averages_grads(model) else 1
    device = _model_device(model)
    prepared = [(_to(inputs, device), count) for inputs, count in _prepare(batches)]

    # per-batch token counts summed over ranks, one collective for the whole measurement
    counts = torch.tensor([float(c) for _, c in prepared], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    if zero is not None:
        return _zero_sharpness(zero, prepared, counts, loss_fn, epsilon, lr, steps, accumulation_steps)

    # FSDP2 keeps the root unit gathered after a no-grad forward (an evaluation just before):
    # its registered parameters are then the unsharded tensors, freed by the next reshard
    _reshard(model)
    params = list(model.parameters())
    saved_grads = [p.grad for p in params]
    saved_requires_grad = [p.requires_grad for p in params]
    trainable = [p for p in params if p.requires_grad]
    backups = [_local(p).detach().clone() for p in trainable]
    try:
        with _eval_mode(model):
            for p in params:
                p.grad = None
            f0 = _mean_loss(model, prepared, counts, loss_fn, group, world)
            offsets = [torch.zeros_like(b, dtype=torch.promote_types(b.dtype, torch.float32))
                       for b in backups]
            for step in range(steps):
                chosen = [(step * accumulation_steps + j) % len(prepared) for j in range(accumulation_steps)]
                _accumulate_grads(model, prepared, chosen, counts, loss_fn, grad_scale, world, group)
                _ascend(trainable, backups, offsets, epsilon, lr)
                _reshard(model)
            del offsets
            f_max = max(_mean_loss(model, prepared, counts, loss_fn, group, world), f0)
    finally:
        with torch.no_grad():
            for p, backup in zip(trainable, backups):
                _local(p).copy_(backup)
        for p, grad, requires_grad in zip(params, saved_grads, saved_requires_grad):
            p.grad = grad
            p.requires_grad_(requires_grad)
        _reshard(model)
    return 100.0 * (f_max - f0) / (1.0 + f0)


@torch.no_grad()
def _mean_loss(model, prepared, counts: Tensor, loss_fn, group, world: int) -> float:
    """f: the token-weighted mean loss over every rank's batches."""
    total = torch.zeros((), dtype=torch.float64, device=counts.device)
    for inputs, count in prepared:
        if count:
            total += loss_fn(model, inputs).detach().to(torch.float64) * count
        else:  # padding only: forward anyway, every rank runs the same collectives
            loss_fn(model, inputs)
    if world > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    _reshard(model)
    return float(total / counts.sum())


def _accumulate_grads(model, prepared, chosen: List[int], counts: Tensor, loss_fn, grad_scale: int,
                      world: int, group) -> None:
    """Gradient of the mean loss over the chosen batches of every rank, into each ``.grad``.

    Each batch's mean loss is weighted by its share of the step's global token count, times
    the world size where backward averages over ranks (DDP, FSDP2); a plain module replicated
    on every rank gets its gradients summed here instead.
    """
    for p in model.parameters():
        p.grad = None
    step_tokens = float(counts[chosen].sum()) or 1.0  # 0: padding only, every weight is 0
    with torch.enable_grad():
        for i in chosen:
            inputs, count = prepared[i]
            loss = loss_fn(model, inputs)
            (loss * (count * grad_scale / step_tokens)).backward()
    if world > 1 and grad_scale == 1:
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=group)


@torch.no_grad()
def _ascend(trainable: List[Tensor], backups: List[Tensor], offsets: List[Tensor], epsilon: float,
            lr: float) -> None:
    """One projected SGD ascent step on each local slice: y <- clip(y + lr g, box); theta0 + y."""
    for p, backup, offset in zip(trainable, backups, offsets):
        if p.grad is None:
            continue
        offset.add_(_local(p.grad).to(offset.dtype), alpha=lr)
        bound = backup.abs().to(offset.dtype).add_(1.0).mul_(epsilon)
        torch.maximum(torch.minimum(offset, bound), -bound, out=offset)
        _local(p).copy_(backup.to(offset.dtype) + offset)
        p.grad = None


# --- DeepSpeed ZeRO-1/2/3: through the library's ZeroEngine ----------------------------------
def _zero_slices(zero) -> list:
    """This rank's slices (every parameter in ZeRO's optimizer with a part here), in the
    engine's fixed order; each call reads the current reduced gradients."""
    return [s for group in zero.slice_groups(with_grad_only=False) for s in group.slices]


def _zero_sharpness(zero, prepared, counts: Tensor, loss_fn, epsilon: float, lr: float, steps: int,
                    accumulation_steps: int) -> float:
    """``epsilon_sharpness`` on a DeepSpeed engine, on the ZeroEngine's slices (see there)."""
    ds, group, world = zero.ds, zero.dp_group, zero.world_size
    params = list(ds.module.parameters())
    slices = _zero_slices(zero)
    if any(s.grad is not None for s in slices) or any(p.grad is not None for p in params):
        raise RuntimeError("epsilon_sharpness: the DeepSpeed engine holds the gradients of a step in progress; "
                           "measure between optimizer steps (they would be discarded)")
    saved_requires_grad = [p.requires_grad for p in params]
    backups = [s.param.detach().clone() for s in slices]  # the working-precision slices, bit-exact
    # theta: the fp32 master where it is its own tensor (never written here); else (fp32 ZeRO-3
    # keeps one copy, the working one) the backup
    thetas = [s.master if s.master is not None else b for s, b in zip(slices, backups)]
    ran_backward = False
    try:
        with _eval_mode(ds):
            f0 = _mean_loss(ds, prepared, counts, loss_fn, group, world)
            offsets = [torch.zeros(t.shape, dtype=torch.promote_types(t.dtype, torch.float32), device=t.device)
                       for t in thetas]
            for step in range(steps):
                chosen = [(step * accumulation_steps + j) % len(prepared) for j in range(accumulation_steps)]
                ran_backward = True
                grads = _zero_accumulate_grads(zero, prepared, chosen, counts, loss_fn, world, len(slices))
                _zero_ascend(slices, thetas, offsets, grads, epsilon, lr)
                zero.discard_grads()
                zero.publish()
            del offsets
            f_max = max(_mean_loss(ds, prepared, counts, loss_fn, group, world), f0)
    finally:
        from . import kernels
        with torch.no_grad():
            kernels.restore_([s.param for s in slices], backups)
        if ran_backward:
            zero.discard_grads()
        for p, requires_grad in zip(params, saved_requires_grad):
            p.grad = None  # no gradient was held on entry (checked above)
            p.requires_grad_(requires_grad)
        zero.publish()
    return 100.0 * (f_max - f0) / (1.0 + f0)


def _zero_accumulate_grads(zero, prepared, chosen: List[int], counts: Tensor, loss_fn, world: int,
                           n_slices: int) -> List[Optional[Tensor]]:
    """The reduced gradient slices of the mean loss over the chosen batches of every rank:
    ``ZeroEngine.backward`` per batch (the last one is the accumulation boundary, where ZeRO-1
    reduces), each batch weighted by its share of the step's global tokens times the world
    size (ZeRO averages over ranks), as ``TrainStep`` weights micro-batches."""
    ds = zero.ds
    step_tokens = float(counts[chosen].sum()) or 1.0  # 0: padding only, every weight is 0
    with torch.enable_grad():
        for j, i in enumerate(chosen):
            inputs, count = prepared[i]
            loss = loss_fn(ds, inputs)
            zero.backward(ds, loss * (count * world / step_tokens), sync=j == len(chosen) - 1)
    slices = _zero_slices(zero)
    if len(slices) != n_slices:
        raise RuntimeError(f"ZeroEngine listed {len(slices)} slices after backward, {n_slices} before")
    return [s.grad for s in slices]


@torch.no_grad()
def _zero_ascend(slices, thetas: List[Tensor], offsets: List[Tensor], grads: List[Optional[Tensor]],
                 epsilon: float, lr: float) -> None:
    """y <- clip(y + lr g, box) on each slice; the working slice <- theta + y (rounded to its dtype)."""
    for s, theta, offset, grad in zip(slices, thetas, offsets, grads):
        if grad is None:
            continue
        offset.add_(grad.to(offset.dtype), alpha=lr)
        bound = theta.abs().to(offset.dtype).add_(1.0).mul_(epsilon)
        torch.maximum(torch.minimum(offset, bound), -bound, out=offset)
        s.param.copy_(theta.to(offset.dtype) + offset)


def epsilon_sharpness_by_domain(model, batches_by_domain: Mapping[str, Iterable[Mapping]],
                                **kwargs) -> Dict[str, float]:
    """{domain: epsilon-sharpness %} with one ``epsilon_sharpness`` call per domain, in order
    (every rank must pass the same domains in the same order)."""
    return {name: epsilon_sharpness(model, batches, **kwargs) for name, batches in batches_by_domain.items()}


def table5_analysis(model, start_model, batches_by_domain: Mapping[str, Iterable[Mapping]], *,
                    epsilon: float = 1e-5, **sharpness_kwargs) -> Dict[str, Dict[str, float]]:
    """Table 5 for one fine-tuned model: per domain, the epsilon-sharpness (%) of ``model`` and
    the CKA of its final hidden states to ``start_model``'s (the model fine-tuning began from).
    Returns ``{"sharpness": {domain: %}, "cka": {domain: cka}}`` (what ``--analysis`` adds to
    ``eval.json``). ``model`` is what a run gives as ``eval_model`` under every engine (under
    DeepSpeed ZeRO the DeepSpeed engine); ``start_model`` a plain model on every rank;
    ``sharpness_kwargs`` go to ``epsilon_sharpness`` (``lr``, ``steps``, ..., ``engine``)."""
    batches = {name: list(b) for name, b in batches_by_domain.items()}
    return {"sharpness": epsilon_sharpness_by_domain(model, batches, epsilon=epsilon, **sharpness_kwargs),
            "cka": representation_similarity_by_domain(start_model, model, batches)}


__all__ = ["linear_cka", "representation_similarity", "representation_similarity_by_domain",
           "epsilon_sharpness", "epsilon_sharpness_by_domain", "table5_analysis"]
