"""The One Billion Word benchmark (lm1b, Chelba et al. 2013), binarized in the common format.

Command: `python -m data_prep.lm1b --out DIR [--source PATH] [options]` (see `--help`).

Where the text comes from
  * No `--source`: the official archive (URL, size and sha256 below; `--url`, `--size`,
    `--sha256` override them) is downloaded into `--cache` (default `data/downloads`), resuming
    an interrupted transfer and verifying it (data_prep.download), then the shards are extracted
    into `<cache>/lm1b-<sha256[:12]>/`. A later run finds that folder (it is complete once its
    `extracted.json` exists) and needs neither the network nor the archive. An archive that
    fails verification is kept as `<cache>/<name>.corrupt` and the run fails; the next run
    downloads afresh. Without network the command fails within seconds and says how to give a
    local copy instead.
  * `--source PATH`, a local copy, one of
      - the official archive (`.tar.gz`), verified with `--size`/`--sha256`, then extracted as
        above (the first run; later runs reuse the extraction);
      - a folder holding the official layout: `training-monolingual.tokenized.shuffled/` and
        `heldout-monolingual.tokenized.shuffled/`, directly or inside the archive's top folder
        `1-billion-word-language-modeling-benchmark-r13output/`;
      - a folder holding the archive under its official name;
      - otherwise, a flat folder of shard files (its top-level files), such as the sample
        `news.en.heldout-00000-of-00050`, `news.en.heldout-00010+00011-of-00050.concat`,
        `news.en.heldout-00012+00013-of-00050.concat`.
  Only the archive members `training-monolingual.tokenized.shuffled/news.en-NNNNN-of-00100` and
  `heldout-monolingual.tokenized.shuffled/news.en.heldout-NNNNN-of-00050` are extracted; a member
  with an absolute path or a `..` component makes the whole archive be rejected.

Splits. `--train`, `--valid`, `--test` take glob patterns matched against the source's file
names (against the path relative to the source when a pattern contains `/`); every pattern must
match a file, and no file may be in two splits. Files of a split are read in sorted order.
  * test: `news.en.heldout-00000-of-00050`, the shard every lm1b perplexity is reported on.
  * train: the training shards `news.en-*-of-00100`; when the source has none (a flat folder of
    held-out shards), every `news.en.heldout-*` file that is not the test or validation file.
  * valid: `news.en.heldout-00001-of-00050` when the source has it; otherwise (or when
    `--valid-sentences N` is given) the last N sentences of the training stream are carved out
    as validation (N defaults to 2,000): they are excluded from the vocabulary count and from
    train.bin.
So `--source lm1b-sample --train 'news.en.heldout-0001*' --valid-sentences 2000` trains on
held-out shards 10-13 minus their last 2,000 sentences, validates on those, and tests on
held-out shard 0 (the train pattern is also the default there).

Text. One line is one sentence; its words are `str.split()` of the line decoded as UTF-8. Bytes
that are not valid UTF-8 become U+FFFD; such lines are counted (`replaced_lines`) and reported.
Empty (or blank) lines are skipped, counted (`empty_lines`) and reported; a split left without a
sentence is refused before meta.json is written. The release has no `<S>`/`</S>` markers;
literal `<S>` or `</S>` in the text become `<UNK>`.

Vocabulary: the benchmark's definition, words seen at least `--min-count` (3) times in the
training split plus `<S>`, `</S>`, `<UNK>` (793,471 entries on the full data), optionally cut to
`--max-vocab` entries. Out-of-vocabulary words become `<UNK>`.

Output. The dataset goes to `OUT/lm1b-<recipe_id>/` (vocab.txt, train/valid/test.bin,
meta.json; see data_prep.binarize), built in `OUT/lm1b-<recipe_id>.tmp/` and renamed when
complete. The recipe holds every option that affects the output and the name and size of every
source file, so a changed recipe gets a new folder, and a folder that is already complete is left
alone ("up to date"). `OUT/lm1b-latest` is a text file holding the name of the folder the last
successful run produced or found. The folder's path is the only line on stdout; messages and
progress bars go to stderr. Expected failures print one `error: ...` line and exit 2 when the
input is at fault (an option, a missing or empty file, an archive that fails verification or
is malformed), 1 when the download fails (no network, an HTTP error, a transfer that breaks
off, bytes that do not verify).

Memory. Words are counted in a first streaming pass over the training files and encoded in a
second: only the word counts (and, when carving, the last N training sentences) are held, a few
hundred MB on the full 800M words.
"""

