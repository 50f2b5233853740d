"""Where a domain's text comes from: a local M2D2-layout folder, the Hugging Face hub, or the
embedded corpus shipped with the package.

Layout everywhere: ``{root}/{domain}/{train,valid,test}.txt``, one paragraph per line.
"""
from __future__ import annotations

import codecs
import os
import shutil
import tarfile
import threading
import warnings
from pathlib import Path
from typing import Iterator

from .distributed import run_once
from .errors import DataError, DataWarning

SPLITS = ("train", "valid", "test")
M2D2_REPO = "machelreid/m2d2"

#: The data set's own spellings (see notes/data-and-models.md). Training domain first.
WIKI_DOMAINS = (
    "Society_and_social_sciences", "Culture_and_the_arts", "General_referece",
    "Health_and_fitness", "History_and_events", "Human_activites", "Mathematics_and_logic",
    "Natural_and_physical_sciences", "Philosophy_and_thinking", "Religion_and_belief_systems",
    "Technology_and_applied_sciences",
)
S2ORC_DOMAINS = (
    "math_l1", "Art", "astro-ph_l1", "cond-mat_l1", "cs_l1", "econ_l1", "nlin_l1", "Philosophy",
    "physics_l1", "q-bio_l1", "stat_l1",
)

EMBEDDED_CORPUS = Path(__file__).resolve().parent / "corpus"
EMBEDDED_TOKENIZER = Path(__file__).resolve().parent / "tokenizer"

_HINT_LOCAL = ("set data_dir (--data-dir) to a folder laid out as {domain}/{train,valid,test}.txt "
               "(M2D2's archives unpack to that layout)")


