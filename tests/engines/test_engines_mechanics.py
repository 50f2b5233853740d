"""Per engine: the collectives TRAM adds, the bytes it holds per rank, and the restore paths.

Collectives are counted on every rank by patching torch.distributed (and the function
references DeepSpeed caches) during one TrainStep, and attributed to the TRAM optimizer
calls (swap_in_target, first_step, second_step without the base step) or to the base step.
TRAM must add exactly one all-reduce per step (norm partials and the divergence share it);
ZeRO-1/2 also all-gather the perturbed partition into the working parameters (what
DeepSpeed's own step does after its update), once more for a swapped-in target.
"""
import json
import os

import pytest
import torch

import engines_harness as H

MEM_ENGINES = ("ddp", "fsdp2", "fsdp2-bf16", "zero1", "zero2", "zero3", "zero1-bf16", "zero2-bf16", "zero3-bf16")
MEM_METHODS = ("sam", "tram-x", "tram-fisher", "tram-theta-prev", "tram-theta0", "tram-ema",
               "trpo", "r3f", "mesa")
# TRAM-d_x and TRAM-Fisher hold what SAM holds, d_theta(0) what d_theta(t-1) holds, through the
# same slice code: measured on one engine of each family and precision (the suite's time budget)
SAME_AS_ANOTHER = {"tram-x": "sam", "tram-fisher": "sam", "tram-theta0": "tram-theta-prev"}
SAME_AS_ANOTHER_ENGINES = ("ddp", "fsdp2-bf16", "zero2-bf16", "zero3")
MEM_CASES = [(e, m) for e in MEM_ENGINES for m in MEM_METHODS
             if m not in SAME_AS_ANOTHER or e in SAME_AS_ANOTHER_ENGINES]
COUNT_ENGINES = ("ddp", "fsdp2", "fsdp2-bf16", "zero1", "zero2", "zero3", "zero2-bf16", "zero3-bf16")
COUNT_METHODS = ("adamw", "sam", "tram-x", "tram-theta-prev")
RESTORE_ENGINES = ("fsdp2-bf16", "zero1", "zero2-bf16", "zero3-bf16", "zero3")

# bytes TRAM holds per trainable element of this rank's slices (docs/engines.md):
#   backup (working precision) where the engine has no separate master, plus the target of
#   TRAM-d_theta (working precision; EMA in the master's, fp32); TRPO and MESA hold what
#   TRAM-d_theta(t-1) and the EMA variant hold (their target swaps through the backup)
NO_PARAM_TARGET = ("sam", "tram-x", "tram-fisher")


def budget_per_element(engine: str, method: str, needs_backup: bool) -> int:
    bf16 = engine.endswith("bf16")
    if engine.startswith("zero"):
        # a separate fp32 master (always for ZeRO-1/2 and bf16; ZeRO-3 in fp32 too with
        # DeepSpeed 0.19, whose aliasing test compares a device with a string): no backup
        assert needs_backup == (engine == "zero3" and needs_backup)
        backup = 4 if needs_backup else 0
    else:
        backup = 4  # DDP, FSDP2: the fp32 shard is the master (also under bf16 compute)
    if method == "r3f":
        return 0  # no ascent and no swapped-in target: Descent holds nothing
    if method in NO_PARAM_TARGET:
        return backup
    if method in ("tram-ema", "mesa"):
        return backup + 4
    return backup + (2 if (bf16 and engine.startswith("zero")) else 4)


@pytest.fixture(scope="module")
def results():
    mem_jobs = list(MEM_CASES)
    count_jobs = [(e, m, None) for e in COUNT_ENGINES for m in COUNT_METHODS]
    # ZeRO-3 with DeepSpeed's default persistence threshold: small parameters stay gathered
    count_jobs += [("zero3", m, {"stage3_param_persistence_threshold": 100000}) for m in ("adamw", "sam")]
    world2 = H.spawn(H.mechanics, 2, mem_jobs, count_jobs, RESTORE_ENGINES)
    world1 = H.spawn(H.mechanics, 1, mem_jobs, [], ())
    if os.environ.get("TRAM_ENGINES_MECH_REPORT"):  # bytes per rank and collectives, for the docs
        with open(os.environ["TRAM_ENGINES_MECH_REPORT"], "w") as f:
            json.dump({"memory": {f"{e}/{m}": {"1": world1["memory"][0][(e, m)],
                                               "2": [world2["memory"][r][(e, m)] for r in range(2)]}
                                  for e, m in mem_jobs},
                       "counts": {f"{k[0]}/{k[1]}{'/persistent' if k[2] else ''}": v
                                  for k, v in world2["counts"].items()}}, f, indent=1)
    return {1: world1, 2: world2}


def _total_numel():
    return sum(p.numel() for p in H.tiny_gpt2().parameters())