from __future__ import annotations

import argparse
import fnmatch
import gzip
import json
import re
import shutil
import sys
import tarfile
import zlib
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from data_prep.binarize import (
    SPLITS,
    SplitWriter,
    is_prepared,
    recipe_id,
    token_dtype,
    write_meta,
    write_text_atomic,
)
from data_prep.download import (
    ChecksumError,
    DownloadError,
    NetworkUnavailable,
    download,
    verify_file,
)
from data_prep.vocab import BOS, EOS, Vocabulary
from lstm_moe.files import PATH_ERRORS

OFFICIAL_URL = (
    "http://www.statmt.org/lm-benchmark/1-billion-word-language-modeling-benchmark-r13output.tar.gz"
)
OFFICIAL_SIZE = 1_792_209_805
OFFICIAL_SHA256 = "01ba60381110baf7f189dfd2b8374de371e8c9a340835793f190bdae9e90a34e"
ARCHIVE_TOP = "1-billion-word-language-modeling-benchmark-r13output"
TRAIN_DIR = "training-monolingual.tokenized.shuffled"
HELDOUT_DIR = "heldout-monolingual.tokenized.shuffled"

TRAIN_PATTERN = "news.en-*-of-00100"
HELDOUT_PATTERN = "news.en.heldout-*"
TEST_SHARD = "news.en.heldout-00000-of-00050"
VALID_SHARD = "news.en.heldout-00001-of-00050"
DEFAULT_VALID_SENTENCES = 2000
TOKENIZER = "lm1b-str.split/1"  # bump if line reading or tokenization changes

# The archive members worth extracting, below an optional top folder.
_MEMBER = re.compile(
    r"(?:\./)?(?:[^/]+/)?(?P<path>"
    rf"{re.escape(TRAIN_DIR)}/news\.en-\d{{5}}-of-00100"
    rf"|{re.escape(HELDOUT_DIR)}/news\.en\.heldout-\d{{5}}-of-00050)"
)
_EXTRACTED = "extracted.json"  # written last into a complete extraction
_BLOCK = 1 << 22  # bytes between progress bar updates


class PrepareError(Exception):
    """An expected failure (bad input, missing data): reported as one line, exit code 2."""


# --------------------------------------------------------------------------- getting the shards


@dataclass
class Source:
    """The shard files available: relative posix path -> file."""

    root: Path
    layout: str  # "official" or "flat"
    files: dict[str, Path]
    origin: str  # for meta.json: where the files came from


def _unsafe(name: str) -> bool:
    """Whether an archive member name could point outside the extraction folder."""
    path = PurePosixPath(name.replace("\\", "/"))
    return path.is_absolute() or ".." in path.parts


class _ProgressReader:
    """A file wrapper that advances a progress bar by the bytes read through it."""

    def __init__(self, file, bar: tqdm):
        self.file, self.bar = file, bar

    def read(self, n: int = -1) -> bytes:
        data = self.file.read(n)
        self.bar.update(len(data))
        return data


