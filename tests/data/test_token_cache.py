"""Token cache (done once, keyed by tokenizer + content) and block cutting."""
import numpy as np
import pytest
import torch

import tram_dist.data.tokens as tokens_mod
from tram_dist.data import (DataError, EvalBlocks, LocalSource, TokenCache, TrainBlocks,
                            eval_blocks, load_tokenizer, train_blocks)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


def corpus(root, text="Let x be a compact group.\n\nThe lemma holds.\n"):
    for split in ("train", "valid", "test"):
        (root / "d").mkdir(parents=True, exist_ok=True)
        (root / "d" / f"{split}.txt").write_text(text)
    return LocalSource(root)


def test_stream_is_lines_plus_eos(tmp_path, tok):
    src = corpus(tmp_path / "c")
    ids = np.asarray(TokenCache(tok, tmp_path / "cache").tokens(src, "d", "train")).tolist()
    eos = tok.eos_token_id
    first = tok("Let x be a compact group.", add_special_tokens=False)["input_ids"]
    second = tok("The lemma holds.", add_special_tokens=False)["input_ids"]
    assert ids == first + [eos] + second + [eos]


def test_cache_is_reused_and_keyed_by_content(tmp_path, tok, monkeypatch):
    src = corpus(tmp_path / "c")
    calls = []
    real = tokens_mod.tokenize_file
    monkeypatch.setattr(tokens_mod, "tokenize_file", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    a = TokenCache(tok, tmp_path / "cache").tokens(src, "d", "test")
    b = TokenCache(load_tokenizer("tiny"), tmp_path / "cache").tokens(src, "d", "test")
    assert len(calls) == 1 and np.array_equal(a, b)
    assert len(list((tmp_path / "cache" / "tokens").glob("*.bin"))) == 1
    (tmp_path / "c" / "d" / "test.txt").write_text("Another text entirely.\n")
    TokenCache(tok, tmp_path / "cache").tokens(src, "d", "test")
    assert len(calls) == 2


def test_cache_key_depends_on_the_tokenizer(tmp_path, tok):
    src = corpus(tmp_path / "c")
    other = load_tokenizer("tiny")
    other.add_tokens(["compactgroup"])
    assert TokenCache(tok, tmp_path).key(src.path("d", "test")) != \
        TokenCache(other, tmp_path).key(src.path("d", "test"))


def test_train_blocks_drop_the_tail():
    tokens = np.arange(23, dtype=np.uint16)
    ds = TrainBlocks(tokens, 5)
    assert len(ds) == 4
    s = ds[3]
    assert s["input_ids"].tolist() == [15, 16, 17, 18, 19]
    assert s["labels"].tolist() == s["input_ids"].tolist()
    assert s["attention_mask"].tolist() == [1] * 5
    assert s["input_ids"].dtype == torch.int64 and int(s["sample_index"]) == 3
    with pytest.raises(DataError, match="fewer than one block"):
        TrainBlocks(tokens, 64)


@pytest.mark.parametrize("n,block", [(2, 4), (23, 5), (25, 5), (26, 5), (100, 7), (9, 2)])
def test_eval_blocks_score_every_token_but_the_first_once(n, block):
    tokens = np.arange(n, dtype=np.uint16) + 10
    ds = EvalBlocks(tokens, block, pad_id=0)
    targets = []
    for i in range(len(ds)):
        s = ds[i]
        assert s["input_ids"].shape == (block,)
        valid = s["labels"][1:] != -100  # position t predicts labels[t + 1]
        targets += s["labels"][1:][valid].tolist()
        assert (s["attention_mask"] == (s["labels"] != -100).long()).all()
    assert targets == (tokens[1:].astype(np.int64)).tolist()
    assert ds.num_targets == n - 1


def test_blocks_from_the_embedded_corpus(tmp_path, tok):
    src = LocalSource(tokens_mod.EMBEDDED_TOKENIZER.parent / "corpus")
    cache = TokenCache(tok, tmp_path)
    tb = train_blocks(src, cache, "math", 128)
    eb = eval_blocks(src, cache, "art", "test", 128)
    assert len(tb) > 500 and len(eb) > 10
    assert int(tb[0]["input_ids"].max()) < len(tok)
