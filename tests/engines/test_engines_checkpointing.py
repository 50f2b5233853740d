"""Activation checkpointing (issue 12, section 4): the same steps with and without it.

``Run(..., gradient_checkpointing=True)`` enables non-reentrant checkpointing on every GPT-2
block before the model is wrapped. Checked here:

* 2 ranks, DDP / FSDP2 / ZeRO-2 / ZeRO-3, one method per code path (plain, TRAM-d_x,
  TRAM-d_theta(t-1), the R3F and MESA penalties): 3 steps with checkpointing equal 3 steps
  without it on the same engine, parameters
  and metrics (loss, perturbed loss, d or penalty, ||T g||, ||eps||, applied ||eps||, radius);
  and with dropout 0.1 (shared masks) for TRAM-d_theta(t-1) and R3F.
* 2 ranks, every engine, dropout 0.1 with ``target_dropout="shared"``: the step-1 KL to
  theta_{t-1} = theta (TRAM's d, TRPO's penalty) is 0 within 1e-7 with checkpointing on.
* one process, every method of ``tram_dist.methods.METHODS`` with dropout 0.1 (shared masks):
  with and without checkpointing, and the step-1 KL of every method whose target is theta then.
* the activation bytes checkpointing saves (printed; the GPT-2-small-shaped measurements run
  when TRAM_CKPT_MEMORY_GPT2_SMALL=1; figures in test_activation_memory_saved_gpt2_small).

Tolerance: none; every comparison is bitwise (``torch.equal`` on the parameters, ``==`` on the
metrics). Non-reentrant checkpointing replays each block's forward in backward from the
block's saved inputs, with the CPU generator restored to the state the first forward started
from (``preserve_rng_state``), so the replay draws the same dropout masks and runs the same
kernels on the same shapes and strides; it changes no reduction order (the autograd graph,
hence the gradient accumulation order, is the one the first forward recorded). FSDP2's hooks
stay outside the checkpoint (transformers checkpoints ``forward``, not ``__call__``), and the
no-grad target forwards (d, TRPO / MESA targets) are not checkpointed at all. Measured: 0
difference everywhere, including under dropout.

One thing does differ, and it is not the recomputation: a Hugging Face causal LM in train mode
builds a KV cache when ``config.use_cache`` is True (the default), and its ``torch.cat`` turns
the keys and values into contiguous copies; checkpointing switches the cache off inside each
checkpointed block. The attention matmuls of the two runs then read different memory layouts
and round differently in the last bit (measured: gradients ~4e-9 apart with eager attention,
or with SDPA once attention dropout is on; parameters ~1e-6 apart after 3 AdamW steps). So the
comparisons set ``use_cache=False`` on both sides, and
``test_checkpointing_equals_a_run_without_kv_cache`` shows that a checkpointed run with the
default config equals, bit for bit, an uncheckpointed run with the cache off.
"""
import os

import pytest
import torch

import checkpointing_workers as W
import engines_harness as H

STEPS = 3
ENGINES = ("ddp", "fsdp2", "zero2", "zero3")
# one per code path under an engine (the suite's time budget; every method runs single-process
# below): no ascent, TRAM-d_x (noised target forward), TRAM-d_theta(t-1) (a swapped-in target,
# as TRPO and TRAM-d_theta(0)), R3F (noised inputs with gradient), MESA (an EMA target)
METHODS = ("adamw", "tram-x", "tram-theta-prev", "r3f", "mesa")
DROPOUT_METHODS = ("tram-theta-prev", "trpo")
# with dropout 0.1 (shared masks) too: the replayed masks of pass 1, the target forward and R3F's
# noised forward, against the recomputation's own replay
DROPOUT_COMPARE_METHODS = ("tram-theta-prev", "r3f")
METRIC_KEYS = ("loss", "perturbed_loss", "divergence", "penalty", "grad_norm", "eps_norm",
               "eps_applied", "radius", "ascent_skipped", "divergence_clamped")
SHARED_D_ATOL = 1e-7  # issue 8: d_theta(t-1) at step 1 with shared masks


