"""A run saved after 2 steps and resumed in a fresh process group state continues exactly
like the uninterrupted run (bit for bit on CPU), for every engine's own checkpoint form:
torch.save (DDP), torch.distributed.checkpoint with DTensor TRAM targets (FSDP2), DeepSpeed's
checkpoint folder plus per-rank TRAM files (ZeRO)."""
import pytest

import engines_harness as H

ENGINES = ("ddp", "fsdp2", "fsdp2-bf16", "zero1", "zero2", "zero3", "zero2-bf16", "zero3-bf16")
METHODS = ("tram-theta-prev", "tram-ema", "tram-x")


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("ckpt"))
    return H.spawn(H.checkpoint_resume, 2, [(e, m) for e in ENGINES for m in METHODS], directory)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("method", METHODS)
def test_resume_continues_exactly(resumed, engine, method):
    r = resumed[(engine, method)]
    assert r["max_abs_diff"] == 0.0, r
    got, ref = r["metrics"]
    for key in ("loss", "perturbed_loss", "divergence", "grad_norm", "eps_norm"):
        assert got[key] == ref[key], (key, got[key], ref[key])
    assert r["step_count"] == 3
    assert r["groups_shared"], "param_groups no longer shared with the base optimizer after load"


@pytest.mark.parametrize("method", ("tram-theta-prev",))
def test_fsdp2_checkpoint_reshards_across_world_sizes(tmp_path, method):
    """torch.distributed.checkpoint keeps TRAM's targets as DTensors: saved on 2 ranks, the run
    resumes on 1 rank and continues like the uninterrupted single-process run (fp32 rounding
    of the different split only). TRAM-EMA's target is the same kind of fp32 shard buffer under
    FSDP2 (its master is the shard): its same-world resume is in test_resume_continues_exactly."""
    path = str(tmp_path / "fsdp2")
    H.spawn(H.checkpoint_save_after, 2, "fsdp2", method, path, 2)
    resumed = H.spawn(H.checkpoint_load_and_train, 1, "fsdp2", method, path, 1)
    ref = H.run_single([method], 3)[("single", method)]
    assert resumed["step_count"] == 3
    err = H.max_rel_diff(resumed["params"], ref["params"])
    assert err <= 1e-5, err
    assert abs(resumed["metrics"][0]["grad_norm"] - ref["metrics"][2]["grad_norm"]) <= 1e-5 * ref["metrics"][2]["grad_norm"]
