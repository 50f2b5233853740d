"""The real loading paths of the launcher, on local files: --model FOLDER (from_pretrained) and
--hub (hf_hub_download monkeypatched to hand out archives of the embedded corpus)."""
import importlib.util
import io
import json
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import huggingface_hub
from tram_dist.data import EMBEDDED_CORPUS, load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("train_m2d2_loading", ROOT / "launch" / "train_m2d2.py")
train_m2d2 = importlib.util.module_from_spec(spec)
sys.modules["train_m2d2_loading"] = train_m2d2
spec.loader.exec_module(train_m2d2)



@pytest.fixture
def local_model(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = load_tokenizer("tiny")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=48, n_embd=32, n_layer=1, n_head=2,
                     bos_token_id=0, eos_token_id=0)
    folder = tmp_path / "model"
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_local_model_folder_zero_shot_eval(tmp_path, local_model, one_thread):
    out = tmp_path / "out"
    train_m2d2.main(["--model", str(local_model), "--max-steps", "0", "--eval-domains", "math", "art",
                     "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache")])
    ev = json.loads((out / "eval.json").read_text())
    assert ev["method"] == "zero-shot" and set(ev["domains"]) == {"math", "art"}
    assert "block_size: 48" in (out / "config.yaml").read_text()  # default: the model's context
    assert (out / "final" / "model.safetensors").is_file()


def _archive(path, domain):
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "valid", "test"):
            data = (EMBEDDED_CORPUS / ("math" if domain == "math_l1" else "art") / f"{split}.txt").read_bytes()
            info = tarfile.TarInfo(f"{domain}/{split}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_hub_run_from_local_archives(tmp_path, local_model, monkeypatch, one_thread):
    asked = []

    def download(repo_id, repo_type, filename):
        asked.append(filename)
        domain = filename.split("/")[-1].removesuffix(".tar.gz")
        return _archive(tmp_path / f"{domain}.tar.gz", domain)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    out = tmp_path / "out"
    train_m2d2.main(["--model", str(local_model), "--hub", "--train-domain", "math_l1",
                     "--eval-domains", "Art", "--method", "adamw", "--max-steps", "1",
                     "--batch-size", "2", "--block-size", "32", "--lr", "1e-4",
                     "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache")])
    assert sorted(asked) == ["data/Art.tar.gz", "data/math_l1.tar.gz"]
    ev = json.loads((out / "eval.json").read_text())
    assert list(ev["domains"]) == ["math_l1", "Art"] and ev["method"] == "adamw"


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train(tmp_path, local_model, name, *flags):
    out = tmp_path / name
    train_m2d2.main(["--model", str(local_model), "--eval-domains", "math", "--max-steps", "2",
                     "--batch-size", "2", "--block-size", "32", "--lr", "1e-3",
                     "--method", "tram-theta-prev", "--output-dir", str(out),
                     "--cache-dir", str(tmp_path / "cache"), *flags])
    return out


def test_pretrained_model_trains_in_train_mode_with_shared_dropout_masks(tmp_path, local_model, one_thread):
    """from_pretrained hands over a model in eval mode: the launcher still trains with its
    dropout (0.1 in this config) on. With the target forward sharing the pass-1 masks,
    d_theta(t-1) at step 1 (target = theta) is 0; drawing fresh masks it is dropout noise."""
    shared = _metrics(_train(tmp_path, local_model, "shared"))
    indep = _metrics(_train(tmp_path, local_model, "indep", "--target-dropout", "independent"))
    assert abs(shared[0]["divergence"]) <= 1e-7
    assert indep[0]["divergence"] > 1e-5  # train mode: dropout on
    off = _metrics(_train(tmp_path, local_model, "nodrop", "--target-dropout", "independent",
                          "--dropout", "0"))
    assert abs(off[0]["divergence"]) <= 1e-7  # --dropout 0 overrides the config
    rec = shared[1]
    for key in ("radius", "eps_norm", "eps_applied", "lr", "divergence_clamped", "perturbed_loss"):
        assert key in rec, key
    assert rec["radius"] == pytest.approx(rec["divergence"] + 1e-5, rel=1e-6)


def test_analysis_adds_sharpness_and_cka_to_eval(tmp_path, local_model, one_thread):
    out = _train(tmp_path, local_model, "analysis", "--analysis")
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["analysis"]) == {"sharpness", "cka"}
    assert ev["analysis"]["sharpness"]["math"] >= 0 and 0 < ev["analysis"]["cka"]["math"] <= 1 + 1e-9
    assert "epsilon-sharpness" in (out / "eval.md").read_text()