def extract_archive(archive: Path, dest: Path, progress: bool = True) -> Path:
    """Extract the lm1b shards of `archive` into `dest` (streamed, one member at a time).

    The shards go to `dest/<training|heldout folder>/<name>`, paths built from the matched
    member name, never from the raw one; any member with an absolute or `..` path rejects the
    archive. Work happens in `<dest>.tmp`, renamed when `extracted.json` is written."""
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a killed earlier extraction
    for folder in (TRAIN_DIR, HELDOUT_DIR):
        (tmp / folder).mkdir(parents=True)
    extracted: dict[str, int] = {}
    try:
        with (
            open(archive, "rb") as raw,
            tqdm(
                total=archive.stat().st_size,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"extract {archive.name}",
                disable=not progress,
            ) as bar,
        ):
            reader = _ProgressReader(raw, bar)
            gzipped = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            # gzip.GzipFile checks the end-of-stream marker and the CRC, which tarfile's own
            # stream reader would not notice missing once the last member is read.
            stream = gzip.GzipFile(fileobj=reader, mode="rb") if gzipped else reader
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    if _unsafe(member.name):
                        raise PrepareError(
                            f"{archive}: unsafe member path {member.name!r}; rejected"
                        )
                    match = _MEMBER.fullmatch(member.name)
                    if not match:
                        continue
                    path = match.group("path")
                    if not member.isfile():
                        raise PrepareError(
                            f"{archive}: member {member.name!r} is not a regular file"
                        )
                    if path in extracted:
                        raise PrepareError(f"{archive}: member {path!r} appears twice")
                    source = tar.extractfile(member)
                    with source, open(tmp / path, "wb") as target:
                        shutil.copyfileobj(source, target, 1 << 20)
                    extracted[path] = member.size
            while stream.read(1 << 20):  # the rest: tar padding, then the gzip trailer
                pass
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PrepareError(f"{archive} is truncated or corrupt ({error})") from error
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not extracted:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PrepareError(f"{archive} holds no lm1b shards ({TRAIN_DIR}/..., {HELDOUT_DIR}/...)")
    (tmp / _EXTRACTED).write_text(
        json.dumps({"archive": archive.name, "files": extracted}, indent=1) + "\n",
        encoding="utf-8",
    )
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def _extraction_dir(cache: Path, sha256: str) -> Path:
    return Path(cache) / f"lm1b-{sha256.lower()[:12]}"


def _no_network_message(url: str, error: Exception) -> str:
    return (
        f"cannot download the lm1b archive ({error}) and no --source was given. Provide a local"
        f" copy with --source DIR (make: LM1B_DIR=DIR): the archive {url} (1.8 GB, sha256"
        f" {OFFICIAL_SHA256} for the official one), the folder it extracts to, or a flat folder"
        " of shard files"
    )


def fetch_archive(
    url: str, size: int | None, sha256: str, cache: Path, progress: bool = True
) -> Path:
    """The folder of extracted shards for the archive with this sha256: found in `cache`, or
    downloaded (resumably) into `cache` and extracted."""
    dest = _extraction_dir(cache, sha256)
    if (dest / _EXTRACTED).is_file():
        return dest
    name = PurePosixPath(url.split("?", 1)[0]).name or "lm1b.tar.gz"
    try:
        archive = download(url, Path(cache) / name, size=size, sha256=sha256, progress=progress)
    except NetworkUnavailable as error:
        raise NetworkUnavailable(_no_network_message(url, error)) from error
    return extract_archive(archive, dest, progress)


def _archive_source(archive: Path, size: int | None, sha256: str, cache: Path, progress: bool):
    """The extraction of a local archive: reused if one exists for this sha256 (the archive's
    size is still checked), else made after verifying the archive."""
    dest = _extraction_dir(cache, sha256)
    extracted = (dest / _EXTRACTED).is_file()
    try:
        verify_file(archive, size, None if extracted else sha256, progress=progress)
    except ChecksumError as error:  # the user's file, not a download: bad input
        raise PrepareError(str(error)) from error
    if not extracted:
        extract_archive(archive, dest, progress)
    return dest


def _list_files(root: Path, folders: tuple[str, ...]) -> dict[str, Path]:
    files = {}
    for folder in folders:
        base = root / folder if folder else root
        if base.is_dir():
            for path in base.iterdir():
                if path.is_file() and not path.name.startswith("."):
                    files[path.relative_to(root).as_posix()] = path
    return dict(sorted(files.items()))


