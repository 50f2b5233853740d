"""Two gloo ranks sum token losses and counts to the single-process value (no pad counted)."""
import json
import os
import sys

import pytest
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from test_evaluate_ppl import Bigram, direct_nll, stream  # noqa: E402


def _rank(rank, world, init_file, out):
    import torch.distributed as dist

    from tram_dist.data import EvalBlocks, EvalLoader
    from tram_dist.evaluate import evaluate_domains, evaluate_loss

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = Bigram()
        ds = EvalBlocks(stream(61), 8)  # 9 blocks over 2 ranks: one padded duplicate
        res = evaluate_loss(model, EvalLoader(ds, 2))  # rank / world from torch.distributed
        ppl = evaluate_domains(model, {"a": EvalLoader(ds, 3), "b": EvalLoader(EvalBlocks(stream(20, 1), 8), 1)})
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"loss_sum": res.loss_sum, "num_tokens": res.num_tokens, "ppl": ppl}, f)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_single_process(tmp_path):
    out = tmp_path / "out.json"
    mp.start_processes(_rank, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, start_method="spawn")
    got = json.loads(out.read_text())
    nll, count = direct_nll(Bigram(), stream(61))
    assert got["num_tokens"] == count
    assert got["loss_sum"] == pytest.approx(nll, rel=1e-6)
    from tram_dist.data import EvalBlocks, EvalLoader
    from tram_dist.evaluate import perplexity

    single_b = perplexity(Bigram(), EvalLoader(EvalBlocks(stream(20, 1), 8), 4, 0, 1))
    assert got["ppl"]["b"] == pytest.approx(single_b, rel=1e-6)
