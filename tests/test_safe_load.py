"""Nothing loaded is ever executed: a crafted pickle anywhere in a checkpoint is refused."""
import os
import pickle

import pytest
import torch

from tram_dist import TRAM
from tram_dist.checkpoint import load_checkpoint, save_checkpoint
from tram_dist.safe_load import UnsafeCheckpointError, load_tensors

from tinymodels import lm_batch, tiny_gpt2


class _RunsCode:
    """Unpickling this calls os.system: what a crafted checkpoint file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _crafted(path, marker):
    with open(path, "wb") as f:
        pickle.dump({"torch": _RunsCode(marker)}, f)


def test_crafted_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    _crafted(tmp_path / "rng_rank0.pt", marker)
    with pytest.raises(UnsafeCheckpointError, match="was not loaded"):
        load_tensors(tmp_path / "rng_rank0.pt")
    assert not marker.exists()
    # torch.save's own format with the same payload is refused the same way
    torch.save({"x": _RunsCode(marker)}, tmp_path / "state.pt")
    with pytest.raises(UnsafeCheckpointError):
        load_tensors(tmp_path / "state.pt")
    assert not marker.exists()


def test_plain_checkpoints_load_and_a_crafted_state_pt_does_not(tmp_path):
    model = tiny_gpt2()
    opt = TRAM(model.parameters(), torch.optim.AdamW, lr=1e-3)
    batch = {k: v for k, v in lm_batch().items() if k != "sample_index"}
    model(**batch).loss.backward()
    opt.first_step(0.0)
    model(**batch).loss.backward()
    opt.second_step()
    path = save_checkpoint(str(tmp_path / "ck"), model, opt, client_state={"step": 1, "history": [{"a": 1.0}]})
    client = load_checkpoint(str(tmp_path / "ck"), model, opt)
    assert client == {"step": 1, "history": [{"a": 1.0}]}
    marker = tmp_path / "pwned"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "client": _RunsCode(marker)},
               os.path.join(path, "state.pt"))
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(str(tmp_path / "ck"), model, opt)
    assert not marker.exists()


def test_no_pickle_loads_and_no_unsafe_torch_load_in_the_package():
    root = os.path.join(os.path.dirname(__file__), "..")
    offenders = []
    for folder in ("tram_dist", "launch", "kernels"):
        for dirpath, _, files in os.walk(os.path.join(root, folder)):
            for name in files:
                if name.endswith(".py"):
                    text = open(os.path.join(dirpath, name)).read()
                    if "pickle.load" in text or "weights_only=False" in text:
                        offenders.append(os.path.join(dirpath, name))
    assert not offenders, offenders
