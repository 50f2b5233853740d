"""tram_dist.analysis: linear CKA against the n x n HSIC form, representation similarity of
tiny GPT-2s, epsilon-sharpness against analytic maxima over the box, exact restoration, and
(2 gloo ranks) DDP / FSDP2 / replicated sharpness and CKA equal to one process."""
import json
import math
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tram_dist.analysis import (epsilon_sharpness, epsilon_sharpness_by_domain, linear_cka,
                                representation_similarity, representation_similarity_by_domain)
from tinymodels import lm_batch, tiny_gpt2

WORKER = os.path.join(os.path.dirname(__file__), "workers", "analysis_worker.py")


# ------------------------------------------------------------------------------------------
# linear CKA
# ------------------------------------------------------------------------------------------
def hsic_cka(X, Y):
    """Reference written from the definition: HSIC on n x n linear kernels, float64."""
    X, Y = torch.as_tensor(X, dtype=torch.float64), torch.as_tensor(Y, dtype=torch.float64)
    n = X.shape[0]
    H = torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1.0 / n, dtype=torch.float64)
    K, L = H @ (X @ X.T) @ H, H @ (Y @ Y.T) @ H

    def hsic(A, B):
        return (A * B).sum() / (n - 1) ** 2

    return float(hsic(K, L) / torch.sqrt(hsic(K, K) * hsic(L, L)))


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("n,p1,p2", [(50, 7, 3), (9, 20, 1), (200, 16, 16)])
def test_linear_cka_matches_hsic_reference(n, p1, p2):
    X = randn(n, p1, seed=0) + 3.0  # non-zero means: centring must happen
    W = randn(p1, p2, seed=1)
    Y = (X @ W + 0.5 * randn(n, p2, seed=2)).float()  # float32 in, float64 inside
    assert linear_cka(X, Y) == pytest.approx(hsic_cka(X, Y), rel=1e-6)


def test_linear_cka_chunked_rows_equal_one_chunk():
    X, Y = randn(103, 5, seed=3) * 10 + 7, randn(103, 4, seed=4)
    assert linear_cka(X, Y, chunk_rows=10) == pytest.approx(linear_cka(X, Y), rel=1e-10)


def test_linear_cka_of_itself_is_one():
    X = randn(64, 12, seed=5)
    assert linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)


def test_linear_cka_invariant_to_orthogonal_transform_and_isotropic_scaling():
    X, Y = randn(80, 10, seed=6), randn(80, 6, seed=7)
    Y = Y + X[:, :6]  # related, so the value is not near 0 or 1
    Q, _ = torch.linalg.qr(randn(10, 10, seed=8))
    base = linear_cka(X, Y)
    assert 0.1 < base < 0.99
    assert linear_cka(X @ Q, Y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(3.7 * X, 0.01 * Y) == pytest.approx(base, rel=1e-10)
    # but not to anisotropic scaling of the features (so the invariances above are informative)
    D = torch.diag(torch.linspace(0.1, 10.0, 10, dtype=torch.float64))
    assert abs(linear_cka(X @ D, Y) - base) > 1e-3


def test_linear_cka_of_independent_data_is_small():
    X, Y = randn(4000, 8, seed=9), randn(4000, 8, seed=10)
    assert linear_cka(X, Y) < 0.02  # E[CKA] ~ p/n for independent Gaussians


@pytest.mark.parametrize("X,Y,name", [
    (torch.zeros(10), torch.zeros(10, 2), "X must be 2-D"),
    (torch.randn(10, 2), torch.randn(9, 2), "Y must have the same number of rows"),
    (torch.randn(1, 3), torch.randn(1, 3), "X needs at least 2 rows"),
    (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), torch.randn(2, 2), "X has non-finite"),
    (torch.randn(5, 2), torch.tensor([[1.0], [2.0], [float("inf")], [0.0], [1.0]]), "Y has non-finite"),
    (torch.ones(6, 3), torch.randn(6, 2), "X: every column is constant"),
])
def test_linear_cka_rejects_bad_input(X, Y, name):
    with pytest.raises(ValueError, match=name):
        linear_cka(X, Y)


