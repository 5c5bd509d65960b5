"""The files every stage shares: atomic text/JSON writes, JSON reads whose errors name the
file, and the reader of the binarized dataset format that data_prep writes and training reads.

It sits below everything else: data_prep writes through it, and the engine, the tasks and the
evaluation commands read through it, so none of them imports another stage for its I/O.

A dataset folder holds `vocab.txt`, `train.bin`, `valid.bin`, `test.bin` (token ids,
native-endian unsigned ints, each sentence as its ids followed by `</S>`) and `meta.json`,
written last (data_prep.binarize). An evaluation split may have extra files beside it, one line
per sentence (per pair for translation), listed in meta["splits"][split]["extra"] by key: the
generated corpora store each sentence's topic as `<split>.topic` (read_split_extra).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FORMAT = "moe-repro-lm/1"
# Sentence-aligned pairs for translation (lstm_moe.pairs reads them, data_prep.parallel writes).
PARALLEL_FORMAT = "moe-repro-parallel/1"
# The vocabulary's special ids, fixed by the format (data_prep.vocab spells them).
BOS_ID, EOS_ID, UNK_ID = 0, 1, 2
# OSErrors that come from a path the user gave (a command exits 2 for them, as for any bad
# input), unlike a disk that fails or fills up (a runtime failure, exit 1).
PATH_ERRORS = (
    FileExistsError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file so that it is either absent, the old one, or complete: write
    `<name>.tmp`, then rename it over `path`. Every small output of the project goes this way."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_json_atomic(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def read_json(path: Path):
    """The JSON value in `path`; a malformed file is a ValueError that names it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None


def read_meta(folder: Path, expected_format: str = FORMAT) -> dict:
    """meta.json of a prepared dataset folder, checked to be of `expected_format` (a token
    stream for language modelling by default; PARALLEL_FORMAT for translation pairs)."""
    path = Path(folder) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {folder} is not a prepared dataset (or its preparation did not"
            " finish); run the data_prep command for it first"
        )
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != expected_format:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{path}: format {found!r}, expected {expected_format!r}")
    return meta


def read_split(folder: Path, split: str, meta: dict | None = None) -> np.ndarray:
    """The split's token ids as a read-only memmap (no copy, whatever the size)."""
    meta = read_meta(folder) if meta is None else meta
    if split not in meta["splits"]:
        raise KeyError(f"{folder} has no split {split!r}; it has {sorted(meta['splits'])}")
    entry = meta["splits"][split]
    path = Path(folder) / entry["file"]
    if entry["tokens"] == 0:
        raise ValueError(f"{path} is empty: prepare the dataset again with text in that split")
    ids = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")
    if len(ids) != entry["tokens"]:
        raise ValueError(
            f"{path} holds {len(ids)} tokens but meta.json says {entry['tokens']}: the file is"
            " truncated or was changed after preparation"
        )
    return ids


def read_split_extra(folder: Path, split: str, key: str, meta: dict) -> list[str] | None:
    """The lines of a split's extra file `key` (meta["splits"][split]["extra"][key]), one per
    sentence of the split (or per pair, for a parallel dataset), or None if it has none."""
    entry = meta["splits"].get(split, {})
    name = entry.get("extra", {}).get(key)
    if name is None:
        return None
    path = Path(folder) / name
    lines = path.read_text(encoding="utf-8").splitlines()
    expected = entry.get("sentences", entry.get("pairs"))
    if expected is not None and len(lines) != expected:
        raise ValueError(
            f"{path} holds {len(lines)} lines but the {split} split has {expected} sentences: "
            "the file is truncated or was changed after preparation"
        )
    return lines


__all__ = [
    "BOS_ID",
    "EOS_ID",
    "FORMAT",
    "PARALLEL_FORMAT",
    "PATH_ERRORS",
    "UNK_ID",
    "read_json",
    "read_meta",
    "read_split",
    "read_split_extra",
    "write_json_atomic",
    "write_text_atomic",
]