@pytest.mark.parametrize("engine,method", MEM_CASES)
def test_memory_matches_budget_and_halves(results, engine, method):
    total = _total_numel()
    one = results[1]["memory"][0][(engine, method)]
    per_elem = budget_per_element(engine, method, one["needs_backup"])
    assert one["slice_numel"] == total
    assert one["total"] == one["expected"] == per_elem * total, one
    two = [results[2]["memory"][r][(engine, method)] for r in range(2)]
    if engine == "ddp":  # replicated: every rank holds the whole budget
        assert all(m["total"] == m["expected"] == one["total"] for m in two)
        return
    assert sum(m["slice_numel"] for m in two) == total  # no element on two ranks, padding on none
    for m in two:
        assert m["total"] == m["expected"] == per_elem * m["slice_numel"], m
        assert m["total"] <= 0.6 * one["total"] or one["total"] == 0  # about half on each rank
    assert sum(m["total"] for m in two) == one["total"]


def _tram(results, engine, method, persistent=False):
    return results[2]["counts"][(engine, method, persistent)].get("tram", {})


@pytest.mark.parametrize("engine", COUNT_ENGINES)
def test_tram_adds_one_all_reduce(results, engine):
    zero12 = engine.startswith("zero1") or engine.startswith("zero2")
    for method in ("sam", "tram-x", "tram-theta-prev"):
        got = _tram(results, engine, method)
        if engine == "ddp":
            # whole gradients on every rank: no norm collective; d is a per-rank partial
            expected = {} if method == "sam" else {"all_reduce": 1}
        elif zero12:
            # the perturbed (and the swapped-in target) partition reaches the other ranks'
            # working parameters through DeepSpeed's partition all-gather
            expected = {"all_reduce": 1, "all_gather_into_tensor": 2 if method == "tram-theta-prev" else 1}
        else:
            expected = {"all_reduce": 1}
        assert got == expected, (engine, method, got)


@pytest.mark.parametrize("engine", COUNT_ENGINES)
def test_base_step_collectives_unchanged(results, engine):
    """The descent is the engine's own step: same collectives as the AdamW step."""
    base = results[2]["counts"][(engine, "adamw", False)].get("base_step", {})
    assert not results[2]["counts"][(engine, "adamw", False)].get("tram")
    for method in ("sam", "tram-x", "tram-theta-prev"):
        assert results[2]["counts"][(engine, method, False)].get("base_step", {}) == base, (engine, method)


def test_zero3_persistent_parameters_are_regathered(results):
    """With DeepSpeed's persistence threshold the small parameters stay gathered; a write to
    their shard is re-gathered once per publish (an extra all-gather, documented)."""
    got = _tram(results, "zero3", "sam", persistent=True)
    assert got.get("all_reduce") == 1
    assert got.get("all_gather_into_tensor", 0) + got.get("all_gather", 0) >= 1


@pytest.mark.parametrize("engine", RESTORE_ENGINES)
def test_exception_between_passes_restores(results, engine):
    r = results[2]["restore"][engine]
    assert r["raised"] and r["phase"] == "idle"
    assert r["exception_work_diff"] == 0.0 and r["exception_master_diff"] == 0.0, r
    assert r["continues"]


@pytest.mark.parametrize("engine", RESTORE_ENGINES)
def test_skipped_ascent_is_the_adamw_step(results, engine):
    r = results[2]["restore"][engine]
    assert r["skipped"]
    assert r["skip_vs_adamw"] == 0.0, r["skip_vs_adamw"]
    work, master = r["skip_work"]["work"], r["skip_work"]["master"]
    if engine.endswith("bf16") and engine.startswith("zero"):
        master = master.to(torch.bfloat16).float()
    assert torch.equal(work, master)  # working parameters are the restored master


@pytest.mark.parametrize("engine", [e for e in RESTORE_ENGINES if e.startswith("zero")
                                    and (e.startswith("zero3") or not e.endswith("bf16"))])
def test_skipped_deepspeed_step_restores_working_params(results, engine):
    """A non-finite pass-2 gradient makes DeepSpeed skip its step before it copies the master
    back into the working parameters; the engine restores them from the untouched master."""
    r = results[2]["restore"][engine]
    assert r["nan_overflow"]
    assert r["nan_master_diff"] == 0.0
    work, master = r["nan_work"]["work"], r["nan_work"]["master"]
    if engine.endswith("bf16"):
        master = master.to(torch.bfloat16).float()
    assert torch.equal(work, master)


@pytest.mark.parametrize("engine", ("ddp", "fsdp2", "fsdp2-bf16", "zero1", "zero2", "zero2-bf16"))
def test_sam_step_is_two_adamw_passes_plus_tram(results, engine):
    """Whole-step accounting against the AdamW step under the same engine: a SAM step runs
    the passes twice and adds only TRAM's own collectives (the base step is the same).
    (TrainStep's token count and metric all-reduces appear once in both; DDP's gradient buckets go
    through its C++ reducer and are not visible here. ZeRO-3's parameter prefetching differs
    between a first and a repeated pass, so it is left out.)"""
    from collections import Counter
    counts = results[2]["counts"]
    adamw, sam = Counter(counts[(engine, "adamw", False)]["other"]), Counter(counts[(engine, "sam", False)]["other"])
    # TrainStep's own, once per step whatever the method: the token count (blocking) and the
    # metrics' sums (losses, applied ||eps||: one async all-reduce, waited when read)
    tokens = Counter({"all_reduce": 2})
    passes = adamw - tokens
    assert sam == tokens + passes + passes, (engine, adamw, sam)