# ------------------------------------------------------------------------------------------
# representation similarity
# ------------------------------------------------------------------------------------------
def masked_hidden(model, batches, layer=-1):
    rows = []
    with torch.no_grad():
        for b in batches:
            h = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                      output_hidden_states=True).hidden_states[layer]
            rows.append(h[b["attention_mask"].bool()])
    return torch.cat(rows)


def lm_batches():
    return [lm_batch(n=3, seq=10, seed=s, pad_last=4) for s in range(3)]


def test_representation_similarity_of_a_model_with_itself_is_one_and_drops_after_perturbing():
    model = tiny_gpt2(seed=0)
    model.transformer.h[0].eval()  # a mixed mode, to be restored as it was
    batches = lm_batches()
    assert representation_similarity(model, model, batches) == pytest.approx(1.0, abs=1e-9)
    other = tiny_gpt2(seed=0)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.3 * torch.randn_like(p))
    cka = representation_similarity(model, other, batches)
    assert 0.0 < cka < 0.99
    assert model.training and other.training and not model.transformer.h[0].training
    assert model.transformer.h[1].training


def test_representation_similarity_equals_linear_cka_of_unpadded_positions():
    a, b = tiny_gpt2(seed=0), tiny_gpt2(seed=1)
    batches = lm_batches()
    a.eval(), b.eval()
    expected = linear_cka(masked_hidden(a, batches), masked_hidden(b, batches))
    expected_mid = linear_cka(masked_hidden(a, batches, 1), masked_hidden(b, batches, 1))
    a.train(), b.train()
    assert representation_similarity(a, b, batches) == pytest.approx(expected, rel=1e-9)
    assert representation_similarity(a, b, batches, layer=1) == pytest.approx(expected_mid, rel=1e-9)
    # padded positions are real rows of the hidden states: counting them changes the value
    unmasked = [{**bt, "attention_mask": torch.ones_like(bt["attention_mask"])} for bt in batches]
    assert representation_similarity(a, b, unmasked) != pytest.approx(expected, rel=1e-6)


def test_representation_similarity_first_position_rows_and_by_domain():
    a, b = tiny_gpt2(seed=0), tiny_gpt2(seed=1)
    batches = [lm_batch(n=4, seq=8, seed=s) for s in range(3)]
    with torch.no_grad():
        first = [(m(input_ids=bt["input_ids"], output_hidden_states=True).hidden_states[-1][:, 0])
                 for m in (a, b) for bt in batches]
    expected = linear_cka(torch.cat(first[:3]), torch.cat(first[3:]))
    assert representation_similarity(a, b, batches, rows="first") == pytest.approx(expected, rel=1e-9)
    by_domain = representation_similarity_by_domain(a, b, {"en": batches, "de": batches[:2]})
    assert list(by_domain) == ["en", "de"]
    assert by_domain["en"] == pytest.approx(representation_similarity(a, b, batches), rel=1e-12)
    assert by_domain["de"] != pytest.approx(by_domain["en"], rel=1e-6)
    with pytest.raises(ValueError, match="rows"):
        representation_similarity(a, b, batches, rows="cls")


# ------------------------------------------------------------------------------------------
# epsilon-sharpness on losses with a known maximum over the box
# ------------------------------------------------------------------------------------------
class LinearLoss(nn.Module):
    """loss = mean over labelled positions t of <theta, x_t> + c (labels[:, 1:] != -100, as
    a causal LM counts them); without labels the mean over every position."""

    def __init__(self, theta, c=2.0):
        super().__init__()
        self.theta = nn.Parameter(torch.as_tensor(theta, dtype=torch.float64))
        self.c = c

    def forward(self, x, labels=None):
        per_position = x[:, :-1] @ self.theta + self.c  # [b, T-1]
        if labels is None:
            return SimpleNamespace(loss=per_position.mean())
        keep = labels[:, 1:] != -100
        return SimpleNamespace(loss=per_position[keep].mean())