@pytest.fixture(scope="module")
def world2():
    jobs = [(e, m) for e in ENGINES for m in METHODS]
    jobs += [(e, m, "dropout") for e in ENGINES for m in DROPOUT_COMPARE_METHODS]
    out = H.spawn(W.with_and_without, 2, jobs, STEPS, ENGINES, DROPOUT_METHODS)
    for engine in ENGINES:  # rank 0's seconds per engine, for the record (pytest -s)
        secs = [r["seconds"] for k, r in out["runs"].items() if k[0] == engine]
        print(f"\n{engine}: {len(secs)} runs of {STEPS} steps, {sum(secs):.1f} s")
    return out


def _assert_same(off, on, label):
    for t, (a, b) in enumerate(zip(off["metrics"], on["metrics"])):
        for key in METRIC_KEYS:
            assert a[key] == b[key], f"{label} step {t}: {key} {a[key]!r} without, {b[key]!r} with checkpointing"
    assert off["params"].keys() == on["params"].keys()
    differ = [k for k in off["params"] if not torch.equal(off["params"][k], on["params"][k])]
    worst = max((float((off["params"][k] - on["params"][k]).abs().max()) for k in differ), default=0.0)
    assert not differ, f"{label}: {len(differ)} parameters differ (max |diff| {worst:.2e}), first {differ[0]}"


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("method", METHODS)
def test_checkpointing_changes_nothing_under_engine(world2, engine, method):
    runs = world2["runs"]
    off, on = runs[(engine, method, False)], runs[(engine, method, True)]
    _assert_same(off, on, f"{engine} {method}")
    last = off["metrics"][-1]
    if method == "tram-fisher":  # no d: a fixed radius at noised inputs
        assert last["eps_norm"] > 0, (engine, method, last["eps_norm"])
    elif method not in ("adamw", "sam"):  # the trust region is live in these runs
        kl = last["divergence"] if last["divergence"] is not None else last["penalty"]
        assert kl is not None and kl > 1e-9, (engine, method, kl)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("method", DROPOUT_COMPARE_METHODS)
def test_checkpointing_changes_nothing_under_engine_with_dropout(world2, engine, method):
    runs = world2["runs"]
    _assert_same(runs[(engine, method, "dropout", False)], runs[(engine, method, "dropout", True)],
                 f"{engine} {method} dropout 0.1")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("method", DROPOUT_METHODS)
def test_shared_dropout_masks_with_checkpointing(world2, engine, method):
    """Dropout 0.1, checkpointing on, 2 ranks: the target forward replays pass 1's masks (and
    pass 1's checkpointed blocks replay their own in backward), so the step-1 KL to
    theta_{t-1} = theta is 0; with fresh masks it is the dropout noise."""
    shared = world2["dropout"][(engine, method, "shared")]
    assert shared["checkpointed"]
    assert abs(shared["kl"]) <= SHARED_D_ATOL, (engine, method, shared["kl"])
    if method == "tram-theta-prev":
        indep = world2["dropout"][(engine, method, "independent")]["kl"]
        assert indep > 1e-5, (engine, indep)  # the dropout is live


# ------------------------------------------------------------------------------------------
# one process
# ------------------------------------------------------------------------------------------
def _all_methods():
    from tram_dist.methods import METHODS as ALL
    return ALL


# methods whose trust-region target at step 1 is theta itself: their step-1 KL is 0 with
# shared masks (theta_{t-1}, theta_0, MESA's EMA starts at theta)
TARGET_IS_THETA_AT_STEP_1 = ("tram-theta-prev", "tram-theta0", "trpo", "mesa", "asam+trpo", "asam+mesa",
                             "tram-released-theta-prev")


@pytest.fixture(scope="module")
def single():
    overrides = {**W.DROPOUT, **W.NO_CACHE}
    return {(m, gc): W.single_method_run(m, gc, STEPS, overrides) for m in _all_methods() for gc in (False, True)}


@pytest.mark.parametrize("method", _all_methods())
def test_checkpointing_changes_nothing_single_process(single, method):
    off, on = single[(method, False)], single[(method, True)]
    _assert_same(off, on, f"single {method}")
    if method in TARGET_IS_THETA_AT_STEP_1:
        first = on["metrics"][0]
        kl = first["divergence"] if first["divergence"] is not None else first["penalty"]
        assert abs(kl) <= SHARED_D_ATOL, (method, kl)


