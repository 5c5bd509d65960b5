"""Any plain-text corpus laid out as train/valid/test files, binarized in the common format.

One line is one sentence, tokenized on whitespace (`str.split()`: the corpus is expected to be
tokenized already, as WikiText is). The vocabulary comes from the training file alone (words
seen at least `min_count` times, at most `max_vocab` entries with the specials); words of valid
and test outside it become `<UNK>`. A corpus's own unknown-word token (WikiText's `<unk>`) is
just a word. Literal `<S>` or `</S>` in the text also become `<UNK>`, so they cannot fake a
sentence boundary in the stream.

Empty lines. By default an empty (or whitespace-only) line is kept as a sentence with no words,
i.e. a lone `</S>` in the stream: the convention of PyTorch's `word_language_model` behind the
published WikiText perplexities (every line ends with an end-of-sentence token; WikiText-2 has
2,088,628 / 217,646 / 245,569 tokens that way). `--no-keep-empty-lines` drops them, for corpora
where a blank line is only layout. A split without a single sentence (an empty file, or only
blank lines that are dropped) is refused before anything is written: training could not read it.

Bytes that are not valid UTF-8 are replaced by U+FFFD; meta.json counts the affected lines. A
file where more than a quarter of the bytes are NUL or invalid UTF-8 is refused: it is binary
(or UTF-16), not text with a few bad bytes (NOT_TEXT_SHARE says how the line was drawn).
The recipe holds the sha256 of the three input files, so a changed input gets a new folder and
an unchanged one is recognised wherever it lies.

Command: `python -m data_prep.text --train T --valid V --test T --out data [--name wikitext-2]`.
It prints the dataset folder; a bad input or option is one `error: ...` line and exit status 2.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from data_prep.binarize import (
    SPLITS,
    SplitWriter,
    file_sha256,
    is_prepared,
    recipe_id,
    token_dtype,
    write_meta,
)
from data_prep.vocab import BOS, EOS, Vocabulary
from lstm_moe.files import PATH_ERRORS

TOKENIZER = "whitespace/1"  # bump if the line reading or tokenization changes

# A file is refused as not text when more than this share of its bytes are NUL or not valid
# UTF-8. Measured on binaries (ELF executables and shared libraries, .pyc, PNG, PDF, gzip,
# random bytes): 38-56% such bytes; UTF-16 text: about 50% (a NUL beside each ASCII letter).
# Text in a legacy 8-bit encoding such as Latin-1 stays below 20% even when dense with accents
# (only the accented letters are invalid), and a few corrupt bytes in real UTF-8 text are a
# tiny share: both still pass, with the warning about replaced bytes.
NOT_TEXT_SHARE = 0.25
_SNIFF_BYTES = 1 << 20  # also judged once here, so that a large binary file fails fast
_ESCAPED = re.compile("[\udc80-\udcff]")  # one per invalid byte under "surrogateescape"


def _check_text(path: Path, n_bytes: int, n_bad: int) -> None:
    if n_bad > NOT_TEXT_SHARE * n_bytes:
        raise ValueError(
            f"{path} does not look like text: {n_bad / n_bytes:.0%} of the {n_bytes:,} bytes"
            f" read are NUL or invalid UTF-8 (more than {NOT_TEXT_SHARE:.0%}); give UTF-8 text"
        )


def read_lines(path: Path, stats: Counter) -> Iterator[str]:
    """The lines of a file, decoded as UTF-8 (invalid bytes replaced and counted in
    stats["invalid_utf8_lines"]); streamed, one line in memory at a time. Raises ValueError,
    after the first MiB or at the end, if the file does not look like text (NOT_TEXT_SHARE)."""
    n_bytes = n_bad = 0
    sniffed = False
    with open(path, "rb") as f:
        for raw in f:
            n_bytes += len(raw)
            n_bad += raw.count(0)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                n_bad += len(_ESCAPED.findall(raw.decode("utf-8", errors="surrogateescape")))
                line = raw.decode("utf-8", errors="replace")
                stats["invalid_utf8_lines"] += 1
            if not sniffed and n_bytes >= _SNIFF_BYTES:
                _check_text(path, n_bytes, n_bad)
                sniffed = True
            yield line
    _check_text(path, n_bytes, n_bad)


def read_sentences(path: Path, keep_empty_lines: bool, stats: Counter) -> Iterator[list[str]]:
    """The whitespace tokens of each line, counting lines and empty lines in `stats`."""
    for line in read_lines(path, stats):
        words = line.split()
        stats["lines"] += 1
        if not words:
            stats["empty_lines"] += 1
            if not keep_empty_lines:
                continue
        yield words


def default_name(train: Path) -> str:
    """The training file's folder name (`wikitext-2` for wikitext-2/train.txt), made safe for a
    folder name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(train).resolve().parent.name).strip("-.")
    return name or "text"


