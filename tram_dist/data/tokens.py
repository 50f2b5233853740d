"""Tokenizer loading and the on-disk token cache.

A split file is tokenized once into a flat token stream, ``{cache}/tokens/{domain}.{split}.{key}.bin``
(uint16 when the vocabulary fits, else int32) plus a ``.json`` sidecar, then memory-mapped.
The key hashes: the cache format version, the tokenizer's identity (its full serialized state,
not its name), the file's content (sha256 of its bytes) and the separator policy. Block size is
deliberately NOT in the key: blocks are zero-copy views of the stream (see blocks.py), so a
new --block-size reuses the cache instead of tokenizing 1B tokens again.

Stream format: each non-empty line tokenized without special tokens, followed by EOS (when
the tokenizer has one): GPT-2's document separator, so blocks that cross a paragraph boundary
see the boundary. Rank 0 builds, the other ranks wait and reuse (distributed.run_once).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .distributed import run_once
from .errors import DataError
from .m2d2 import (EMBEDDED_TOKENIZER, DataSource, check_inside, check_name, default_cache_dir,
                   iter_lines)

CACHE_FORMAT = 1  # bump when the stream format changes; old cache files are then ignored


def load_tokenizer(name_or_path: str | os.PathLike | None = None):
    """`None` or "tiny" -> the shipped offline byte-level BPE; anything else ->
    ``AutoTokenizer.from_pretrained(name_or_path)`` (a hub name or a local folder)."""
    from transformers import AutoTokenizer

    if name_or_path is None or str(name_or_path) == "tiny":
        return AutoTokenizer.from_pretrained(str(EMBEDDED_TOKENIZER))
    try:
        return AutoTokenizer.from_pretrained(str(name_or_path))
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot load the tokenizer of {name_or_path!r} ({first}); offline: pass "
                        "a local model folder (or set HF_HUB_OFFLINE=1 to use the hub cache), or "
                        "--model tiny") from e


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what determines token ids: class, serialized backend (vocab, merges,
    normalizer, pre-tokenizer) or the vocabulary, and the special tokens."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)  # runtime settings that do not change the ids we write
        state.pop("padding", None)
        h.update(json.dumps(state, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([str(t) for t in tokenizer.all_special_tokens]).encode())
    return h.hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 23) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _dtype_for(tokenizer) -> np.dtype:
    return np.dtype(np.uint16) if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def tokenize_file(path: str | os.PathLike, tokenizer, out: str | os.PathLike,
                  batch_lines: int = 4096) -> int:
    """Tokenize `path` line by line into the flat binary stream `out` (written atomically).
    Returns the number of tokens."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dtype = _dtype_for(tokenizer)
    eos = tokenizer.eos_token_id
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    n = 0
    try:
        with open(tmp, "wb") as f:
            for lines in iter_lines(path, batch_lines):
                # verbose=False: a paragraph longer than model_max_length is fine here, we cut
                # blocks later; the per-call warning would only be noise.
                ids = tokenizer(lines, add_special_tokens=False, return_attention_mask=False,
                                verbose=False)["input_ids"]
                flat: list[int] = []
                for seq in ids:
                    flat.extend(seq)
                    if eos is not None:
                        flat.append(eos)
                np.asarray(flat, dtype=dtype).tofile(f)
                n += len(flat)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return n


class TokenCache:
    """Token streams of (domain, split) files for one tokenizer, cached under `cache_dir`."""

    def __init__(self, tokenizer, cache_dir: str | os.PathLike | None = None):
        self.tokenizer = tokenizer
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.fingerprint = tokenizer_fingerprint(tokenizer)

    def key(self, path: str | os.PathLike) -> str:
        h = hashlib.sha256()
        sep = "eos" if self.tokenizer.eos_token_id is not None else "none"
        h.update(f"{CACHE_FORMAT}|{self.fingerprint}|{file_sha256(path)}|{sep}".encode())
        return h.hexdigest()[:24]

    def paths(self, domain: str, split: str, key: str) -> tuple[Path, Path]:
        """The stream and its sidecar; refused (DataError) unless both stay in `cache_dir/tokens`:
        domain and split are part of the file name, so '../x' would write elsewhere."""
        folder = self.cache_dir / "tokens"
        fix = "use a plain name without '/', '..' or NUL"
        check_name(domain, "domain", folder, fix)
        check_name(split, "split", folder, fix)
        stem = f"{domain}.{split}.{key}"
        return tuple(check_inside(folder / f"{stem}{ext}", folder, "token cache file",
                                  f"remove the link from {folder}") for ext in (".bin", ".json"))

    def tokens(self, source: DataSource, domain: str, split: str) -> np.ndarray:
        """The split's token stream as a read-only memory map, tokenizing it on first use."""
        text = source.path(domain, split)
        key = self.key(text)
        bin_path, meta_path = self.paths(domain, split, key)

        def build():
            n = tokenize_file(text, self.tokenizer, bin_path)
            meta = {"format": CACHE_FORMAT, "num_tokens": n, "dtype": _dtype_for(self.tokenizer).name,
                    "source": str(text), "domain": domain, "split": split,
                    "tokenizer": getattr(self.tokenizer, "name_or_path", ""),
                    "tokenizer_sha256": self.fingerprint}
            tmp = meta_path.with_name(f"{meta_path.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, meta_path)  # the sidecar last: its presence means "complete"

        run_once(meta_path.is_file, build, what=f"tokens of {domain}/{split}")
        meta = json.loads(meta_path.read_text())
        if meta["num_tokens"] == 0:
            raise DataError(f"{text} has no text after dropping empty lines; fill it or pick "
                            "another domain")
        return np.memmap(bin_path, dtype=np.dtype(meta["dtype"]), mode="r",
                         shape=(meta["num_tokens"],))
