"""The shipped corpus and tokenizer are exactly what scripts/make_corpus.py generates."""
import json
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "tram_dist" / "data"


def test_regeneration_is_byte_identical(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_corpus.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=60)
    for sub in ("corpus", "tokenizer"):
        made = sorted(p.relative_to(tmp_path) for p in (tmp_path / sub).rglob("*") if p.is_file())
        shipped = sorted(p.relative_to(SHIPPED) for p in (SHIPPED / sub).rglob("*")
                         if p.is_file() and p.name != "README.md")
        assert made == shipped
        for rel in made:
            assert (tmp_path / rel).read_bytes() == (SHIPPED / rel).read_bytes(), rel


def test_corpus_is_small_and_described():
    files = [p for p in (SHIPPED / "corpus").rglob("*") if p.is_file()]
    files += [p for p in (SHIPPED / "tokenizer").rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 2_000_000
    manifest = json.loads((SHIPPED / "corpus" / "manifest.json").read_text())
    assert manifest["train_domain"] == "math" and len(manifest["domains"]) >= 5
    sizes = {d: v["train"]["bytes"] for d, v in manifest["domains"].items()}
    assert sizes["math"] == max(sizes.values())
    assert "python scripts/make_corpus.py" in (SHIPPED / "corpus" / "README.md").read_text()


def test_tokenizer_loads_offline_with_eos():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(SHIPPED / "tokenizer"))
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0
    assert 2000 <= len(tok) <= 4096
    text = "Let $x$ be a compact manifold. The baroque painting depicts a garden."
    assert tok.decode(tok(text)["input_ids"]) == text