def default_cache_dir() -> Path:
    """$TRAM_DIST_CACHE, else $XDG_CACHE_HOME/tram_dist, else ~/.cache/tram_dist."""
    env = os.environ.get("TRAM_DIST_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tram_dist"


class DataSource:
    """Resolves (domain, split) to a text file. Subclasses: LocalSource, HubSource."""

    name = "source"

    def domains(self) -> list[str]:
        raise NotImplementedError

    def path(self, domain: str, split: str) -> Path:
        raise NotImplementedError

    def check(self, domain: str, splits=SPLITS) -> None:
        """Fail early, with one clear line, if `domain` or one of `splits` is unavailable."""
        for split in splits:
            self.path(domain, split)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")


def is_plain_name(name) -> bool:
    """True if `name` is exactly one path component: not empty, '.' or '..', no separator, no
    NUL, no drive. Domain and split names become file names; they must never walk elsewhere."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "\0" not in name
            and "/" not in name and "\\" not in name and Path(name).name == name)


def check_name(name, what: str, root, fix: str) -> None:
    """DataError (one line) unless `name` is a plain folder/file name inside `root`."""
    if not is_plain_name(name):
        raise DataError(f"{what} {name!r} is not a plain name inside {root}; {fix}")


def check_inside(path: Path, root: Path, what: str, fix: str) -> Path:
    """`path`, or DataError if it leads outside `root` once symlinks are resolved (a plain name
    can still be a link to elsewhere)."""
    if not path.resolve().is_relative_to(root.resolve()):
        raise DataError(f"{what} {path.name!r} in {root} leads outside it (to {path.resolve()}); {fix}")
    return path


class LocalSource(DataSource):
    """A folder in M2D2's layout (the embedded corpus is one of these)."""

    def __init__(self, root: str | os.PathLike, name: str | None = None):
        self.root = Path(root).expanduser()
        self.name = name or str(self.root)
        if not self.root.is_dir():
            raise DataError(f"data folder {self.root} does not exist; {_HINT_LOCAL}")

    def domains(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and any((p / f"{s}.txt").is_file() for s in SPLITS))

    def _available(self) -> str:
        return ", ".join(self.domains()) or "none"

    def path(self, domain: str, split: str) -> Path:
        _check_split(split)
        if not is_plain_name(domain):  # '../x', '/abs', 'a/b': would read outside the folder
            raise DataError(f"domain {domain!r} is not a plain name inside {self.name}; "
                            f"use one of: {self._available()}")
        folder = check_inside(self.root / domain, self.root, "domain",
                              f"move the folder into {self.root} or set data_dir (--data-dir) to its real location")
        if not folder.is_dir():
            raise DataError(f"unknown domain {domain!r} in {self.name}; available: {self._available()}")
        file = folder / f"{split}.txt"
        if not file.is_file():
            raise DataError(f"missing split file {file}; every domain needs valid.txt and test.txt "
                            "(and train.txt to be trained on)")
        return file

    def __repr__(self):
        return f"LocalSource({str(self.root)!r})"


def embedded_source() -> LocalSource:
    """The small synthetic corpus shipped in tram_dist/data/corpus (see its README.md)."""
    return LocalSource(EMBEDDED_CORPUS, name="the embedded corpus")


def _safe_members(tar: tarfile.TarFile, archive: Path) -> list[tarfile.TarInfo]:
    """Regular files and folders only, every path inside the destination; links etc. skipped."""
    keep = []
    for m in tar.getmembers():
        parts = Path(m.name).parts
        if m.name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
            raise DataError(f"refusing to extract {archive}: member {m.name!r} points outside "
                            "the destination; delete the file and download it again")
        if m.isfile() or m.isdir():
            keep.append(m)
    return keep


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Extract a (compressed) tar archive into `dest` without letting it escape `dest`."""
    archive, dest = Path(archive), Path(dest)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = _safe_members(tar, archive)
            # filter="data" (Python >= 3.11.4 / 3.12) re-checks paths and strips modes/owners.
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(dest, members=members, **kwargs)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"cannot read archive {archive} ({e}); delete it and download it again") from e


def _find_split_dir(root: Path, domain: str) -> Path | None:
    """The folder holding the split files: `{domain}/` normally, else the shallowest one."""
    if any((root / domain / f"{s}.txt").is_file() for s in SPLITS):
        return root / domain
    candidates = sorted({p.parent for s in SPLITS for p in root.rglob(f"{s}.txt")},
                        key=lambda p: (len(p.parts), str(p)))
    return candidates[0] if candidates else None


class HubSource(DataSource):
    """M2D2 from the Hugging Face hub: one ``data/{domain}.tar.gz`` per domain, downloaded with
    huggingface_hub (its own cache) and extracted once into ``cache_dir/m2d2/{domain}/``."""

    name = "the hub (machelreid/m2d2)"

    def __init__(self, cache_dir: str | os.PathLike | None = None, repo_id: str = M2D2_REPO):
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.repo_id = repo_id
        self.name = f"the hub ({repo_id})"

    def domains(self) -> list[str]:
        return list(WIKI_DOMAINS + S2ORC_DOMAINS)

    def domain_dir(self, domain: str) -> Path:
        """`cache_dir/m2d2/{domain}`; refused if `domain` is not a plain name (it also names the
        archive to download and the extraction folder)."""
        root = self.cache_dir / "m2d2"
        fix = f"use a top-level domain name such as {', '.join(self.domains())}"
        check_name(domain, "domain", root, fix)
        return check_inside(root / domain, root, "domain", fix)

    def _download(self, domain: str) -> Path:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError,
                                            LocalEntryNotFoundError, OfflineModeIsEnabled,
                                            RepositoryNotFoundError)
        what = f"cannot download data/{domain}.tar.gz from {self.repo_id}"
        try:
            return Path(hf_hub_download(repo_id=self.repo_id, repo_type="dataset",
                                        filename=f"data/{domain}.tar.gz"))
        except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
            raise DataError(f"{what}: the hub is unreachable (offline); {_HINT_LOCAL}, "
                            "or leave hub off for the embedded corpus") from e
        except EntryNotFoundError as e:
            raise DataError(f"unknown domain {domain!r} on the hub ({self.repo_id} has no "
                            f"data/{domain}.tar.gz); top-level domains: {', '.join(self.domains())}") from e
        except RepositoryNotFoundError as e:
            raise DataError(f"{what}: the data set repository is missing or gated "
                            f"(log in with `hf auth login` if gated); {_HINT_LOCAL}") from e
        except HfHubHTTPError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"{what}: the hub answered with an error ({first}); retry later or "
                            f"{_HINT_LOCAL}") from e
        except OSError as e:  # connection errors that reach us unwrapped
            raise DataError(f"{what}: the hub is unreachable (offline: {type(e).__name__}); "
                            f"{_HINT_LOCAL}") from e

    def _extract(self, domain: str) -> None:
        final = self.domain_dir(domain)  # checks the name before it reaches the hub
        archive = self._download(domain)
        tmp = final.parent / f".{domain}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            safe_extract(archive, tmp)
            found = _find_split_dir(tmp, domain)
            if found is None:
                raise DataError(f"archive {archive} has no train/valid/test.txt; delete it and "
                                f"download again, or {_HINT_LOCAL}")
            if final.exists():  # another process won the race; keep its copy
                return
            os.replace(found, final)  # atomic: readers see all of the folder or none of it
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def prepare(self, domain: str) -> Path:
        """Download and extract `domain` once (rank 0 first; see distributed.run_once)."""
        final = self.domain_dir(domain)
        run_once(final.is_dir, lambda: self._extract(domain), what=f"M2D2 domain {domain!r}")
        return final

    def path(self, domain: str, split: str) -> Path:
        _check_split(split)
        file = self.prepare(domain) / f"{split}.txt"
        if not file.is_file():
            raise DataError(f"missing split file {file} in the hub archive of {domain!r}; "
                            f"{_HINT_LOCAL}")
        return file

    def __repr__(self):
        return f"HubSource(cache_dir={str(self.cache_dir)!r}, repo_id={self.repo_id!r})"


def resolve_source(data_dir: str | os.PathLike | None = None, hub: bool = False,
                   cache_dir: str | os.PathLike | None = None) -> DataSource:
    """--data-dir DIR -> LocalSource; --hub -> HubSource; neither -> the embedded corpus."""
    if data_dir is not None and hub:
        raise DataError("data_dir and hub both given; set one (a local folder or the hub)")
    if data_dir is not None:
        return LocalSource(data_dir)
    if hub:
        return HubSource(cache_dir)
    return embedded_source()


#: errors="replace" that also counts: the decoder calls it once per invalid sequence, with the
#: same span "replace" uses, so the decoded text is identical to errors="replace".
_REPLACE_AND_COUNT = "tram_dist.replace_and_count"
_decoding = threading.local()  # .invalid: sequences replaced since the reader last reset it


def _replace_and_count(err: UnicodeError) -> tuple[str, int]:
    _decoding.invalid += 1
    return "\ufffd", err.end


codecs.register_error(_REPLACE_AND_COUNT, _replace_and_count)


def _warn_invalid_utf8(path, count: int) -> None:
    s = "" if count == 1 else "s"
    warnings.warn(f"{path}: {count} invalid UTF-8 sequence{s} replaced by U+FFFD; re-encode the "
                  "file as UTF-8 to keep the original characters", DataWarning, stacklevel=3)


def iter_lines(path: str | os.PathLike, batch_size: int = 4096) -> Iterator[list[str]]:
    """Non-empty lines of a text file (trailing newline removed), in lists of `batch_size`.

    Lines holding only whitespace are M2D2's blank rows and are dropped. Invalid UTF-8 is
    replaced rather than fatal: one bad byte in a 5 GB dump should not stop a run. After a
    full pass, one DataWarning names the file and how many sequences were replaced.
    """
    batch: list[str] = []
    invalid = 0
    with open(path, encoding="utf-8", errors=_REPLACE_AND_COUNT, newline=None) as f:
        while True:
            # Decoding happens only inside readline, and nothing else runs on this thread in
            # between, so the count is this file's even while other readers are suspended.
            _decoding.invalid = 0
            line = f.readline()
            invalid += _decoding.invalid
            if not line:
                break
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            batch.append(line)
            if len(batch) == batch_size:
                yield batch
                batch = []
    if batch:
        yield batch
    if invalid:
        _warn_invalid_utf8(path, invalid)


def read_lines(path: str | os.PathLike) -> list[str]:
    """All non-empty lines of a split file (small files; large ones go through iter_lines)."""
    return [line for batch in iter_lines(path) for line in batch]