def find_source(
    source: Path | None,
    *,
    url: str = OFFICIAL_URL,
    size: int | None = OFFICIAL_SIZE,
    sha256: str = OFFICIAL_SHA256,
    cache: Path = Path("data/downloads"),
    progress: bool = True,
) -> Source:
    """Locate (downloading or extracting if needed) the shard files; see the module docstring."""
    origin = None
    if source is None:
        root = fetch_archive(url, size, sha256, cache, progress)
        origin = url
    else:
        source = Path(source)
        if not source.exists():
            raise PrepareError(f"--source {source} does not exist")
        if source.is_file():
            if not source.name.endswith((".tar.gz", ".tgz", ".tar")):
                raise PrepareError(
                    f"--source {source} is a file but not a .tar.gz archive; give the archive or"
                    " the folder holding the shard files"
                )
            root, origin = _archive_source(source, size, sha256, cache, progress), str(source)
        elif (source / ARCHIVE_TOP).is_dir():
            root = source / ARCHIVE_TOP
        elif (source / (ARCHIVE_TOP + ".tar.gz")).is_file() and not (
            (source / TRAIN_DIR).is_dir() or (source / HELDOUT_DIR).is_dir()
        ):
            archive = source / (ARCHIVE_TOP + ".tar.gz")
            root, origin = _archive_source(archive, size, sha256, cache, progress), str(archive)
        else:
            root = source
    if (root / TRAIN_DIR).is_dir() or (root / HELDOUT_DIR).is_dir():
        layout, files = "official", _list_files(root, (TRAIN_DIR, HELDOUT_DIR))
    else:
        layout, files = "flat", _list_files(root, ("",))
    if not files:
        raise PrepareError(f"no shard files found in {root}")
    return Source(root, layout, files, origin or str(root))


# --------------------------------------------------------------------------- splits


@dataclass
class SplitPlan:
    """Which files feed which split, and how many final training sentences become `valid`."""

    files: dict[str, list[str]] = field(default_factory=dict)  # split -> relative paths
    valid_sentences: int | None = None  # carve this many from the end of train


def _matches(rel: str, pattern: str) -> bool:
    name = rel if "/" in pattern else rel.rsplit("/", 1)[-1]
    return fnmatch.fnmatchcase(name, pattern)


def select(source: Source, patterns: list[str], what: str) -> list[str]:
    """The files (relative paths, sorted) matching any pattern; each pattern must match."""
    chosen = set()
    for pattern in patterns:
        found = [rel for rel in source.files if _matches(rel, pattern)]
        if not found:
            names = ", ".join(list(source.files)[:8]) + (", ..." if len(source.files) > 8 else "")
            raise PrepareError(
                f"{what} pattern {pattern!r} matches no file in {source.root}: {names}"
            )
        chosen.update(found)
    return sorted(chosen)


def plan_splits(
    source: Source,
    train: list[str] | None = None,
    valid: list[str] | None = None,
    test: list[str] | None = None,
    valid_sentences: int | None = None,
) -> SplitPlan:
    """Apply the split defaults of the module docstring to the source's files."""
    if valid is not None and valid_sentences is not None:
        raise PrepareError("give either --valid (a shard) or --valid-sentences (carved), not both")
    if valid_sentences is not None and valid_sentences < 1:
        raise PrepareError(f"--valid-sentences must be >= 1, got {valid_sentences}")
    plan = SplitPlan()
    plan.files["test"] = select(source, test or [TEST_SHARD], "--test")
    if valid is not None:
        plan.files["valid"] = select(source, valid, "--valid")
    elif valid_sentences is None and any(_matches(rel, VALID_SHARD) for rel in source.files):
        plan.files["valid"] = select(source, [VALID_SHARD], "--valid")
    else:
        plan.valid_sentences = valid_sentences or DEFAULT_VALID_SENTENCES
    if train is not None:
        plan.files["train"] = select(source, train, "--train")
    elif any(_matches(rel, TRAIN_PATTERN) for rel in source.files):
        plan.files["train"] = select(source, [TRAIN_PATTERN], "--train")
    else:  # a folder of held-out shards only: train on those not used for test or valid
        taken = set(plan.files["test"]) | set(plan.files.get("valid", []))
        rest = [rel for rel in source.files if _matches(rel, HELDOUT_PATTERN) and rel not in taken]
        if not rest:
            raise PrepareError(
                f"no training files in {source.root}: no {TRAIN_PATTERN} shards and no other"
                f" {HELDOUT_PATTERN} files; choose them with --train"
            )
        plan.files["train"] = rest
    seen: dict[str, str] = {}
    for split in SPLITS:
        for rel in plan.files.get(split, []):
            if rel in seen:
                raise PrepareError(f"{rel} is selected for both {seen[rel]} and {split}")
            seen[rel] = split
    return plan


# --------------------------------------------------------------------------- reading


