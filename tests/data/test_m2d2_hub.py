"""Hub loading exercised on local archives (hf_hub_download monkeypatched), and its errors."""
import io
import tarfile

import pytest

import huggingface_hub
from huggingface_hub.errors import LocalEntryNotFoundError
from tram_dist.data import DataError, HubSource, resolve_source, safe_extract


def make_archive(path, domain, files=None, prefix=None):
    files = files or {s: f"{domain} {s} text\n\n{domain} more {s}\n" for s in ("train", "valid", "test")}
    prefix = domain if prefix is None else prefix
    with tarfile.open(path, "w:gz") as tar:
        for split, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{prefix}/{split}.txt" if prefix else f"{split}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    calls = []

    def download(repo_id, repo_type, filename, **kw):
        calls.append((repo_id, repo_type, filename))
        domain = filename.split("/")[-1].removesuffix(".tar.gz")
        return str(make_archive(tmp_path / f"{domain}.tar.gz", domain))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return calls


def test_hub_archive_is_downloaded_and_extracted_once(tmp_path, fake_hub):
    src = resolve_source(hub=True, cache_dir=tmp_path / "cache")
    assert isinstance(src, HubSource)
    path = src.path("math_l1", "test")
    assert path == tmp_path / "cache" / "m2d2" / "math_l1" / "test.txt"
    assert path.read_text().startswith("math_l1 test text")
    src.path("math_l1", "train")
    assert fake_hub == [("machelreid/m2d2", "dataset", "data/math_l1.tar.gz")]


def test_hub_archive_without_top_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda **kw: str(make_archive(tmp_path / "a.tar.gz", "Art", prefix="")))
    src = HubSource(tmp_path / "cache")
    assert src.path("Art", "valid").read_text().startswith("Art valid")


def test_offline_hub_error(tmp_path, monkeypatch):
    def offline(**kw):
        raise LocalEntryNotFoundError("cannot reach the hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(DataError) as e:
        HubSource(tmp_path / "cache").path("math_l1", "test")
    msg = str(e.value)
    assert "\n" not in msg and "offline" in msg and "--data-dir" in msg


def test_unsafe_archive_is_refused(tmp_path):
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(DataError, match="outside"):
        safe_extract(bad, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


def test_symlinks_are_skipped(tmp_path):
    arc = tmp_path / "link.tar.gz"
    with tarfile.open(arc, "w:gz") as tar:
        info = tarfile.TarInfo("d/test.txt")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    safe_extract(arc, tmp_path / "out")
    assert not (tmp_path / "out" / "d" / "test.txt").exists()
