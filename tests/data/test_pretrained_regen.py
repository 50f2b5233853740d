"""The shipped pretrained tiny GPT-2 is what scripts/pretrain_tiny.py makes, and the launcher
loads it.

A full regeneration takes about 3.5 minutes on a 2-core CPU, too long for the suite. The run
that made the shipped folder recorded, in manifest.json, the digest of its weights after its
first TRAJECTORY_STEPS; here (a) the script reruns the first of those steps of the shipped
recipe (its full 360-step schedule) and must reach that digest bit for bit, and every file that
does not depend on training (config, generation config, tokenizer) is byte-identical to the
shipped one; (b) the shipped files match the manifest's sha256 and its recipe is the script's.
The full byte-for-byte check of every file: `python scripts/pretrain_tiny.py --check`, or this
file with TRAM_DIST_FULL_REGEN=1.
"""
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tram_dist.data import load_tokenizer
from tram_dist.data.pretrained import MANIFEST, PRETRAINED_TINY, TINY, tiny_config

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "pretrain_tiny.py"
STEP_FREE = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json")


def _manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def _script_module():
    spec = importlib.util.spec_from_file_location("pretrain_tiny_for_tests", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)  # not __main__: sets no environment variables
    return module


def _regenerate(out: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=timeout, check=True)


def test_shipped_files_match_the_manifest():
    m = _manifest(PRETRAINED_TINY)
    files = sorted(p.name for p in PRETRAINED_TINY.iterdir() if p.is_file())
    assert files == sorted([*m["files"], MANIFEST, "README.md"])
    for name, digest in m["files"].items():
        assert hashlib.sha256((PRETRAINED_TINY / name).read_bytes()).hexdigest() == digest, name
    assert "model.safetensors" in m["files"] and "config.json" in m["files"]
    assert sum((PRETRAINED_TINY / n).stat().st_size for n in files) < 6_000_000  # a few MB
    # the recipe is the script's (a changed recipe needs the folder regenerated)
    script = _script_module()
    recipe = {k: (list(v) if isinstance(v, tuple) else v) for k, v in script.RECIPE.items()}
    assert m["recipe"] == {**recipe, "domains": list(script.DOMAINS)}
    assert m["architecture"] == TINY
    # clearly pretrained: mixture test perplexity far below the random initialisation's
    assert m["eval"]["test"]["mixture"] < 15 < 2000 < m["eval"]["init_test"]["mixture"]
    readme = (PRETRAINED_TINY / "README.md").read_text()
    assert "python scripts/pretrain_tiny.py" in readme and "--check" in readme


def test_the_first_steps_of_the_shipped_run_are_reproduced_bit_for_bit(tmp_path):
    shipped = _manifest(PRETRAINED_TINY)
    first = min(int(k) for k in shipped["trajectory"])
    _regenerate(tmp_path, "--stop-after", str(first), "--no-eval")
    short = _manifest(tmp_path)
    assert short["stopped_after"] == first and short["recipe"] == shipped["recipe"]
    # the same weights after the same first steps of the same schedule as the shipped run
    assert short["trajectory"] == {str(first): shipped["trajectory"][str(first)]}, (
        f"versions now {short['versions']}, shipped {shipped['versions']}")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(p.name for p in PRETRAINED_TINY.iterdir() if p.name != "README.md")
    for name in STEP_FREE:  # what training does not change is the shipped file itself
        assert (tmp_path / name).read_bytes() == (PRETRAINED_TINY / name).read_bytes(), name
    assert short["files"]["model.safetensors"] != shipped["files"]["model.safetensors"]


def test_weights_digest_sees_every_bit():
    """The digest changes with any one bit of any tensor (a trajectory check that can fail)."""
    script = _script_module()
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config(load_tokenizer("tiny")))
    before = script.weights_digest(model)
    assert before == script.weights_digest(model)
    with torch.no_grad():
        w = model.transformer.h[1].mlp.c_fc.weight
        w.view(torch.int32)[3, 5] ^= 1  # the lowest mantissa bit of one element
    assert script.weights_digest(model) != before


@pytest.mark.skipif(os.environ.get("TRAM_DIST_FULL_REGEN") != "1",
                    reason="full regeneration takes ~3.5 min: set TRAM_DIST_FULL_REGEN=1 "
                           "(or run python scripts/pretrain_tiny.py --check)")
def test_full_regeneration_is_byte_identical(tmp_path):
    shipped = _manifest(PRETRAINED_TINY)
    _regenerate(tmp_path, "--steps", str(shipped["recipe"]["steps"]), timeout=1800)
    for name in [*shipped["files"], MANIFEST]:
        assert (tmp_path / name).read_bytes() == (PRETRAINED_TINY / name).read_bytes(), (
            f"{name} differs; versions now {_manifest(tmp_path)['versions']}, "
            f"shipped {shipped['versions']}")


@pytest.fixture
def launcher():
    spec = importlib.util.spec_from_file_location("train_m2d2_pretrained", ROOT / "launch" / "train_m2d2.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_m2d2_pretrained"] = module
    spec.loader.exec_module(module)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield module
    torch.set_num_threads(n)


def test_launcher_loads_the_pretrained_folder(tmp_path, launcher):
    tok = load_tokenizer(str(PRETRAINED_TINY))
    assert len(tok) == len(load_tokenizer("tiny")) and tok.eos_token_id == 0
    want = tiny_config(tok)
    # the launcher's --model tiny is the architecture the folder was trained with
    from tram_dist.run.model import model_config

    assert model_config("tiny", tok).to_dict() == want.to_dict()
    from transformers import AutoConfig

    got = AutoConfig.from_pretrained(str(PRETRAINED_TINY))
    for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "bos_token_id", "eos_token_id"):
        assert getattr(got, key) == getattr(want, key), key

    ppl = {}
    for model in (str(PRETRAINED_TINY), "tiny"):
        out = tmp_path / ("pre" if model != "tiny" else "rand")
        launcher.main(["--model", model, "--max-steps", "0", "--eval-domains", "math", "art",
                       "--block-size", "128", "--eval-batch-size", "16", "--output-dir", str(out),
                       "--cache-dir", str(tmp_path / "cache")])
        ev = json.loads((out / "eval.json").read_text())
        assert ev["method"] == "zero-shot"
        ppl[model] = ev["domains"]
    pre, rand = ppl[str(PRETRAINED_TINY)], ppl["tiny"]
    for dom in ("math", "art"):
        assert pre[dom] < 20 and rand[dom] > 1000 and pre[dom] * 50 < rand[dom], (dom, pre, rand)
