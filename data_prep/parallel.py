"""Any sentence-aligned parallel corpus, binarized in the parallel format of lstm_moe.pairs.

Command: `python -m data_prep.parallel --train-prefix P --valid-prefix P --test-prefix P
--src en --tgt de --out data [--name NAME] [options]` (see `--help`). A prefix P stands for the
files `P.<src>` and `P.<tgt>` (or `P.<lang>.gz`); a split given several prefixes is their
concatenation, in order.

Reading. Line i of a source file is the translation of line i of its target file. Lines end at
b"\\n" only: never at a carriage return or a Unicode line separator, which web-crawled corpora
hold inside lines and which would shift the alignment if they ended one. A final "\\r" (a CRLF
line ending) is dropped. Bytes that are not UTF-8 become U+FFFD (such lines are counted). A
first streaming pass counts the lines of every file, so two files of a pair with different
counts are refused, in one line naming both files and both counts, before anything is written.

Text. Each side is normalised for its language before the vocabulary is built and before it is
encoded: sacremoses' MosesPunctNormalizer(lang) (Moses normalize-punctuation.perl), then every
non-printing character (Unicode category C) replaced by a space as Moses
remove-non-printing-char.perl does, then whitespace collapsed: the usual first steps of WMT
preparations (fairseq's prepare-wmt14en2de.sh runs the same two Moses scripts). The untouched
text of the evaluation splits is kept as `<split>.<lang>`: BLEU is scored against untouched
references, and a translation is detokenised sentencepiece output.

Vocabulary: one sentencepiece model of both languages (data_prep.wordpieces: BPE by default,
32,000 pieces as in the paper), trained on at most `vocab_sentences` training pairs, drawn
without replacement by a seeded generator (the same pairs on every run) and streamed to a
temporary file inside the dataset folder. Characters outside the vocabulary encode as UNK;
meta.json counts UNK tokens per split and side.

Filtering, of the training split only (valid and test are scored: every pair stays):
  * `empty`: either side is empty after normalisation;
  * `too_long`: either side has more than `max_tokens_per_sentence` wordpieces (EOS not
    counted), 250 by default;
  * `ratio`: the longer side has more than `max_ratio` times the wordpieces of the shorter one,
    1.5 by default.
A pair is counted under the first reason that applies. The defaults are those of fairseq's
WMT'14 recipes (examples/translation/prepare-wmt14en2de.sh), which run Moses
clean-corpus-n.perl with `-ratio 1.5` and lengths 1 to 250 on BPE tokens, the common practice
for subword units; clean-corpus-n's own default ratio, 9, is a loose bound set for words. In
the evaluation splits an empty line stays a pair (an empty side is just EOS) and over-long
pairs are kept, their number reported (`long_pairs`).

Output. The folder `OUT/<name>-<src>-<tgt>-<recipe_id>/` (lstm_moe.pairs lists its files), built
in `<folder>.tmp/` and renamed when complete; within it, the binary files are written under
temporary names and renamed, and meta.json is written last. The recipe holds every option that
affects the output and the name and size of every input file, so a changed recipe gets a new
folder and a complete folder of the same recipe is reused at once ("up to date"). The folder is
the last line on stdout; messages and progress bars go to stderr. A bad input or option is one
`error: ...` line and exit status 2; a failing disk is exit 1.

Memory. Nothing holds a corpus: lines are streamed in batches of `_BATCH` pairs, and the
vocabulary sample is written to disk as it is drawn (only the sorted indices of the sampled
pairs are held). Sentencepiece's training holds its sample in memory, which `vocab_sentences`
bounds: training 32,000 pieces on 141,000 sentences (21 MB) peaked at 139 MB (measured).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import multiprocessing
import re
import shutil
import sys
import unicodedata
import zlib
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import BinaryIO

import numpy as np
from sacremoses import MosesPunctNormalizer
from tqdm import tqdm

from data_prep.binarize import SplitWriter, file_sha256, recipe_id, token_dtype
from data_prep.wordpieces import (
    MODEL_FILE,
    MODEL_TYPES,
    VOCAB_FILE,
    VocabularyError,
    WordpieceConfig,
    load,
    train_wordpieces,
)
from lstm_moe.files import (
    BOS_ID,
    EOS_ID,
    PARALLEL_FORMAT,
    PATH_ERRORS,
    UNK_ID,
    read_meta,
    write_json_atomic,
)

SPLITS = ("train", "valid", "test")
EVAL_SPLITS = ("valid", "test")
SIDES = ("src", "tgt")
REMOVE_REASONS = ("empty", "too_long", "ratio")
TOKENIZER = "moses-punct+nonprint+spm/1"  # bump when reading or normalisation changes
_BATCH = 4096  # pairs normalised and encoded together
_BLOCK = 1 << 20  # bytes per read when counting lines
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_LANG = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


class PrepareError(ValueError):
    """An expected failure caused by the input or an option: one line, exit status 2."""


@dataclass(frozen=True)
class FilePair:
    """A source file and its line-aligned target file (plain text, or gzipped if `.gz`)."""

    src: Path
    tgt: Path


Corpus = dict[str, list[FilePair]]  # split -> its file pairs, concatenated in order


@dataclass(frozen=True)
class ParallelConfig:
    name: str
    src_lang: str
    tgt_lang: str
    wordpieces: WordpieceConfig = field(default_factory=WordpieceConfig)
    vocab_sentences: int = 1_000_000  # training pairs sampled for the vocabulary
    seed: int = 1  # of that sample
    max_tokens_per_sentence: int = 250
    max_ratio: float = 1.5
    max_train_pairs: int | None = None  # read only the first N training pairs

    def __post_init__(self) -> None:
        checks = [
            (_NAME.fullmatch(self.name), f"name must be letters, digits, '.', '_' or '-', got"
             f" {self.name!r}"),
            (_LANG.fullmatch(self.src_lang) and _LANG.fullmatch(self.tgt_lang),
             f"language codes must be letters, digits, '_' or '-', got {self.src_lang!r},"
             f" {self.tgt_lang!r}"),
            (self.src_lang != self.tgt_lang, f"--src and --tgt are both {self.src_lang!r}"),
            (self.vocab_sentences >= 1, f"--vocab-sentences must be >= 1, got"
             f" {self.vocab_sentences}"),
            (self.max_tokens_per_sentence >= 1, "--max-tokens-per-sentence must be >= 1, got"
             f" {self.max_tokens_per_sentence}"),
            (self.max_ratio >= 1, f"--max-ratio must be >= 1, got {self.max_ratio}"),
            (self.max_train_pairs is None or self.max_train_pairs >= 1,
             f"--max-train-pairs must be >= 1, got {self.max_train_pairs}"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise PrepareError(message)

    def folder_name(self, rid: str) -> str:
        return f"{self.name}-{self.src_lang}-{self.tgt_lang}-{rid}"


# --------------------------------------------------------------------------- reading


def prefix_pair(prefix: Path | str, src_lang: str, tgt_lang: str) -> FilePair:
    """The files `<prefix>.<lang>` of both languages (`<prefix>.<lang>.gz` when only that
    exists); missing files are a PrepareError."""
    paths = []
    for lang in (src_lang, tgt_lang):
        plain = Path(f"{prefix}.{lang}")
        gzipped = Path(f"{plain}.gz")
        path = plain if plain.is_file() or not gzipped.is_file() else gzipped
        if not path.is_file():
            raise PrepareError(f"{plain} not found (prefix {prefix}, language {lang})")
        paths.append(path)
    return FilePair(*paths)


def _open(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def count_lines(path: Path) -> int:
    """Lines of a file as `raw_lines` yields them: its b"\\n" count, plus one for a last line
    without a newline."""
    n, last = 0, b"\n"
    try:
        with _open(path) as f:
            while block := f.read(_BLOCK):
                n += block.count(b"\n")
                last = block[-1:]
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:  # read fully here first
        raise PrepareError(f"{path} is not a complete gzip file ({error})") from None
    return n + (last != b"\n")


def raw_lines(path: Path) -> Iterator[bytes]:
    """The lines of a file as bytes, without their b"\\n" (or b"\\r\\n"), streamed."""
    with _open(path) as f:
        for line in f:
            if line.endswith(b"\n"):
                line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
            yield line


def decode(line: bytes, stats: Counter, side: str) -> str:
    """UTF-8 text of a line; invalid bytes become U+FFFD and count in stats[side]."""
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        stats[side] += 1
        return line.decode("utf-8", errors="replace")


def check_alignment(corpus: Corpus) -> dict[str, list[int]]:
    """The line count of every file pair of every split (streamed); a pair whose files differ
    is a PrepareError naming both files and both counts."""
    counts: dict[str, list[int]] = {}
    for split, pairs in corpus.items():
        counts[split] = []
        for pair in pairs:
            n_src, n_tgt = count_lines(pair.src), count_lines(pair.tgt)
            if n_src != n_tgt:
                raise PrepareError(
                    f"{pair.src} has {n_src:,} lines but {pair.tgt} has {n_tgt:,}: the two files"
                    " of a pair must be line-aligned"
                )
            counts[split].append(n_src)
        if sum(counts[split]) == 0:
            names = ", ".join(f"{p.src} / {p.tgt}" for p in pairs)
            raise PrepareError(f"the {split} split is empty: {names} hold no lines")
    return counts


def pair_lines(pairs: list[FilePair], limit: int | None = None) -> Iterator[tuple[bytes, bytes]]:
    """The (source, target) lines of the file pairs in order, at most `limit` of them."""
    seen = 0
    for pair in pairs:
        sources, targets = raw_lines(pair.src), raw_lines(pair.tgt)
        try:
            while limit is None or seen < limit:
                src, tgt = next(sources, None), next(targets, None)
                if src is None and tgt is None:
                    break
                if src is None or tgt is None:  # counted equal, so a file changed meanwhile
                    raise PrepareError(f"{pair.src} or {pair.tgt} changed while being read")
                seen += 1
                yield src, tgt
        finally:  # close both files now, also when the caller stops early
            sources.close()
            targets.close()


class Normalizer:
    """One language's normalisation (see the module docstring): Moses punctuation rules,
    non-printing characters to spaces, whitespace collapsed.

    The rules are sacremoses' MosesPunctNormalizer(lang).substitutions, applied in order as its
    normalize() does, but with the patterns compiled once: the same text, half again as fast."""

    def __init__(self, lang: str):
        moses = MosesPunctNormalizer(lang=lang)
        self.rules = [(re.compile(pattern), repl) for pattern, repl in moses.substitutions]

    def __call__(self, line: str) -> str:
        text = line
        for pattern, repl in self.rules:
            text = pattern.sub(repl, text)
        if not text.isprintable():  # rare: spaces, which isprintable rejects too, or category C
            text = "".join(" " if unicodedata.category(c)[0] == "C" else c for c in text)
        return " ".join(text.split())


class PairWriter:
    """Streams the pairs of one split into `<split>.src.bin`, `<split>.tgt.bin` and the offset
    table `<split>.idx` (int64 [pairs + 1, 2]), each under a temporary name until `close()`."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype):
        self.split = split
        self.src = SplitWriter(folder / f"{split}.src.bin", dtype, EOS_ID)
        self.tgt = SplitWriter(folder / f"{split}.tgt.bin", dtype, EOS_ID)
        self.index = folder / f"{split}.idx"
        self.index_tmp = self.index.with_name(self.index.name + ".tmp")
        self.index_file = open(self.index_tmp, "wb")  # noqa: SIM115 (closed in close())
        self.index_sha = hashlib.sha256()
        self.offsets: list[tuple[int, int]] = [(0, 0)]  # row 0

    @property
    def pairs(self) -> int:
        return self.src.sentences

    def add(self, src_ids: list[int], tgt_ids: list[int]) -> None:
        """One pair's ids, without EOS (the writers append it)."""
        self.src.add(src_ids)
        self.tgt.add(tgt_ids)
        self.offsets.append((self.src.tokens, self.tgt.tokens))
        if len(self.offsets) >= _BATCH:
            self._flush()

    def _flush(self) -> None:
        data = np.asarray(self.offsets, dtype=np.int64).tobytes()  # [n, 2]
        self.index_file.write(data)
        self.index_sha.update(data)
        self.offsets.clear()

    def close(self) -> dict:
        self._flush()
        self.index_file.close()
        src, tgt = self.src.close(), self.tgt.close()
        self.index_tmp.replace(self.index)
        return {
            "pairs": self.pairs,
            "src_tokens": src["tokens"],
            "tgt_tokens": tgt["tokens"],
            "files": {"src": src["file"], "tgt": tgt["file"], "index": self.index.name},
            "sha256": {
                "src": src["sha256"],
                "tgt": tgt["sha256"],
                "index": self.index_sha.hexdigest(),
            },
        }

    def abort(self) -> None:
        self.src.abort()
        self.tgt.abort()
        self.index_file.close()
        self.index_tmp.unlink(missing_ok=True)


