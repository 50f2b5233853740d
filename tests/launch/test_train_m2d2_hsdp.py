"""launch/train_m2d2.py --fsdp --hsdp-replicas 2 under torchrun with 4 processes (a 2 x 2
(replicate, shard) mesh, CPU, gloo): the final/ weights equal the single-process run's, and a
resume from its step-2 checkpoint repeats the rest bit for bit.

The tiny setup, the launch helpers and the tolerance are test_train_m2d2_sharded.py's (loaded
from that file, not copied): a 2-layer GPT-2 without dropout, TRAM-d_theta(t-1), global batch
4 (one block per rank), max_grad_norm 1.0 (the clip is active), every tensor within RTOL = 1e-5
of its largest entry (derived there; the attention key bias against its own bound).
"""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "_m2d2_sharded_helpers", Path(__file__).with_name("test_train_m2d2_sharded.py"))
S = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(S)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The tiny model folder and the single-process reference (as the sharded test's fixture)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tram_dist.data import load_tokenizer

    w = tmp_path_factory.mktemp("hsdp")
    tok = load_tokenizer(None)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=S.N_EMBD, n_layer=2, n_head=2,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2LMHeadModel(cfg).save_pretrained(w / "model")
    tok.save_pretrained(w / "model")
    S.launch([sys.executable, S.SCRIPT], w, "single")
    return w


def test_hsdp_2x2_matches_single_process_and_resumes_exactly(work):
    r = S.launch(S.torchrun(4), work, "hsdp", "--fsdp", "--hsdp-replicas", "2", "--save-interval", "2")
    cfg = S.resolved(work, "hsdp")
    assert "engine: fsdp" in cfg and "world_size: 4" in cfg and "hsdp_replicas: 2" in cfg, cfg
    assert (r.stdout + r.stderr).count("done: ") == 1
    rows, ref = S.metrics(work, "hsdp"), S.metrics(work, "single")
    assert len(rows) == len(ref) == S.STEPS
    for a, b in zip(rows, ref):  # parameter-shaped sums counted once per shard, not per replica
        for key in ("grad_norm", "clip_norm"):
            assert a[key] == pytest.approx(b[key], rel=S.RTOL), (a["step"], key, a[key], b[key])
    assert max(m["clip_norm"] for m in ref) > 1.0  # clipping is active
    assert S.assert_matches(work, "hsdp") < S.RTOL
    # resume at step 2 from the DCP checkpoint the 2 x 2 mesh wrote (each replica group holds the
    # same shards): the remaining steps and the final weights repeat bit for bit
    ckpt = work / "hsdp" / "checkpoint-00000002"
    S.launch(S.torchrun(4), work, "hsdp-resumed", "--fsdp", "--hsdp-replicas", "2", "--resume", str(ckpt))
    again = S.metrics(work, "hsdp-resumed")
    assert [m["step"] for m in again] == list(range(3, S.STEPS + 1))
    for x, y in zip(rows[2:], again):
        for key in ("loss", "perturbed_loss", "divergence", "lr", "clip_norm"):
            assert x[key] == y[key], (key, x[key], y[key])
    a, b = S.weights(work, "hsdp-resumed"), S.weights(work, "hsdp")
    assert all(torch.equal(a[k], b[k]) for k in b)