def _lines(path: Path, bar: tqdm) -> Iterator[tuple[list[str], bool]]:
    """(words, whether invalid UTF-8 was replaced) for every line of a file, streamed."""
    pending = 0
    with open(path, "rb") as f:
        for raw in f:
            pending += len(raw)
            if pending >= _BLOCK:
                bar.update(pending)
                pending = 0
            try:
                yield raw.decode("utf-8").split(), False
            except UnicodeDecodeError:
                yield raw.decode("utf-8", errors="replace").split(), True
    bar.update(pending)


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not progress
    )


def count_training_words(
    paths: list[Path], carve: int | None, progress: bool = True
) -> tuple[Counter, int]:
    """Word counts of the training sentences and their number, the last `carve` sentences
    (the carved validation set) excluded. Memory: the counts plus `carve` sentences."""
    counts: Counter = Counter()
    tail: deque | None = deque(maxlen=carve) if carve else None
    sentences = 0
    with _bar(sum(p.stat().st_size for p in paths), "count words", progress) as bar:
        for path in paths:
            for words, _ in _lines(path, bar):
                if words:
                    counts.update(words)
                    sentences += 1
                    if tail is not None:
                        tail.append(words)
    if carve:
        if sentences <= carve:
            raise PrepareError(
                f"cannot carve {carve:,} validation sentences out of {sentences:,} training"
                " sentences; lower --valid-sentences or give a --valid shard"
            )
        for words in tail:
            counts.subtract(words)
        sentences -= carve
    return counts, sentences


# --------------------------------------------------------------------------- prepare


def _names(src: Source, rels: list[str]) -> str:
    """The files of a split, for a message."""
    return ", ".join(str(src.files[rel]) for rel in rels)


def _write_latest(out: Path, folder: Path) -> None:
    latest = out / "lm1b-latest"
    text = folder.name + "\n"
    if not latest.is_file() or latest.read_text(encoding="utf-8") != text:
        write_text_atomic(latest, text)


def prepare_lm1b(
    out: Path,
    source: Path | None = None,
    *,
    train: list[str] | None = None,
    valid: list[str] | None = None,
    test: list[str] | None = None,
    valid_sentences: int | None = None,
    min_count: int = 3,
    max_vocab: int | None = None,
    url: str = OFFICIAL_URL,
    size: int | None = OFFICIAL_SIZE,
    sha256: str = OFFICIAL_SHA256,
    cache: Path = Path("data/downloads"),
    progress: bool = True,
) -> Path:
    """Build (or find up to date) `out/lm1b-<recipe_id>/` and return its path."""
    if min_count < 1:
        raise PrepareError(f"--min-count must be >= 1, got {min_count}")
    if max_vocab is not None and max_vocab <= 3:
        raise PrepareError(f"--max-vocab must be > 3 (the three specials), got {max_vocab}")
    if not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise PrepareError(f"--sha256 must be 64 hex digits, got {sha256!r}")
    src = find_source(source, url=url, size=size, sha256=sha256, cache=cache, progress=progress)
    plan = plan_splits(src, train, valid, test, valid_sentences)
    for split, rels in plan.files.items():
        # An empty split would be written as an empty .bin that training cannot read.
        if all(src.files[rel].stat().st_size == 0 for rel in rels):
            raise PrepareError(f"the {split} split is empty: {_names(src, rels)} hold no text")
    carve = plan.valid_sentences

    def describe(rels: list[str]) -> list[dict]:
        return [
            {"name": rel.rsplit("/", 1)[-1], "bytes": src.files[rel].stat().st_size} for rel in rels
        ]

    recipe = {
        "tokenizer": TOKENIZER,
        "min_count": min_count,
        "max_vocab": max_vocab,
        "empty_lines": "skipped",
        "valid_sentences_from_train": carve,
        "sources": {split: describe(plan.files.get(split, [])) for split in SPLITS},
    }
    rid = recipe_id(recipe)
    out = Path(out)
    folder = out / f"lm1b-{rid}"
    if is_prepared(folder, rid):
        print(f"up to date: {folder}", file=sys.stderr)
        _write_latest(out, folder)
        return folder

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"lm1b-{rid}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run of the same recipe
    tmp.mkdir()
    try:
        _build(tmp, src, plan, recipe, rid, min_count, max_vocab, progress)
        shutil.rmtree(folder, ignore_errors=True)  # an incomplete or damaged earlier copy
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_latest(out, folder)
    return folder


