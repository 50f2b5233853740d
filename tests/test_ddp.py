"""DDP on 2 gloo ranks equals one process on the same global batch, for every method."""
import os
import socket
import subprocess
import sys

import pytest
import torch

from tram_dist import METHODS

WORKER = os.path.join(os.path.dirname(__file__), "workers", "ddp_worker.py")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world, out_dir):
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, WORKER, str(out_dir)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    launch(1, out)
    launch(2, out)
    return out


@pytest.mark.parametrize("method", METHODS)
def test_ddp_two_ranks_equal_single_process(runs, method):
    one = torch.load(runs / f"{method}-world1.pt")
    two = torch.load(runs / f"{method}-world2.pt")
    for n, p in one["params"].items():
        torch.testing.assert_close(two["params"][n], p, rtol=1e-5, atol=1e-7, msg=n)
    for (d1, n1, *rest1), (d2, n2, *rest2) in zip(one["log"], two["log"]):  # global, every step
        if n1 is not None:  # the AdamW baseline has no perturbation norm
            assert n2 == pytest.approx(n1, rel=1e-5)
        if d1 is not None:
            assert d2 == pytest.approx(d1, rel=1e-4, abs=1e-9)
        # losses, applied ||eps|| and radius are global (token-weighted over ranks), not rank 0's
        for a, b in zip(rest1, rest2):
            assert (a is None) == (b is None)
            if a is not None:
                assert b == pytest.approx(a, rel=1e-5, abs=1e-9)
    # every rank reports the same numbers
    assert torch.load(runs / f"{method}-world2-rank1-log.pt") == two["log"]
