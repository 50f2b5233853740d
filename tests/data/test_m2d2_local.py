"""Local M2D2-layout folders, the embedded corpus, and their one-line errors."""
import pytest

from tram_dist.data import (DataError, LocalSource, embedded_source, iter_lines, read_lines,
                            resolve_source)


def make_m2d2(root, domains=("alpha", "beta"), splits=("train", "valid", "test")):
    for d in domains:
        (root / d).mkdir(parents=True)
        for s in splits:
            (root / d / f"{s}.txt").write_text(f"{d} {s} line one\n\n   \n{d} {s} line two\r\n\n")
    return root


def test_local_folder_paths_and_domains(tmp_path):
    src = LocalSource(make_m2d2(tmp_path / "m2d2"))
    assert src.domains() == ["alpha", "beta"]
    assert src.path("beta", "valid") == tmp_path / "m2d2" / "beta" / "valid.txt"
    src.check("alpha")


def test_empty_and_blank_lines_are_dropped(tmp_path):
    src = LocalSource(make_m2d2(tmp_path / "m2d2"))
    assert read_lines(src.path("alpha", "train")) == ["alpha train line one", "alpha train line two"]
    batches = list(iter_lines(src.path("alpha", "train"), batch_size=1))
    assert batches == [["alpha train line one"], ["alpha train line two"]]


def test_embedded_corpus_is_the_default():
    src = resolve_source()
    assert src.domains() == embedded_source().domains()
    assert {"math", "physics", "art"} <= set(src.domains())
    for d in src.domains():
        src.check(d)


def _one_line(e):
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_data_folder(tmp_path):
    with pytest.raises(DataError) as e:
        resolve_source(data_dir=tmp_path / "nope")
    msg = _one_line(e)
    assert "does not exist" in msg and "--data-dir" in msg


def test_unknown_domain_lists_available(tmp_path):
    src = LocalSource(make_m2d2(tmp_path / "m2d2"))
    with pytest.raises(DataError) as e:
        src.path("gamma", "test")
    msg = _one_line(e)
    assert "unknown domain 'gamma'" in msg and "alpha, beta" in msg


def test_missing_split_file(tmp_path):
    src = LocalSource(make_m2d2(tmp_path / "m2d2", splits=("train", "valid")))
    with pytest.raises(DataError) as e:
        src.check("alpha", ("test",))
    msg = _one_line(e)
    assert "missing split file" in msg and "test.txt" in msg


def test_unknown_split_and_both_sources(tmp_path):
    src = LocalSource(make_m2d2(tmp_path / "m2d2"))
    with pytest.raises(DataError, match="unknown split"):
        src.path("alpha", "dev")
    with pytest.raises(DataError, match="data_dir and hub both given"):
        resolve_source(data_dir=tmp_path / "m2d2", hub=True)