@pytest.mark.parametrize("method", ("tram-theta-prev", "r3f", "asam+mesa"))
def test_checkpointing_equals_a_run_without_kv_cache(single, method):
    """With the default config (use_cache=True) a checkpointed run equals, bit for bit, an
    uncheckpointed run with the KV cache off: checkpointing turns the cache off in each block
    and changes nothing else (see the module docstring)."""
    default_config = W.single_method_run(method, True, STEPS, dict(W.DROPOUT))
    _assert_same(single[(method, False)], default_config, f"single {method} (use_cache default)")


TINY = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=H.VOCAB, n_positions=32, bos_token_id=0,
            eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
GPT2_SMALL = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)


def _report(name, batch, seq, off, on):
    print(f"\nactivation checkpointing, {name}, batch {batch} x {seq} tokens, fp32, one process:"
          f"\n  alive after the forward: {off['after_forward']:,} B without, {on['after_forward']:,} B with"
          f" (saves {off['after_forward'] - on['after_forward']:,} B)"
          f"\n  peak over forward + backward: {off['peak']:,} B without, {on['peak']:,} B with"
          f" (saves {off['peak'] - on['peak']:,} B); gradients {off['grads']:,} B, parameters {off['params']:,} B")


def test_activation_memory_saved_tiny():
    off = W.activation_memory(TINY, H.N_GLOBAL, H.SEQ, gc=False)
    on = W.activation_memory(TINY, H.N_GLOBAL, H.SEQ, gc=True)
    _report("tiny GPT-2", H.N_GLOBAL, H.SEQ, off, on)
    assert on["after_forward"] < off["after_forward"]
    assert on["peak"] <= off["peak"]
    assert on["grads"] == off["grads"]


@pytest.mark.skipif(os.environ.get("TRAM_CKPT_MEMORY_GPT2_SMALL") != "1",
                    reason="GPT-2-small-shaped measurement: set TRAM_CKPT_MEMORY_GPT2_SMALL=1 "
                           "(1 x 128: ~1.4 GB, ~20 s; 1 x 1024: ~4 GB, ~80 s)")
@pytest.mark.parametrize("batch,seq", ((1, 128), (1, 1024)))
def test_activation_memory_saved_gpt2_small(batch, seq):
    """Measured (torch 2.13, transformers 5.24, fp32, CPU), bytes without / with:
    1 x 128:  after the forward 386,367,504 / 211,755,024; peak 1,326,398,984 / 1,326,546,440.
    1 x 1024: after the forward 3,595,660,304 / 613,313,552; peak 4,007,357,448 / 1,506,674,696.
    At 1 x 128 the peak is the last op of backward, not the activations: every gradient plus
    four 50257 x 768 fp32 tensors (617.6 MB) for the tied wte / lm_head gradient (embedding
    backward, lm_head's, their sum) and the logits; the block activations are freed by then, so
    checkpointing cannot lower it (it holds 147 KB more there: its per-block bookkeeping)."""
    off = W.activation_memory(GPT2_SMALL, batch, seq, gc=False)
    on = W.activation_memory(GPT2_SMALL, batch, seq, gc=True)
    _report("GPT-2-small shape (124M)", batch, seq, off, on)
    assert on["after_forward"] < off["after_forward"]
    if seq >= 1024:  # the activations (12 x 12 x 1024^2 attention scores alone) set the peak
        assert on["peak"] < off["peak"]


@pytest.mark.parametrize("engine", ENGINES)
def test_evaluation_in_eval_mode_training_in_train_mode_under_engine(world2, engine):
    """Issue 8: with dropout 0.1, evaluation under the engine is deterministic (eval mode) and
    gives the model back in train mode; a model handed to the step in eval mode trains in
    train mode."""
    modes = world2["dropout"][(engine, "modes")]
    assert modes["eval_equal"] and modes["back_in_train"] and modes["trained_in_train"], modes