class QuadraticLoss(nn.Module):
    """loss = 0.5 sum_i h_i (theta_i - c_i)^2 (convex: the box maximum is the corner away from c)."""

    def __init__(self, theta, h, c):
        super().__init__()
        self.theta = nn.Parameter(torch.as_tensor(theta, dtype=torch.float64))
        self.h, self.c = torch.as_tensor(h, dtype=torch.float64), torch.as_tensor(c, dtype=torch.float64)

    def forward(self, **batch):
        return SimpleNamespace(loss=0.5 * (self.h * (self.theta - self.c) ** 2).sum())


def linear_batches(seed=0, n_batches=4, pad=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_batches):
        x = torch.randn(3, 6, 5, generator=g, dtype=torch.float64) + 0.3
        labels = torch.ones(3, 6, dtype=torch.long)
        if pad:
            labels[: i % 3 + 1, 1 + i:] = -100  # different token counts per batch
        out.append({"x": x, "labels": labels, "sample_index": torch.arange(3)})
    return out


def token_mean_direction(batches):
    rows = [b["x"][:, :-1][b["labels"][:, 1:] != -100] for b in batches]
    return torch.cat(rows).mean(0)


def test_sharpness_of_a_linear_loss_is_the_box_corner_value():
    theta = torch.tensor([0.5, -2.0, 0.0, 3.0, -0.1], dtype=torch.float64)
    batches = linear_batches()
    model = LinearLoss(theta)
    a = token_mean_direction(batches)  # the gradient of the token-weighted mean loss
    f0 = float(a @ theta + model.c)
    eps = 1e-2
    expected = 100 * float((a.abs() * eps * (theta.abs() + 1)).sum()) / (1 + f0)
    got = epsilon_sharpness(model, batches, epsilon=eps, lr=1.0, steps=3, accumulation_steps=len(batches))
    assert got == pytest.approx(expected, rel=1e-9)
    # the mean of per-batch means would point elsewhere: the token weighting is what is tested
    a_batch_mean = torch.stack([token_mean_direction([b]) for b in batches]).mean(0)
    per_batch_weighted = 100 * float((a_batch_mean.abs() * eps * (theta.abs() + 1)).sum()) / (1 + f0)
    assert per_batch_weighted != pytest.approx(expected, rel=1e-4)


def test_sharpness_sgd_steps_inside_the_box_are_lr_times_gradient():
    """Few small steps: coordinates with a small gradient stay inside the box at steps*lr*a_i,
    the others are clipped at the bound; the answer is still analytic."""
    theta = torch.tensor([0.5, -2.0, 0.0, 3.0, -0.1], dtype=torch.float64)
    batches = linear_batches(pad=False)
    model = LinearLoss(theta)
    a = token_mean_direction(batches)
    f0 = float(a @ theta + model.c)
    eps, lr, steps = 1e-2, 0.05, 2
    bound = eps * (theta.abs() + 1)
    y = torch.minimum(steps * lr * a.abs(), bound)
    assert bool((y < bound).any()) and bool((y == bound).any())  # both cases occur
    expected = 100 * float((a.abs() * y).sum()) / (1 + f0)
    # accumulation over all batches, repeated: every step sees the same full gradient
    got = epsilon_sharpness(model, batches, epsilon=eps, lr=lr, steps=steps, accumulation_steps=4)
    assert got == pytest.approx(expected, rel=1e-9)


def test_sharpness_of_a_convex_quadratic_converges_to_the_far_corner():
    theta = torch.tensor([1.0, -0.5, 2.0, 0.25], dtype=torch.float64)
    h = torch.tensor([1.0, 4.0, 0.5, 2.0], dtype=torch.float64)
    c = torch.tensor([0.8, 0.0, 2.5, 0.2], dtype=torch.float64)
    model = QuadraticLoss(theta, h, c)
    eps = 0.05
    bound = eps * (theta.abs() + 1)
    f0 = float(0.5 * (h * (theta - c) ** 2).sum())
    f_max = float(0.5 * (h * ((theta - c).abs() + bound) ** 2).sum())
    expected = 100 * (f_max - f0) / (1 + f0)
    got = epsilon_sharpness(model, [{}], epsilon=eps, lr=0.5, steps=200, accumulation_steps=1)
    assert got == pytest.approx(expected, rel=1e-9)
    # few tiny steps do not reach the corner: the result is below the maximum
    early = epsilon_sharpness(model, [{}], epsilon=eps, lr=1e-3, steps=2, accumulation_steps=1)
    assert 0 < early < 0.5 * expected


