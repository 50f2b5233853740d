"""Invalid UTF-8 is still replaced by U+FFFD (a run does not stop for one bad byte), but now
counted, with one DataWarning line per file; valid files read exactly as before, silently."""
import random
import warnings

import numpy as np
import pytest

from tram_dist.data import DataWarning, LocalSource, TokenCache, load_tokenizer, read_lines

# 4 invalid sequences: a lone lead byte, two bytes that never occur in UTF-8, and a truncated
# 3-byte sequence (one replacement, not two). The encoded U+FFFD is valid and not counted.
BAD = ("caf\xe9 au lait\n".encode("latin-1") + b"\xff\xfe marks\n\n"
       + b"euro \xe2\x82 sign\n" + "a real \ufffd stays\n".encode())


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


def data_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught if issubclass(w.category, DataWarning)]


def test_invalid_utf8_is_counted_and_warned_once(tmp_path):
    (tmp_path / "bad.txt").write_bytes(BAD)
    lines, warned = data_warnings(lambda: read_lines(tmp_path / "bad.txt"))
    assert lines == ["caf\ufffd au lait", "\ufffd\ufffd marks", "euro \ufffd sign", "a real \ufffd stays"]
    assert warned == [f"{tmp_path / 'bad.txt'}: 4 invalid UTF-8 sequences replaced by U+FFFD; "
                      "re-encode the file as UTF-8 to keep the original characters"]


def test_valid_utf8_gives_no_warning(tmp_path):
    (tmp_path / "ok.txt").write_text("caf\xe9, \u20ac, \U0001f600 and a real \ufffd\n", encoding="utf-8")
    lines, warned = data_warnings(lambda: read_lines(tmp_path / "ok.txt"))
    assert lines == ["caf\xe9, \u20ac, \U0001f600 and a real \ufffd"] and warned == []


def test_token_cache_warns_per_file_and_tokenizes_the_replaced_text(tmp_path, tok):
    for split, data in (("train", BAD), ("valid", b"\x80 one\n"), ("test", b"all valid\n")):
        (tmp_path / "d").mkdir(exist_ok=True)
        (tmp_path / "d" / f"{split}.txt").write_bytes(data)
    cache, src = TokenCache(tok, tmp_path / "cache"), LocalSource(tmp_path)
    ids, warned = data_warnings(lambda: [np.asarray(cache.tokens(src, "d", s)).tolist()
                                         for s in ("train", "valid", "test")])
    fix = "replaced by U+FFFD; re-encode the file as UTF-8 to keep the original characters"
    assert warned == [f"{tmp_path / 'd' / 'train.txt'}: 4 invalid UTF-8 sequences {fix}",
                      f"{tmp_path / 'd' / 'valid.txt'}: 1 invalid UTF-8 sequence {fix}"]
    eos = tok.eos_token_id
    expect = [x for line in BAD.decode("utf-8", "replace").split("\n") if line.strip()
              for x in tok(line, add_special_tokens=False)["input_ids"] + [eos]]
    assert ids[0] == expect


def test_decoding_equals_errors_replace(tmp_path):
    """Same lines as open(errors="replace", newline=None), the reader before counting: random
    mixes of valid and broken sequences, lone CR, CRLF, NUL and an encoded U+FFFD."""
    pieces = [b"a", b" ", b"\n", b"\r", b"\r\n", b"\xef\xbf\xbd", b"\xc3\xa9", b"\xe2\x82", b"\x00",
              b"\xf0\x9f\x98\x80", b"\xf0\x9f", b"\x80", b"\xff", b"\xed\xa0\x80", b"\xc0\xaf"]
    rng = random.Random(0)
    for i in range(5):
        path = tmp_path / f"{i}.txt"
        path.write_bytes(b"".join(rng.choice(pieces) for _ in range(5000)))
        with open(path, encoding="utf-8", errors="replace", newline=None) as f:
            reference = [line.rstrip("\r\n") for line in f if line.strip()]
        lines, warned = data_warnings(lambda: read_lines(path))
        assert lines == reference and len(warned) == 1
