"""The binarized parallel format (sentence pairs for translation), and its reader.

A parallel dataset folder (data_prep.parallel writes it) holds:
  spm.model            the shared wordpiece model of both languages (sentencepiece); its ids
                       are the token ids, with the special ids of lstm_moe.files (BOS 0,
                       EOS 1, UNK 2)
  vocab.txt            one `piece<TAB>score` per id, for people (the model file is the truth)
  <split>.src.bin      source token ids, native-endian unsigned ints (meta["dtype"]), each
                       sentence as its ids followed by EOS, sentences back to back
  <split>.tgt.bin      the same for the target side
  <split>.idx          int64 [pairs + 1, 2]: the offsets, in tokens, of pair i's source and
                       target sentence in the two .bin files (row 0 is [0, 0]), so a pair is
                       read without scanning
  <split>.<lang>       for the evaluation splits, the untouched text of each side, one
                       sentence per line (sources to translate, references to score)
  meta.json            written last (format PARALLEL_FORMAT): src_lang, tgt_lang, dtype,
                       vocab {size, sha256 of spm.model, ...}, per split {pairs, src_tokens,
                       tgt_tokens, files, sha256, raw, removed}, the recipe and its id

A folder without meta.json (a killed preparation) is never mistaken for a finished one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lstm_moe.files import PARALLEL_FORMAT, read_meta

__all__ = ["PARALLEL_FORMAT", "PairSplit", "read_pairs", "read_parallel_meta"]


def read_parallel_meta(folder: Path) -> dict:
    """meta.json of a prepared parallel dataset folder."""
    return read_meta(folder, PARALLEL_FORMAT)


@dataclass
class PairSplit:
    """One split's sentence pairs, as read-only memmaps (no copy, whatever the size).

    src, tgt: all token ids of each side; offsets: [pairs + 1, 2] int64 token offsets.
    Every sentence ends with EOS; lengths count it."""

    src: np.ndarray
    tgt: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def src_lengths(self) -> np.ndarray:
        return np.diff(self.offsets[:, 0])

    @property
    def tgt_lengths(self) -> np.ndarray:
        return np.diff(self.offsets[:, 1])

    def pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Pair `index`'s source and target ids, each with its EOS."""
        (s0, t0), (s1, t1) = self.offsets[index], self.offsets[index + 1]
        return self.src[s0:s1], self.tgt[t0:t1]

    def source(self, index: int) -> np.ndarray:
        s0, s1 = self.offsets[index, 0], self.offsets[index + 1, 0]
        return self.src[s0:s1]


def read_pairs(folder: Path, split: str, meta: dict | None = None) -> PairSplit:
    """A split of a parallel dataset folder, checked against meta.json's counts."""
    folder = Path(folder)
    meta = read_parallel_meta(folder) if meta is None else meta
    if split not in meta["splits"]:
        raise KeyError(f"{folder} has no split {split!r}; it has {sorted(meta['splits'])}")
    entry = meta["splits"][split]
    if entry["pairs"] == 0:
        raise ValueError(f"{folder}: split {split!r} is empty; prepare it again with pairs in it")
    dtype = np.dtype(meta["dtype"])
    files = entry["files"]
    src = np.memmap(folder / files["src"], dtype=dtype, mode="r")
    tgt = np.memmap(folder / files["tgt"], dtype=dtype, mode="r")
    offsets = np.memmap(folder / files["index"], dtype=np.int64, mode="r")
    if offsets.size % 2:
        raise ValueError(f"{folder / files['index']}: not an [n, 2] int64 offset table")
    offsets = offsets.reshape(-1, 2)
    expected = {
        files["index"]: (len(offsets), entry["pairs"] + 1),
        files["src"]: (len(src), entry["src_tokens"]),
        files["tgt"]: (len(tgt), entry["tgt_tokens"]),
    }
    for name, (found, wanted) in expected.items():
        if found != wanted:
            raise ValueError(
                f"{folder / name} holds {found} entries but meta.json says {wanted}: the file is"
                " truncated or was changed after preparation"
            )
    if tuple(offsets[-1]) != (len(src), len(tgt)):
        raise ValueError(f"{folder / files['index']}: its last offsets do not end the .bin files")
    return PairSplit(src, tgt, offsets)
