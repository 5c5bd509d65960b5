"""The binarized dataset format every pipeline writes and training reads.

A dataset folder holds:
  vocab.txt            one `word<TAB>count` per id (data_prep.vocab)
  train.bin, valid.bin, test.bin
                       token ids, native-endian unsigned ints (uint16 when the vocabulary fits,
                       else uint32), each sentence as its word ids followed by `</S>`
  meta.json            written last: vocabulary size, dtype, per-split counts and sha256, and
                       the exact recipe that produced the folder

A language model reads a split as one stream: the `</S>` ending one sentence is the input that
predicts the first word of the next (the stream starts with an implicit `</S>`), so every word
and every `</S>` is predicted exactly once. That is the paper's perplexity denominator: "sum over
all words including the end of sentence symbol".

meta.json is written only after every other file is complete, so a folder without it (a killed
run) is never mistaken for a finished dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

FORMAT = "moe-repro-lm/1"
SPLITS = ("train", "valid", "test")
_CHUNK = 1 << 20  # ids buffered before each write


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def recipe_id(recipe: dict) -> str:
    """A short stable hash of a recipe (sorted JSON): a changed recipe gets a new folder."""
    blob = json.dumps(recipe, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


class SplitWriter:
    """Streams sentences of token ids into `<name>.bin` with bounded memory.

    Writes go to `<name>.bin.tmp`, renamed into place by `close()`; the counts and the sha256 of
    the final bytes are returned for meta.json."""

    def __init__(self, path: Path, dtype: np.dtype, eos_id: int):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.dtype, self.eos_id = np.dtype(dtype), eos_id
        self.limit = np.iinfo(self.dtype).max
        self.file = open(self.tmp, "wb")  # noqa: SIM115 (closed in close())
        self.sha = hashlib.sha256()
        self.buffer: list[int] = []
        self.sentences = self.tokens = 0

    def add(self, ids: list[int]) -> None:
        """One sentence's word ids (without `</S>`)."""
        self.buffer.extend(ids)
        self.buffer.append(self.eos_id)
        self.sentences += 1
        self.tokens += len(ids) + 1
        if len(self.buffer) >= _CHUNK:
            self._flush()

    def _flush(self) -> None:
        if not self.buffer:
            return
        array = np.asarray(self.buffer, dtype=np.int64)
        if array.max() > self.limit or array.min() < 0:
            raise ValueError(f"token id out of range for {self.dtype} in {self.path}")
        data = array.astype(self.dtype).tobytes()
        self.file.write(data)
        self.sha.update(data)
        self.buffer.clear()

    def close(self) -> dict:
        self._flush()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.tmp.replace(self.path)
        return {
            "file": self.path.name,
            "sentences": self.sentences,
            "tokens": self.tokens,
            "sha256": self.sha.hexdigest(),
        }

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def write_split(path: Path, sentences: Iterable[list[int]], dtype: np.dtype, eos_id: int) -> dict:
    """Binarize an iterable of id lists; returns the split's meta entry."""
    writer = SplitWriter(path, dtype, eos_id)
    try:
        for ids in sentences:
            writer.add(ids)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file so that it is either absent, the old one, or complete: write
    `<name>.tmp`, then rename it over `path`. Every small output of the project goes this way."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_json_atomic(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def write_meta(folder: Path, meta: dict) -> None:
    """Atomically write meta.json (the marker of a complete dataset)."""
    write_json_atomic(Path(folder) / "meta.json", {"format": FORMAT, **meta})


def read_meta(folder: Path) -> dict:
    path = Path(folder) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {folder} is not a prepared dataset (or its preparation did not"
            " finish); run the data_prep command for it first"
        )
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def is_prepared(folder: Path, rid: str) -> bool:
    """Whether `folder` holds a finished dataset of recipe id `rid` whose files have the sizes
    meta.json records: a cheap check (no checksums) that lets a command skip its work."""
    folder = Path(folder)
    try:
        meta = read_meta(folder)
        if meta["recipe_id"] != rid or not (folder / meta["vocab"]["file"]).is_file():
            return False
        itemsize = np.dtype(meta["dtype"]).itemsize
        for entry in meta["splits"].values():
            path = folder / entry["file"]
            if not path.is_file() or path.stat().st_size != entry["tokens"] * itemsize:
                return False
    except (OSError, ValueError, KeyError, TypeError):  # missing, unreadable or malformed
        return False
    return True


def read_split(folder: Path, split: str, meta: dict | None = None) -> np.ndarray:
    """The split's token ids as a read-only memmap (no copy, whatever the size)."""
    meta = read_meta(folder) if meta is None else meta
    if split not in meta["splits"]:
        raise KeyError(f"{folder} has no split {split!r}; it has {sorted(meta['splits'])}")
    entry = meta["splits"][split]
    path = Path(folder) / entry["file"]
    ids = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")
    if len(ids) != entry["tokens"]:
        raise ValueError(
            f"{path} holds {len(ids)} tokens but meta.json says {entry['tokens']}: the file is"
            " truncated or was changed after preparation"
        )
    return ids


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha.update(block)
    return sha.hexdigest()