def test_sharpness_ignores_padding_samples():
    """is_pad samples (a sharded loader's duplicates) add nothing; a batch of padding only is
    still run (ranks stay in step) at weight 0."""
    theta = torch.tensor([0.5, -2.0, 0.0, 3.0, -0.1], dtype=torch.float64)
    batches = linear_batches()
    kw = dict(epsilon=1e-2, lr=0.05, steps=2, accumulation_steps=len(batches))
    expected = epsilon_sharpness(LinearLoss(theta), batches, **kw)
    junk = {"x": 50 * torch.ones(2, 6, 5, dtype=torch.float64), "labels": torch.ones(2, 6, dtype=torch.long)}
    padded = [{k: torch.cat([b[k], junk[k][:1]]) for k in ("x", "labels")} for b in batches]
    for b in padded:
        b["is_pad"] = torch.tensor([False, False, False, True])
    all_pad = {**junk, "is_pad": torch.tensor([True, True])}
    kw_all = {**kw, "accumulation_steps": len(batches) + 1}
    got = epsilon_sharpness(LinearLoss(theta), padded + [all_pad], **kw_all)
    assert got == pytest.approx(expected, rel=1e-9)
    unmarked = [{k: v for k, v in b.items() if k != "is_pad"} for b in padded]
    assert epsilon_sharpness(LinearLoss(theta), unmarked, **kw) != pytest.approx(expected, rel=1e-3)


def test_sharpness_defaults_follow_appendix_b1():
    import inspect
    sig = inspect.signature(epsilon_sharpness)
    assert sig.parameters["epsilon"].default == 1e-5
    assert sig.parameters["lr"].default == 8e-5
    assert sig.parameters["accumulation_steps"].default == 4
    # steps=None: one pass, each batch in one step; 6 batches / 4 -> 2 steps (batches 0-3, 4-5, 0, 1)
    calls = []

    def loss_fn(model, inputs):
        calls.append(int(inputs["i"]))
        return model(**inputs).loss

    model = QuadraticLoss([1.0], [1.0], [0.0])
    epsilon_sharpness(model, [{"i": torch.tensor(i)} for i in range(6)], loss_fn=loss_fn)
    assert calls == list(range(6)) + [0, 1, 2, 3] + [4, 5, 0, 1] + list(range(6))


# ------------------------------------------------------------------------------------------
# epsilon-sharpness on a tiny GPT-2: restoration and sanity
# ------------------------------------------------------------------------------------------
def gpt2_batches():
    return [lm_batch(n=2, seq=10, seed=s, pad_last=3 if s % 2 else 0) for s in range(4)]


def test_sharpness_restores_parameters_grads_flags_and_modes_bit_exactly():
    model = tiny_gpt2(seed=0)
    batches = gpt2_batches()
    model.transformer.wpe.weight.requires_grad_(False)   # frozen: outside the box
    model.transformer.h[1].eval()                          # mixed modes stay mixed
    model(**{k: v for k, v in batches[0].items() if k != "sample_index"}).loss.backward()
    model.transformer.h[0].mlp.c_fc.weight.grad = None     # some grads present, some not
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad for n, p in model.named_parameters()}
    grad_values = {n: g.clone() for n, g in grads.items() if g is not None}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}

    phi = epsilon_sharpness(model, batches, epsilon=1e-3, lr=0.05, steps=2, accumulation_steps=2)

    assert math.isfinite(phi) and phi > 0
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
        assert p.grad is grads[n], n
        if grads[n] is not None:
            assert torch.equal(p.grad, grad_values[n]), n
        assert p.requires_grad == flags[n], n
    assert {n: m.training for n, m in model.named_modules()} == modes