def prepare_text(
    train: Path,
    valid: Path,
    test: Path,
    out_dir: Path,
    *,
    name: str | None = None,
    min_count: int = 1,
    max_vocab: int | None = None,
    keep_empty_lines: bool = True,
) -> Path:
    """Binarize the three files into `out_dir/<name>-<recipe_id>/` (nothing to do if it exists)."""
    sources = {"train": Path(train), "valid": Path(valid), "test": Path(test)}
    for split, path in sources.items():
        if not path.is_file():
            raise FileNotFoundError(f"{split} file {path} not found")
        if path.stat().st_size == 0:
            # An empty split would be written as an empty .bin that training cannot read.
            raise ValueError(f"{split} file {path} is empty: every split needs some text")
    name = default_name(sources["train"]) if name is None else name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ValueError(f"name must be letters, digits, '.', '_' or '-', got {name!r}")
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    recipe = {
        "tokenizer": TOKENIZER,
        "name": name,
        "min_count": min_count,
        "max_vocab": max_vocab,
        "keep_empty_lines": keep_empty_lines,
        "sources_sha256": {split: file_sha256(path) for split, path in sources.items()},
    }
    rid = recipe_id(recipe)
    folder = Path(out_dir) / f"{name}-{rid}"
    if is_prepared(folder, rid):
        print(f"up to date: {folder}")
        return folder

    counts: Counter = Counter()
    for words in read_sentences(sources["train"], keep_empty_lines, Counter()):
        counts.update(words)
    vocab = Vocabulary.from_counts(counts, min_count=min_count, max_size=max_vocab)
    del counts
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        _write(folder, sources, vocab, recipe, rid, keep_empty_lines)
    except BaseException:
        if created:  # leave no folder that could pass for a dataset
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def _write(
    folder: Path,
    sources: dict[str, Path],
    vocab: Vocabulary,
    recipe: dict,
    rid: str,
    keep_empty_lines: bool,
) -> None:
    """Encode the three splits with `vocab` into `folder`, then write vocab.txt and meta.json."""
    name = recipe["name"]
    dtype = token_dtype(len(vocab))
    unk = vocab.unk_id
    index = {**vocab.index, BOS: unk, EOS: unk}  # markers in the text are not markers

    splits, stats = {}, {}
    for split in SPLITS:
        split_stats: Counter = Counter()
        writer = SplitWriter(folder / f"{split}.bin", dtype, vocab.eos_id)
        try:
            for words in read_sentences(sources[split], keep_empty_lines, split_stats):
                ids = [index.get(word, unk) for word in words]
                split_stats["unk_tokens"] += ids.count(unk)
                writer.add(ids)
            if writer.tokens == 0:  # only blank lines, all dropped
                raise ValueError(
                    f"{split} file {sources[split]} has no sentences: its lines are all empty"
                    " and --no-keep-empty-lines drops them"
                )
        except BaseException:
            writer.abort()
            raise
        splits[split] = writer.close()
        stats[split] = {
            key: split_stats[key]
            for key in ("lines", "empty_lines", "invalid_utf8_lines", "unk_tokens")
        }
        if split_stats["invalid_utf8_lines"]:
            print(
                f"warning: {sources[split]}: {split_stats['invalid_utf8_lines']} lines with"
                " invalid UTF-8 (bytes replaced by U+FFFD)",
                file=sys.stderr,
            )
    vocab_sha = vocab.save(folder / "vocab.txt")
    write_meta(
        folder,
        {
            "dataset": name,
            "recipe": recipe,
            "recipe_id": rid,
            "sources": {split: str(path.resolve()) for split, path in sources.items()},
            "vocab": {"file": "vocab.txt", "size": len(vocab), "sha256": vocab_sha},
            "dtype": dtype.name,
            "splits": splits,
            "text_stats": stats,
        },
    )
    print(
        f"{name}: vocabulary {len(vocab):,}, "
        + ", ".join(
            f"{s} {e['tokens']:,} tokens ({stats[s]['unk_tokens']:,} <UNK>)"
            for s, e in splits.items()
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.text",
        description="Binarize a plain-text corpus (one sentence per line, whitespace-tokenized)"
        " given as train/valid/test files into OUT/<name>-<recipe_id>/.",
    )
    parser.add_argument("--train", type=Path, required=True, help="training text")
    parser.add_argument("--valid", type=Path, required=True, help="validation text")
    parser.add_argument("--test", type=Path, required=True, help="test text")
    parser.add_argument("--out", type=Path, required=True, help="parent folder of the dataset")
    parser.add_argument(
        "--name", default=None, help="dataset name (default: the training file's folder name)"
    )
    parser.add_argument(
        "--min-count", type=int, default=1, help="keep training words seen this often (default 1)"
    )
    parser.add_argument(
        "--max-vocab",
        type=int,
        default=None,
        help="at most this many vocabulary entries, the three specials included (default: all)",
    )
    parser.add_argument(
        "--keep-empty-lines",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="an empty line is a sentence of its own, a lone </S> (default: keep, the WikiText"
        " convention)",
    )
    args = parser.parse_args(argv)
    try:
        folder = prepare_text(
            args.train,
            args.valid,
            args.test,
            args.out,
            name=args.name,
            min_count=args.min_count,
            max_vocab=args.max_vocab,
            keep_empty_lines=args.keep_empty_lines,
        )
    except (ValueError, *PATH_ERRORS) as error:  # bad input
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the disk failed or is full
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
