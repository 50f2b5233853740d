"""Every Python snippet of the README runs as written on CPU, in order, in one namespace (the
README says so and gives the setup block first). The FSDP2 script runs under torchrun in
tests/test_examples.py."""
import os
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FSDP2_SCRIPT = "dist.init_process_group("  # the torchrun-only block


def snippets():
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_every_readme_snippet_runs_as_written(tmp_path, monkeypatch):
    blocks = snippets()
    assert len(blocks) >= 8 and sum(FSDP2_SCRIPT in b for b in blocks) == 1
    monkeypatch.chdir(tmp_path)  # relative paths in the snippets (runs/, out/, configs/)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.setenv("TRAM_DIST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    threads = torch.get_num_threads()
    namespace = {"__name__": "readme"}
    try:
        for i, block in enumerate(blocks):
            if FSDP2_SCRIPT in block:
                continue
            exec(compile(block, f"README.md python block {i}", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "runs" / "tiny-sam" / "final" / "model.safetensors").is_file()
    assert (tmp_path / "runs" / "start" / "model.safetensors").is_file()
    assert 0 <= namespace["phi"] and -1e-6 <= namespace["cka"] <= 1 + 1e-6
    assert isinstance(namespace["metrics"].loss, float)
    assert any((tmp_path / "out").glob("checkpoint-*"))