def test_sharpness_restores_parameters_when_the_loss_raises():
    model = tiny_gpt2(seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = []

    def failing_loss(m, inputs):
        calls.append(1)
        if len(calls) == 7:  # inside the second ascent step: parameters are perturbed
            raise RuntimeError("boom")
        return m(**inputs).loss

    with pytest.raises(RuntimeError, match="boom"):
        epsilon_sharpness(model, gpt2_batches(), epsilon=1e-2, lr=1.0, steps=3, accumulation_steps=2,
                          loss_fn=failing_loss)
    assert len(calls) == 7
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
        assert p.grad is None
    assert model.training


def test_sharpness_grows_with_epsilon_and_by_domain():
    model = tiny_gpt2(seed=0)
    batches = gpt2_batches()
    kw = dict(lr=1.0, steps=2, accumulation_steps=2)
    small = epsilon_sharpness(model, batches, epsilon=1e-4, **kw)
    large = epsilon_sharpness(model, batches, epsilon=1e-3, **kw)
    assert 0 < small < large
    by_domain = epsilon_sharpness_by_domain(model, {"a": batches, "b": batches[:2]}, epsilon=1e-3, **kw)
    assert list(by_domain) == ["a", "b"]
    assert by_domain["a"] == pytest.approx(large, rel=1e-9)  # deterministic: eval mode, same batches


@pytest.mark.parametrize("kw,name", [
    (dict(epsilon=0.0), "epsilon"), (dict(epsilon=-1e-5), "epsilon"), (dict(epsilon=float("nan")), "epsilon"),
    (dict(epsilon=float("inf")), "epsilon"), (dict(lr=0.0), "lr"), (dict(lr=-1.0), "lr"),
    (dict(steps=0), "steps"), (dict(accumulation_steps=0), "accumulation_steps"),
])
def test_sharpness_rejects_bad_arguments(kw, name):
    model = QuadraticLoss([1.0], [1.0], [0.0])
    with pytest.raises(ValueError, match=rf"^{name} "):
        epsilon_sharpness(model, [{}], **kw)


def test_sharpness_rejects_empty_batches_and_unlabelled_batches():
    model = tiny_gpt2(seed=0)
    with pytest.raises(ValueError, match="^batches is empty"):
        epsilon_sharpness(model, [])
    bad = lm_batch(n=2, seq=6)
    bad["labels"][:] = -100
    with pytest.raises(ValueError, match=r"batches\[1\]"):
        epsilon_sharpness(model, [lm_batch(n=2, seq=6), bad])


# ------------------------------------------------------------------------------------------
# two gloo ranks: DDP, FSDP2 (fully_shard) and a replicated plain model equal one process
# ------------------------------------------------------------------------------------------
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis")
    port, procs = free_port(), []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, WORKER, str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        text, _ = p.communicate(timeout=600)
        assert p.returncode == 0, text[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_two_ranks_sharpness_equals_one_process(two_rank_results):
    sys.path.insert(0, os.path.dirname(WORKER))
    from analysis_worker import SHARPNESS_KW, global_batches

    model = tiny_gpt2(seed=0)
    single = epsilon_sharpness(model, global_batches(), **SHARPNESS_KW)
    halved_lr = epsilon_sharpness(model, global_batches(), **{**SHARPNESS_KW, "lr": SHARPNESS_KW["lr"] / 2})
    assert abs(halved_lr - single) > 1e-2 * single  # the tolerance below can tell a wrong gradient scale
    for res in two_rank_results:
        for kind in ("fsdp2", "ddp", "replicated"):
            assert res[f"sharpness_{kind}"] == pytest.approx(single, rel=1e-4), kind
            assert res[f"restored_{kind}"], kind
    assert two_rank_results[0]["sharpness_fsdp2"] == two_rank_results[1]["sharpness_fsdp2"]


def test_two_ranks_cka_equals_one_process(two_rank_results):
    sys.path.insert(0, os.path.dirname(WORKER))
    from analysis_worker import global_batches

    single = representation_similarity(tiny_gpt2(seed=0), tiny_gpt2(seed=1), global_batches())
    for res in two_rank_results:
        assert res["cka_fsdp2_vs_plain"] == pytest.approx(single, rel=1e-6)


def test_sharpness_refuses_zero3_partitioned_parameters():
    model = QuadraticLoss([1.0], [1.0], [0.0])
    model.theta.ds_id = 0  # what DeepSpeed ZeRO-3 marks its partitioned parameters with
    with pytest.raises(NotImplementedError, match="plain, DDP and FSDP2"):
        epsilon_sharpness(model, [{}])