class TextWriter:
    """One line per sentence into `path`, under a temporary name until `close()`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.file = open(self.tmp, "w", encoding="utf-8", newline="\n")  # noqa: SIM115

    def add(self, line: str) -> None:
        self.file.write(line + "\n")

    def close(self) -> str:
        self.file.close()
        self.tmp.replace(self.path)
        return self.path.name

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- the vocabulary


def write_vocab_sample(
    pairs: list[FilePair],
    n_pairs: int,
    config: ParallelConfig,
    normalizers: tuple[Normalizer, Normalizer],
    path: Path,
    progress: bool,
) -> dict:
    """Write the normalised sides of `config.vocab_sentences` training pairs, drawn without
    replacement with `config.seed`, to `path` (one sentence per line, empty ones left out).
    Returns the counts for meta.json."""
    k = min(config.vocab_sentences, n_pairs)
    rng = np.random.default_rng(config.seed)
    chosen = np.arange(n_pairs) if k == n_pairs else np.sort(rng.choice(n_pairs, k, replace=False))
    chosen_list = chosen.tolist()
    del chosen
    written = Counter()
    stats: Counter = Counter()  # invalid UTF-8, counted again when encoding
    nxt = 0
    with (
        open(path, "w", encoding="utf-8", newline="\n") as out,
        tqdm(total=n_pairs, unit=" pairs", desc="vocabulary sample", disable=not progress) as bar,
    ):
        for i, (src, tgt) in enumerate(pair_lines(pairs, n_pairs)):
            if i % _BATCH == 0:
                bar.update(min(_BATCH, n_pairs - i))
            if nxt == k:
                break
            if i != chosen_list[nxt]:
                continue
            nxt += 1
            for side, raw, normalize in zip(SIDES, (src, tgt), normalizers, strict=True):
                text = normalize(decode(raw, stats, side))
                if text:
                    out.write(text + "\n")
                    written[side] += 1
    if not written:
        raise PrepareError("the training text is empty after normalisation: no vocabulary")
    return {"sampled_pairs": k, "of_pairs": n_pairs, "sentences": dict(written)}


# --------------------------------------------------------------------------- encoding


def _filter_reason(n_src: int, n_tgt: int, config: ParallelConfig) -> str | None:
    """Why a training pair of these wordpiece lengths is removed (None: kept)."""
    if n_src == 0 or n_tgt == 0:
        return "empty"
    if max(n_src, n_tgt) > config.max_tokens_per_sentence:
        return "too_long"
    if max(n_src, n_tgt) > config.max_ratio * min(n_src, n_tgt):
        return "ratio"
    return None


Columns = tuple[list[str], list[str]]  # a batch of pairs: the source lines, the target lines
Encoded = tuple[list[list[int]], list[list[int]]]  # their wordpiece ids, without EOS


class Encoder:
    """Normalises and encodes batches of pairs, in this process or in a worker."""

    def __init__(self, model: Path, src_lang: str, tgt_lang: str):
        self.normalizers = (Normalizer(src_lang), Normalizer(tgt_lang))
        self.processor = load(model)

    def __call__(self, columns: Columns) -> Encoded:
        src, tgt = (
            self.processor.encode([normalize(text) for text in column], out_type=int)
            for normalize, column in zip(self.normalizers, columns, strict=True)
        )
        return src, tgt


_worker_encoder: Encoder | None = None  # each worker process's own


def _start_worker(model: Path, src_lang: str, tgt_lang: str) -> None:
    global _worker_encoder
    _worker_encoder = Encoder(model, src_lang, tgt_lang)


def _encode_in_worker(columns: Columns) -> Encoded:
    return _worker_encoder(columns)


class Encoding:
    """Encodes a stream of batches in order, with `workers` processes (1: in this one).

    At most two batches per worker are in flight, so memory stays bounded however long the
    stream; the output is the same whatever the number of workers."""

    def __init__(self, model: Path, config: ParallelConfig, workers: int):
        self.pool = None
        if workers > 1:
            context = multiprocessing.get_context("spawn")  # no fork of a threaded process
            args = (model, config.src_lang, config.tgt_lang)
            self.pool = context.Pool(workers, initializer=_start_worker, initargs=args)
            self.depth = 2 * workers
        else:
            self.encoder = Encoder(model, config.src_lang, config.tgt_lang)

    def __call__(self, batches: Iterator[Columns]) -> Iterator[tuple[Columns, Encoded]]:
        if self.pool is None:
            for columns in batches:
                yield columns, self.encoder(columns)
            return
        pending: deque = deque()
        for columns in batches:
            pending.append((columns, self.pool.apply_async(_encode_in_worker, (columns,))))
            if len(pending) >= self.depth:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _batches(pairs: list[FilePair], n_pairs: int, invalid: Counter, bar: tqdm) -> Iterator[Columns]:
    """The decoded lines of the file pairs, `_BATCH` pairs at a time."""
    batch: list[tuple[bytes, bytes]] = []
    for pair in pair_lines(pairs, n_pairs):
        batch.append(pair)
        if len(batch) == _BATCH:
            yield _decode_batch(batch, invalid)
            bar.update(len(batch))
            batch = []
    if batch:
        yield _decode_batch(batch, invalid)
        bar.update(len(batch))


def _decode_batch(batch: list[tuple[bytes, bytes]], invalid: Counter) -> Columns:
    src, tgt = (
        [decode(raw, invalid, side) for raw in column]
        for side, column in zip(SIDES, zip(*batch, strict=True), strict=True)
    )
    return src, tgt


def encode_split(
    folder: Path,
    split: str,
    pairs: list[FilePair],
    n_pairs: int,
    config: ParallelConfig,
    encoding: Encoding,
    dtype: np.dtype,
    progress: bool,
) -> dict:
    """Normalise, encode, filter (train only) and write one split; returns its meta entry."""
    is_eval = split in EVAL_SPLITS
    langs = (config.src_lang, config.tgt_lang)
    writer = PairWriter(folder, split, dtype)
    raw_writers = [TextWriter(folder / f"{split}.{lang}") for lang in langs] if is_eval else []
    removed = Counter({reason: 0 for reason in REMOVE_REASONS}) if not is_eval else Counter()
    invalid, empty, unk = Counter(), Counter(), Counter()
    long_pairs = 0
    try:
        with tqdm(total=n_pairs, unit=" pairs", desc=split, disable=not progress) as bar:
            for texts, encoded in encoding(_batches(pairs, n_pairs, invalid, bar)):
                for raw_writer, column in zip(raw_writers, texts if is_eval else (), strict=True):
                    for line in column:
                        raw_writer.add(line)
                for src_ids, tgt_ids in zip(*encoded, strict=True):
                    n_src, n_tgt = len(src_ids), len(tgt_ids)
                    if is_eval:
                        empty["src"] += n_src == 0
                        empty["tgt"] += n_tgt == 0
                        long_pairs += max(n_src, n_tgt) > config.max_tokens_per_sentence
                    elif (reason := _filter_reason(n_src, n_tgt, config)) is not None:
                        removed[reason] += 1
                        continue
                    unk["src"] += src_ids.count(UNK_ID)
                    unk["tgt"] += tgt_ids.count(UNK_ID)
                    writer.add(src_ids, tgt_ids)
        if writer.pairs == 0:
            raise PrepareError(
                f"the {split} split has no pair left: all {n_pairs:,} were removed"
                f" ({_removed_text(removed)})"
            )
        entry = writer.close()
        if is_eval:
            entry["raw"] = dict(zip(SIDES, (w.close() for w in raw_writers), strict=True))
    except BaseException:
        writer.abort()
        for raw_writer in raw_writers:
            raw_writer.abort()
        raise
    entry["lines"] = n_pairs
    entry["removed"] = dict(removed)
    entry["unk_tokens"] = {side: unk[side] for side in SIDES}
    entry["invalid_utf8_lines"] = {side: invalid[side] for side in SIDES}
    if is_eval:
        entry["empty_lines"] = {side: empty[side] for side in SIDES}
        entry["long_pairs"] = long_pairs
    return entry


def _removed_text(removed: Counter) -> str:
    return ", ".join(f"{reason} {removed[reason]:,}" for reason in REMOVE_REASONS)


# --------------------------------------------------------------------------- the folder


def is_prepared(folder: Path, rid: str) -> bool:
    """Whether `folder` holds a finished parallel dataset of recipe id `rid` whose files have
    the sizes meta.json records (a cheap check: no checksums of the large files)."""
    folder = Path(folder)
    try:
        meta = read_meta(folder, PARALLEL_FORMAT)
        if meta["recipe_id"] != rid:
            return False
        if file_sha256(folder / meta["vocab"]["file"]) != meta["vocab"]["sha256"]:
            return False
        itemsize = np.dtype(meta["dtype"]).itemsize
        for entry in meta["splits"].values():
            files = entry["files"]
            sizes = {
                files["src"]: entry["src_tokens"] * itemsize,
                files["tgt"]: entry["tgt_tokens"] * itemsize,
                files["index"]: (entry["pairs"] + 1) * 16,  # int64 [pairs + 1, 2]
            }
            for name, size in sizes.items():
                if (folder / name).stat().st_size != size:
                    return False
            for name in [*entry.get("raw", {}).values(), *entry.get("extra", {}).values()]:
                if not (folder / name).is_file():
                    return False
    except (OSError, ValueError, KeyError, TypeError):  # missing, unreadable or malformed
        return False
    return True


def _describe(pairs: list[FilePair]) -> list[dict]:
    return [
        {
            "src": p.src.name,
            "src_bytes": p.src.stat().st_size,
            "tgt": p.tgt.name,
            "tgt_bytes": p.tgt.stat().st_size,
        }
        for p in pairs
    ]


def make_recipe(
    config: ParallelConfig,
    corpus: Corpus,
    extra_files: dict[str, dict[str, Path]],
    extra_recipe: dict,
) -> dict:
    fields = dataclasses.asdict(config)
    return {
        "tokenizer": TOKENIZER,
        **fields,
        "sources": {split: _describe(corpus[split]) for split in SPLITS},
        "extra_files": {
            split: {key: {"name": p.name, "bytes": p.stat().st_size} for key, p in files.items()}
            for split, files in extra_files.items()
        },
        **extra_recipe,
    }


def prepare_parallel(
    config: ParallelConfig,
    corpus: Corpus,
    out: Path,
    *,
    extra_files: dict[str, dict[str, Path]] | None = None,
    extra_recipe: dict | None = None,
    extra_meta: dict | None = None,
    workers: int = 1,
    progress: bool = True,
) -> Path:
    """Build (or find up to date) `out/<name>-<src>-<tgt>-<recipe_id>/`; returns its path.

    corpus: the file pairs of each of train, valid and test. extra_files: per evaluation split,
    files with one line per pair (such as each sentence's topic) copied in as
    `<split>.<key>` and listed in meta["splits"][split]["extra"]. extra_recipe: more entries of
    the recipe (what generated the text, say); extra_meta: more entries of meta.json.
    workers: processes that normalise and encode (the output does not depend on it)."""
    extra_files = extra_files or {}
    if set(corpus) != set(SPLITS):
        raise PrepareError(f"a corpus needs the splits {SPLITS}, got {sorted(corpus)}")
    if set(extra_files) - set(EVAL_SPLITS):
        raise PrepareError("extra files are for the evaluation splits only (train is filtered)")
    for split in SPLITS:
        if not corpus[split]:
            raise PrepareError(f"the {split} split has no files")
        for pair in corpus[split]:
            for path in (pair.src, pair.tgt):
                if not Path(path).is_file():
                    raise PrepareError(f"{split} file {path} not found")
    recipe = make_recipe(config, corpus, extra_files, extra_recipe or {})
    rid = recipe_id(recipe)
    out = Path(out)
    folder = out / config.folder_name(rid)
    if is_prepared(folder, rid):
        print(f"up to date: {folder}", file=sys.stderr)
        return folder

    counts = check_alignment(corpus)
    out.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run of the same recipe
    tmp.mkdir()
    try:
        _build(
            tmp,
            config,
            corpus,
            counts,
            recipe=recipe,
            rid=rid,
            extra_files=extra_files,
            extra_meta=extra_meta or {},
            workers=workers,
            progress=progress,
        )
        shutil.rmtree(folder, ignore_errors=True)  # an incomplete or damaged earlier copy
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _build(
    tmp: Path,
    config: ParallelConfig,
    corpus: Corpus,
    counts: dict[str, list[int]],
    *,
    recipe: dict,
    rid: str,
    extra_files: dict[str, dict[str, Path]],
    extra_meta: dict,
    workers: int,
    progress: bool,
) -> None:
    """Write every file of the dataset into `tmp`, meta.json last."""
    normalizers = (Normalizer(config.src_lang), Normalizer(config.tgt_lang))
    n_pairs = {split: sum(counts[split]) for split in SPLITS}
    if config.max_train_pairs is not None:
        n_pairs["train"] = min(n_pairs["train"], config.max_train_pairs)

    sample = tmp / "vocab-sample.txt"
    trained_on = write_vocab_sample(
        corpus["train"], n_pairs["train"], config, normalizers, sample, progress
    )
    model = train_wordpieces(sample, tmp, config.wordpieces)
    sample.unlink()
    vocab_size = load(model).get_piece_size()
    dtype = token_dtype(vocab_size)
    print(
        f"{config.name}: {vocab_size:,} wordpieces ({config.wordpieces.model_type}) from"
        f" {trained_on['sampled_pairs']:,} of {trained_on['of_pairs']:,} training pairs",
        file=sys.stderr,
    )

    splits = {}
    encoding = Encoding(model, config, workers)
    try:
        for split in SPLITS:
            splits[split] = encode_split(
                tmp, split, corpus[split], n_pairs[split], config, encoding, dtype, progress
            )
    finally:
        encoding.close()
    for split in EVAL_SPLITS:
        for key, path in extra_files.get(split, {}).items():
            lines = count_lines(path)
            if lines != splits[split]["pairs"]:
                raise PrepareError(
                    f"{path} has {lines:,} lines but the {split} split has"
                    f" {splits[split]['pairs']:,} pairs: one line per pair is needed"
                )
            name = f"{split}.{key}"
            shutil.copyfile(path, tmp / (name + ".tmp"))
            (tmp / (name + ".tmp")).replace(tmp / name)
            splits[split].setdefault("extra", {})[key] = name
    train = splits["train"]
    print(
        f"train: {train['pairs']:,} of {train['lines']:,} pairs kept; removed"
        f" {_removed_text(Counter(train['removed']))}",
        file=sys.stderr,
    )
    for split in EVAL_SPLITS:
        entry = splits[split]
        print(
            f"{split}: {entry['pairs']:,} pairs, empty lines {entry['empty_lines']['src']:,}"
            f" / {entry['empty_lines']['tgt']:,}, {entry['long_pairs']:,} longer than"
            f" {config.max_tokens_per_sentence} wordpieces (kept)",
            file=sys.stderr,
        )
    for split, entry in splits.items():
        for side in SIDES:
            if entry["invalid_utf8_lines"][side]:
                print(
                    f"warning: {split} {side}: {entry['invalid_utf8_lines'][side]:,} lines with"
                    " invalid UTF-8 (bytes replaced by U+FFFD)",
                    file=sys.stderr,
                )

    meta = {
        "format": PARALLEL_FORMAT,
        "dataset": config.name,
        "src_lang": config.src_lang,
        "tgt_lang": config.tgt_lang,
        "dtype": dtype.name,
        "vocab": {
            "file": MODEL_FILE,
            "size": vocab_size,
            "sha256": file_sha256(model),
            "text": VOCAB_FILE,
            "model_type": config.wordpieces.model_type,
            "character_coverage": config.wordpieces.character_coverage,
            "special_ids": {"bos": BOS_ID, "eos": EOS_ID, "unk": UNK_ID, "pad": None},
            "trained_on": trained_on,
        },
        "splits": splits,
        "sources": {
            split: [[str(p.src.resolve()), str(p.tgt.resolve())] for p in corpus[split]]
            for split in SPLITS
        },
        "versions": {name: version(name) for name in ("sentencepiece", "sacremoses")},
        **extra_meta,
        "recipe": recipe,
        "recipe_id": rid,
    }
    write_json_atomic(tmp / "meta.json", meta)


# --------------------------------------------------------------------------- command line


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ParallelConfig (and workers, progress), shared with data_prep.wmt14."""
    defaults = ParallelConfig("x", "a", "b")
    pieces = defaults.wordpieces
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=pieces.vocab_size,
        help=f"wordpieces of the shared vocabulary, specials included (default {pieces.vocab_size}"
        ", the paper's; a corpus of a few thousand pairs supports only a few thousand)",
    )
    parser.add_argument(
        "--model-type",
        choices=MODEL_TYPES,
        default=pieces.model_type,
        help=f"sentencepiece model (default {pieces.model_type}, the closest to GNMT's wordpieces)",
    )
    parser.add_argument(
        "--character-coverage",
        type=float,
        default=pieces.character_coverage,
        help=f"share of training characters the vocabulary covers (default"
        f" {pieces.character_coverage}); the rest encode as UNK",
    )
    parser.add_argument(
        "--vocab-sentences",
        type=int,
        default=defaults.vocab_sentences,
        metavar="N",
        help="training pairs sampled to train the vocabulary (default"
        f" {defaults.vocab_sentences:,})",
    )
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="seed of that sample (default 1)"
    )
    parser.add_argument(
        "--max-tokens-per-sentence",
        type=int,
        default=defaults.max_tokens_per_sentence,
        help="training pairs with a side longer than this many wordpieces are removed (default"
        f" {defaults.max_tokens_per_sentence}); in valid/test they are kept and counted",
    )
    parser.add_argument(
        "--max-ratio",
        type=float,
        default=defaults.max_ratio,
        help="training pairs whose longer side has more than this times the wordpieces of the"
        f" shorter are removed (default {defaults.max_ratio}, fairseq's WMT'14 recipe)",
    )
    parser.add_argument(
        "--max-train-pairs",
        type=int,
        default=None,
        metavar="N",
        help="read only the first N training pairs (default: all)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes that normalise and encode the text (default 1; the output is the same"
        " for any number)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bars (they go to stderr)"
    )


