"""The binarized dataset format every pipeline writes and training reads.

A dataset folder holds:
  vocab.txt            one `word<TAB>count` per id (data_prep.vocab)
  train.bin, valid.bin, test.bin
                       token ids, native-endian unsigned ints (uint16 when the vocabulary fits,
                       else uint32), each sentence as its word ids followed by `</S>`
  <split>.<key>        optional, for evaluation splits: one line per sentence (such as its
                       topic), listed in meta["splits"][split]["extra"] by key
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

from lstm_moe.files import FORMAT, read_meta, read_split, write_json_atomic, write_text_atomic

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


def write_meta(folder: Path, meta: dict) -> None:
    """Atomically write meta.json (the marker of a complete dataset)."""
    write_json_atomic(Path(folder) / "meta.json", {"format": FORMAT, **meta})


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
            if not all((folder / name).is_file() for name in entry.get("extra", {}).values()):
                return False
    except (OSError, ValueError, KeyError, TypeError):  # missing, unreadable or malformed
        return False
    return True


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha.update(block)
    return sha.hexdigest()


__all__ = [
    "FORMAT",
    "SPLITS",
    "SplitWriter",
    "file_sha256",
    "is_prepared",
    "read_meta",  # from lstm_moe.files, where the readers of this format live
    "read_split",
    "recipe_id",
    "token_dtype",
    "write_json_atomic",
    "write_meta",
    "write_split",
    "write_text_atomic",
]