def _build(
    tmp: Path,
    src: Source,
    plan: SplitPlan,
    recipe: dict,
    rid: str,
    min_count: int,
    max_vocab: int | None,
    progress: bool,
) -> None:
    carve = plan.valid_sentences
    paths = {split: [src.files[rel] for rel in rels] for split, rels in plan.files.items()}
    counts, n_train = count_training_words(paths["train"], carve, progress)
    vocab = Vocabulary.from_counts(counts, min_count=min_count, max_size=max_vocab)
    del counts
    print(f"lm1b: vocabulary {len(vocab):,} words (min count {min_count})", file=sys.stderr)
    dtype = token_dtype(len(vocab))
    unk = vocab.unk_id
    index = {**vocab.index, BOS: unk, EOS: unk}  # markers in the text are not markers
    get = index.get

    writers = {split: SplitWriter(tmp / f"{split}.bin", dtype, vocab.eos_id) for split in SPLITS}
    stats = {split: Counter() for split in SPLITS}
    sources: dict[str, list[str]] = {split: [] for split in SPLITS}
    total = sum(p.stat().st_size for ps in paths.values() for p in ps)
    try:
        with _bar(total, "binarize", progress) as bar:
            for split in ("train", "valid", "test"):
                seen = 0  # training sentences so far (the carved ones come last)
                for path in paths.get(split, []):
                    file_stats: Counter = Counter()
                    for words, replaced in _lines(path, bar):
                        target = (
                            "valid" if carve and split == "train" and seen >= n_train else split
                        )
                        split_stats = stats[target]
                        if replaced:
                            split_stats["replaced_lines"] += 1
                            file_stats["replaced_lines"] += 1
                        if not words:
                            split_stats["empty_lines"] += 1
                            file_stats["empty_lines"] += 1
                            continue
                        ids = [get(word, unk) for word in words]
                        split_stats["unk_tokens"] += ids.count(unk)
                        writers[target].add(ids)
                        seen += 1
                        if not sources[target] or sources[target][-1] != path.name:
                            sources[target].append(path.name)
                    _report(path, file_stats)
        entries = {split: writers[split].close() for split in SPLITS}
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    for split, entry in entries.items():
        if entry["tokens"] == 0:  # files of blank lines only, which are skipped
            raise PrepareError(
                f"the {split} split has no sentences: {_names(src, plan.files[split])} hold"
                " only empty lines"
            )
    for split, entry in entries.items():
        entry["sources"] = sources[split]
        for key in ("replaced_lines", "empty_lines", "unk_tokens"):
            entry[key] = stats[split][key]
        if split == "valid" and carve:
            entry["carved_from_train"] = carve
    vocab_sha = vocab.save(tmp / "vocab.txt")
    write_meta(
        tmp,
        {
            "dataset": "lm1b",
            "recipe": recipe,
            "recipe_id": rid,
            "source": {"origin": src.origin, "layout": src.layout, "root": str(src.root)},
            "vocab": {
                "file": "vocab.txt",
                "size": len(vocab),
                "sha256": vocab_sha,
                "min_count": min_count,
                "max_size": max_vocab,
            },
            "dtype": dtype.name,
            "splits": entries,
        },
    )
    print(
        "lm1b: "
        + ", ".join(
            f"{split} {e['sentences']:,} sentences / {e['tokens']:,} tokens"
            f" ({e['unk_tokens']:,} <UNK>)"
            for split, e in entries.items()
        ),
        file=sys.stderr,
    )


def _report(path: Path, file_stats: Counter) -> None:
    if file_stats["replaced_lines"]:
        print(
            f"warning: {path}: {file_stats['replaced_lines']:,} lines with invalid UTF-8"
            " (bytes replaced by U+FFFD)",
            file=sys.stderr,
        )
    if file_stats["empty_lines"]:
        print(f"note: {path}: {file_stats['empty_lines']:,} empty lines skipped", file=sys.stderr)


# --------------------------------------------------------------------------- command line