def config_from_args(args: argparse.Namespace, name: str, src: str, tgt: str) -> ParallelConfig:
    try:
        pieces = WordpieceConfig(args.vocab_size, args.model_type, args.character_coverage)
    except ValueError as error:
        raise PrepareError(str(error)) from None
    return ParallelConfig(
        name=name,
        src_lang=src,
        tgt_lang=tgt,
        wordpieces=pieces,
        vocab_sentences=args.vocab_sentences,
        seed=args.seed,
        max_tokens_per_sentence=args.max_tokens_per_sentence,
        max_ratio=args.max_ratio,
        max_train_pairs=args.max_train_pairs,
    )


def default_name(prefix: Path | str) -> str:
    """The folder name of the training prefix (`multi30k` for ../multi30k/train), made safe."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(prefix).resolve().parent.name).strip("-.")
    return name or "parallel"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.parallel",
        description="Binarize a sentence-aligned parallel corpus into"
        " OUT/<name>-<src>-<tgt>-<recipe_id>/ (the format of lstm_moe.pairs): Moses punctuation"
        " normalisation, one shared sentencepiece vocabulary, length and ratio filters on the"
        " training pairs. A prefix P means the files P.<src> and P.<tgt> (or P.<lang>.gz);"
        " several prefixes are concatenated. The folder is printed as the last line on stdout;"
        " a complete folder of the same recipe is reused ('up to date'). Exit status 2 with"
        " one 'error: ...' line on bad input (a missing file, files of a pair with different"
        " line counts, a vocabulary too large for the corpus).",
        epilog="Example: python -m data_prep.parallel --train-prefix ../shared/data/multi30k/train"
        " --valid-prefix ../shared/data/multi30k/val --test-prefix"
        " ../shared/data/multi30k/test_2016_flickr --src en --tgt de --out data --vocab-size 8000",
    )
    for split in SPLITS:
        parser.add_argument(
            f"--{split}-prefix",
            nargs="+",
            required=True,
            metavar="PREFIX",
            help=f"{split} files: PREFIX.<src> and PREFIX.<tgt>, one pair per prefix",
        )
    parser.add_argument("--src", required=True, help="source language code (file suffix)")
    parser.add_argument("--tgt", required=True, help="target language code (file suffix)")
    parser.add_argument("--out", type=Path, required=True, help="parent folder of the dataset")
    parser.add_argument(
        "--name", default=None, help="dataset name (default: the training prefix's folder name)"
    )
    add_config_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        name = args.name or default_name(args.train_prefix[0])
        config = config_from_args(args, name, args.src, args.tgt)
        corpus = {
            split: [prefix_pair(p, args.src, args.tgt) for p in getattr(args, f"{split}_prefix")]
            for split in SPLITS
        }
        if args.workers < 1:
            raise PrepareError(f"--workers must be >= 1, got {args.workers}")
        folder = prepare_parallel(
            config,
            corpus,
            args.out,
            workers=args.workers,
            progress=not args.no_progress,
        )
    except (PrepareError, VocabularyError, ValueError, *PATH_ERRORS) as error:  # bad input
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the disk failed or is full
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
