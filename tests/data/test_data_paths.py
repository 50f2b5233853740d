"""Domain and split names never lead outside their folder: the data folder, the hub cache or the
token cache. Each bad name fails with one DataError line naming it, before any file is read or
written outside."""
import importlib.util
import sys
from pathlib import Path

import pytest

import huggingface_hub
from tram_dist.data import (DataError, DataSource, HubSource, LocalSource, TokenCache, eval_blocks,
                            load_tokenizer, train_blocks)

ROOT = Path(__file__).resolve().parents[2]
TEXT = "Let x be a compact group.\n\nThe lemma holds.\n" * 40


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


def domain(folder):
    folder.mkdir(parents=True)
    for split in ("train", "valid", "test"):
        (folder / f"{split}.txt").write_text(TEXT)
    return folder


@pytest.fixture
def layout(tmp_path):
    """tmp/a/b/data/alpha (the data folder), tmp/x (a domain outside it), tmp/a/b/cache."""
    data = tmp_path / "a" / "b" / "data"
    domain(data / "alpha")
    domain(tmp_path / "x")
    return data, tmp_path / "a" / "b" / "cache"


def one_line(e):
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def written_outside(tmp_path, cache):
    """Token cache files (streams and sidecars) anywhere under tmp_path but not in `cache`."""
    return [p for p in tmp_path.rglob("*.*.*.*") if p.suffix in (".bin", ".json")
            and not p.is_relative_to(cache)]


def test_train_domain_cannot_leave_the_data_folder(layout, tmp_path, tok):
    data, cache = layout
    with pytest.raises(DataError) as e:
        train_blocks(LocalSource(data), TokenCache(tok, cache), "../../../x", 16)
    msg = one_line(e)
    assert "domain '../../../x' is not a plain name inside" in msg and str(data) in msg
    assert "use one of: alpha" in msg
    assert written_outside(tmp_path, cache) == []


def test_eval_domain_cannot_leave_the_data_folder(layout, tmp_path, tok):
    data, cache = layout
    with pytest.raises(DataError, match=r"domain '\.\./\.\./\.\./x' is not a plain name"):
        eval_blocks(LocalSource(data), TokenCache(tok, cache), "../../../x", "test", 16)
    assert written_outside(tmp_path, cache) == []


def test_absolute_domain_is_refused(layout, tmp_path):
    data, _ = layout
    src = LocalSource(data)
    with pytest.raises(DataError) as e:
        src.path(str(tmp_path / "x"), "train")  # data / "/abs" would be "/abs"
    assert f"domain '{tmp_path / 'x'}' is not a plain name inside {data}" in one_line(e)


@pytest.mark.parametrize("name", ["", ".", "..", "alpha/../alpha", "a\\b", "al\0pha"])
def test_names_that_are_not_one_folder(layout, name):
    with pytest.raises(DataError) as e:
        LocalSource(layout[0]).check(name)
    assert f"domain {name!r} is not a plain name" in one_line(e)


def test_symlinked_domain_cannot_leave_the_data_folder(layout, tmp_path):
    data, _ = layout
    (data / "link").symlink_to(tmp_path / "x")
    with pytest.raises(DataError) as e:
        LocalSource(data).path("link", "train")
    msg = one_line(e)
    assert "domain 'link'" in msg and "leads outside it" in msg and str(tmp_path / "x") in msg
    (data / "inner").symlink_to(data / "alpha")  # a link that stays inside is fine
    assert LocalSource(data).path("inner", "train").read_text() == TEXT


class AnyName(DataSource):
    """A source that checks nothing: the token cache must refuse bad names on its own."""

    def __init__(self, file):
        self.file = file

    def path(self, domain, split):
        return self.file


@pytest.mark.parametrize("dom,split", [("../../escape", "train"), ("ok", "../escape"),
                                       ("{tmp}/escape", "train")])
def test_cache_files_stay_in_the_cache_folder(layout, tmp_path, tok, dom, split):
    data, cache = layout
    dom = dom.format(tmp=tmp_path)  # an absolute name, kept inside tmp_path should it escape
    with pytest.raises(DataError) as e:
        TokenCache(tok, cache).tokens(AnyName(data / "alpha" / "train.txt"), dom, split)
    bad = dom if dom != "ok" else split
    assert f"{repr(bad)} is not a plain name inside {cache / 'tokens'}" in one_line(e)
    assert written_outside(tmp_path, cache) == []


def test_cache_file_that_is_a_link_outside_is_refused(tmp_path, tok):
    cache = TokenCache(tok, tmp_path / "cache")
    (tmp_path / "cache" / "tokens").mkdir(parents=True)
    (tmp_path / "cache" / "tokens" / "d.train.k.bin").symlink_to(tmp_path / "elsewhere.bin")
    with pytest.raises(DataError, match="token cache file 'd.train.k.bin'.*leads outside it"):
        cache.paths("d", "train", "k")
    assert cache.paths("d", "valid", "k")[0] == tmp_path / "cache" / "tokens" / "d.valid.k.bin"


def test_hub_domain_cannot_leave_the_hub_cache(tmp_path, monkeypatch):
    downloads = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda **kw: downloads.append(kw))
    for bad in ("../../x", str(tmp_path / "x")):
        with pytest.raises(DataError) as e:
            HubSource(tmp_path / "cache").path(bad, "test")
        assert f"domain {bad!r} is not a plain name inside" in one_line(e) and "math_l1" in str(e.value)
    assert downloads == []  # refused before asking the hub for data/../../x.tar.gz


def load_launcher():
    spec = importlib.util.spec_from_file_location("train_m2d2", ROOT / "launch" / "train_m2d2.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_m2d2"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("flag", ["--train-domain", "--eval-domains"])
def test_launcher_flags_cannot_leave_the_data_folder(layout, tmp_path, capsys, flag):
    """What a user types: --data-dir D --train-domain ../../x (or --eval-domains)."""
    data, cache = layout
    argv = ["--data-dir", str(data), "--max-steps", "0", "--cache-dir", str(cache),
            "--output-dir", str(tmp_path / "out")]
    argv += ["--train-domain", "../../../x"] if flag == "--train-domain" else \
        ["--train-domain", "alpha", "--eval-domains", "alpha", "../../../x"]
    with pytest.raises(SystemExit) as e:
        load_launcher().main(argv)
    assert e.value.code not in (0, None)
    assert "domain '../../../x' is not a plain name inside" in capsys.readouterr().err
    assert written_outside(tmp_path, cache) == []