def _sha256_arg(value: str) -> str:
    if not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raise argparse.ArgumentTypeError(f"expected 64 hex digits, got {value!r}")
    return value.lower()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.lm1b",
        description="Prepare the One Billion Word benchmark (lm1b): download or read the shards,"
        " build the vocabulary and write OUT/lm1b-<recipe_id>/ (vocab.txt, train/valid/test.bin,"
        " meta.json). The folder's path is printed as the only line on stdout, and also written"
        " to the text file OUT/lm1b-latest (the folder name). A folder that is already complete"
        " for the same recipe is left alone ('up to date'). Without --source the official"
        " archive is downloaded into --cache (resuming a partial download, verifying size and"
        " sha256; an archive that fails verification is kept as <cache>/<name>.corrupt and"
        " the next run downloads afresh); without network it fails at once and says how to"
        " give a local copy. Exit status 0 on success; otherwise a one-line 'error: ...' on"
        " stderr and 2 for bad input (options, missing or empty files, a --source archive"
        " that fails verification), 1 when the download fails.",
        epilog="Examples: `python -m data_prep.lm1b --out data` (official data, downloaded);"
        " `python -m data_prep.lm1b --out data --source path/to/lm1b-sample"
        " --train 'news.en.heldout-0001*' --valid-sentences 2000` (held-out shards 10-13 for"
        " training, their last 2,000 sentences for validation, shard 0 for test).",
    )
    parser.add_argument("--out", type=Path, required=True, help="parent folder of the dataset")
    parser.add_argument(
        "--source",
        type=Path,
        default=None,
        help="a local copy instead of downloading: the official .tar.gz; a folder with the"
        f" official layout ({TRAIN_DIR}/, {HELDOUT_DIR}/, possibly inside {ARCHIVE_TOP}/); a"
        " folder holding the .tar.gz; or a flat folder of shard files (its top-level files)",
    )
    parser.add_argument(
        "--train",
        nargs="+",
        metavar="GLOB",
        help=f"training files: patterns matched against file names (against the path relative"
        f" to the source if a pattern has a '/'). Default: '{TRAIN_PATTERN}'; if the source has"
        f" none, every '{HELDOUT_PATTERN}' file not used for test or validation",
    )
    parser.add_argument(
        "--valid",
        nargs="+",
        metavar="GLOB",
        help=f"validation files. Default: '{VALID_SHARD}' if present, otherwise the last"
        f" --valid-sentences training sentences",
    )
    parser.add_argument(
        "--test", nargs="+", metavar="GLOB", help=f"test files (default: '{TEST_SHARD}')"
    )
    parser.add_argument(
        "--valid-sentences",
        type=int,
        default=None,
        metavar="N",
        help="carve the last N sentences of the training stream out as the validation split"
        " (not counted for the vocabulary, not in train.bin) instead of using a validation"
        f" shard; the default when no validation shard is found, with N={DEFAULT_VALID_SENTENCES}",
    )
    parser.add_argument(
        "--min-count",
        type=int,
        default=3,
        help="vocabulary: training words seen at least this often (default 3, the benchmark's"
        " 793,471-entry vocabulary)",
    )
    parser.add_argument(
        "--max-vocab",
        type=int,
        default=None,
        help="at most this many vocabulary entries, the specials <S> </S> <UNK> included, most"
        " frequent words first (default: no limit)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path("data/downloads"),
        help="where the archive is downloaded (resumable, as <name>.part) and its shards extracted"
        " (into lm1b-<sha256[:12]>/, reused by later runs); default data/downloads",
    )
    parser.add_argument("--url", default=OFFICIAL_URL, help=f"archive URL (default {OFFICIAL_URL})")
    parser.add_argument(
        "--size",
        type=int,
        default=OFFICIAL_SIZE,
        help="expected archive size in bytes, checked for a download or a --source archive"
        f" (default {OFFICIAL_SIZE})",
    )
    parser.add_argument(
        "--sha256",
        type=_sha256_arg,
        default=OFFICIAL_SHA256,
        help=f"expected archive sha256 (default {OFFICIAL_SHA256})",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bars (they go to stderr)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        folder = prepare_lm1b(
            args.out,
            args.source,
            train=args.train,
            valid=args.valid,
            test=args.test,
            valid_sentences=args.valid_sentences,
            min_count=args.min_count,
            max_vocab=args.max_vocab,
            url=args.url,
            size=args.size,
            sha256=args.sha256,
            cache=args.cache,
            progress=not args.no_progress,
        )
    except (PrepareError, ValueError, *PATH_ERRORS) as error:  # bad input
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (DownloadError, OSError) as error:  # the download failed, or the disk did
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
