import re
from pathlib import Path

import numpy as np
import pytest

from data_prep import text
from data_prep.binarize import SPLITS, file_sha256, read_meta, read_split
from data_prep.text import prepare_text
from data_prep.vocab import Vocabulary

WIKITEXT2 = Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext-2"


def _corpus(folder: Path, train: bytes, valid: bytes, test: bytes) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, data in zip(SPLITS, (train, valid, test), strict=True):
        paths[split] = folder / f"{split}.txt"
        paths[split].write_bytes(data)
    return paths


def _decode(folder: Path, split: str) -> str:
    return " ".join(
        Vocabulary.load(folder / "vocab.txt").decode(read_split(folder, split).tolist())
    )


@pytest.fixture
def corpus(tmp_path):
    return _corpus(
        tmp_path / "toy",
        train=b" the cat sat \n\n the dog sat \n   \n <unk> the end\n",
        valid=b"the bird sat\n\nthe </S> <S> cat",  # no final newline
        test=b"the cat \xff sat\n",  # one invalid byte
    )


def test_encoding_and_vocabulary(corpus, tmp_path):
    folder = prepare_text(*corpus.values(), tmp_path / "out")
    assert folder.name.startswith("toy-")
    vocab = Vocabulary.load(folder / "vocab.txt")
    # Specials, then training words by decreasing count, ties by the word.
    assert vocab.words == ["<S>", "</S>", "<UNK>", "the", "sat", "<unk>", "cat", "dog", "end"]
    assert vocab.counts == [0, 0, 0, 3, 2, 1, 1, 1, 1]
    # Empty and blank lines are kept as a lone </S>.
    assert _decode(folder, "train") == (
        "the cat sat </S> </S> the dog sat </S> </S> <unk> the end </S>"
    )
    # Unknown words and literal markers become <UNK>; a missing final newline ends a line too.
    assert _decode(folder, "valid") == "the <UNK> sat </S> </S> the <UNK> <UNK> cat </S>"
    # The invalid byte becomes U+FFFD, a word of its own here, unknown to the vocabulary.
    assert _decode(folder, "test") == "the cat <UNK> sat </S>"
    meta = read_meta(folder)
    assert meta["dataset"] == "toy"
    assert meta["text_stats"]["train"] == {
        "lines": 5,
        "empty_lines": 2,
        "invalid_utf8_lines": 0,
        "unk_tokens": 0,
    }
    assert meta["text_stats"]["valid"]["unk_tokens"] == 3
    assert meta["text_stats"]["test"]["invalid_utf8_lines"] == 1
    for split in SPLITS:
        entry = meta["splits"][split]
        assert file_sha256(folder / entry["file"]) == entry["sha256"]
        ids = read_split(folder, split)
        assert entry["tokens"] == len(ids) and entry["sentences"] == int((ids == 1).sum())
    assert meta["recipe"]["sources_sha256"]["train"] == file_sha256(corpus["train"])
    assert file_sha256(folder / "vocab.txt") == meta["vocab"]["sha256"]


def test_empty_lines_dropped_and_vocabulary_cut(corpus, tmp_path):
    folder = prepare_text(
        *corpus.values(), tmp_path / "out", keep_empty_lines=False, min_count=2, name="toy2"
    )
    assert folder.name.startswith("toy2-")
    assert Vocabulary.load(folder / "vocab.txt").words[3:] == ["the", "sat"]
    assert _decode(folder, "train") == (
        "the <UNK> sat </S> the <UNK> sat </S> <UNK> the <UNK> </S>"
    )
    assert read_meta(folder)["text_stats"]["train"]["empty_lines"] == 2
    capped = prepare_text(*corpus.values(), tmp_path / "out", max_vocab=4)
    assert Vocabulary.load(capped / "vocab.txt").words[3:] == ["the"]


def test_idempotent_and_content_addressed(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    folder = prepare_text(*corpus.values(), out)
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    capsys.readouterr()
    assert prepare_text(*corpus.values(), out) == folder
    assert "up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    # Same bytes elsewhere: the same recipe.
    moved = _corpus(tmp_path / "elsewhere", *(p.read_bytes() for p in corpus.values()))
    assert prepare_text(*moved.values(), out, name="toy") == folder
    # Changed input: a new folder.
    corpus["test"].write_bytes(b"the dog\n")
    assert prepare_text(*corpus.values(), out) != folder


def test_cli(corpus, tmp_path, capsys):
    args = ["--train", str(corpus["train"]), "--valid", str(corpus["valid"])]
    args += ["--test", str(corpus["test"]), "--out", str(tmp_path / "out")]
    assert text.main([*args, "--name", "x", "--no-keep-empty-lines"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert Path(last).parent == tmp_path / "out" and Path(last).name.startswith("x-")
    assert read_meta(Path(last))["recipe"]["keep_empty_lines"] is False
    # Bad input is one line on stderr and exit status 2, as for a usage error.
    capsys.readouterr()
    assert text.main([*args, "--name", "bad name"]) == 2
    assert capsys.readouterr().err.startswith("error: name must be")
    corpus["valid"].write_bytes(b"")
    assert text.main(args) == 2
    err = capsys.readouterr().err
    assert err == f"error: valid file {corpus['valid']} is empty: every split needs some text\n"
    corpus["valid"].write_bytes(_elf_like(500))
    assert text.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {corpus['valid']} does not look like")
    corpus["valid"].unlink()
    assert text.main(args) == 2
    assert capsys.readouterr().err == f"error: valid file {corpus['valid']} not found\n"
    corpus["valid"].write_bytes(b"the cat\n")
    (tmp_path / "a-file").write_text("")
    assert text.main([*args[:-1], str(tmp_path / "a-file")]) == 2  # --out is a file
    assert capsys.readouterr().err.startswith("error: ")
    with pytest.raises(SystemExit) as usage:
        text.main(["--train", str(corpus["train"])])
    assert usage.value.code == 2


@pytest.mark.skipif(not WIKITEXT2.is_dir(), reason="shared/data/wikitext-2 not present")
def test_wikitext2_counts(tmp_path):
    files = [WIKITEXT2 / f"{split}.txt" for split in SPLITS]
    folder = prepare_text(*files, tmp_path)
    meta = read_meta(folder)
    # The well-known token counts: words plus one end-of-sentence per line, empty lines too.
    assert [meta["splits"][s]["tokens"] for s in SPLITS] == [2_088_628, 217_646, 245_569]
    assert [meta["splits"][s]["sentences"] for s in SPLITS] == [36_718, 3_760, 4_358]
    # 33,277 word types, all in train (WikiText's own <unk> among them), plus our three
    # specials: 33,280. PyTorch's word_language_model counts 33,278 = 33,277 + its <eos>,
    # our </S>; <S> and <UNK> are in our vocabulary but never occur in WikiText-2.
    assert meta["vocab"]["size"] == 33_280
    assert all(meta["text_stats"][s]["unk_tokens"] == 0 for s in SPLITS)
    ids = np.concatenate([read_split(folder, s) for s in SPLITS])
    assert not np.isin(ids, [0, 2]).any()


@pytest.mark.parametrize("split", SPLITS)
def test_an_empty_split_is_refused(corpus, tmp_path, split):
    corpus[split].write_bytes(b"")
    with pytest.raises(ValueError, match=rf"{split} file .*{split}\.txt is empty"):
        prepare_text(*corpus.values(), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_a_split_of_dropped_blank_lines_is_refused(corpus, tmp_path):
    corpus["valid"].write_bytes(b"\n  \n\t\n")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"valid file .*valid\.txt has no sentences"):
        prepare_text(*corpus.values(), out, keep_empty_lines=False)
    assert not list(out.iterdir())  # no half-written folder left behind
    # Kept, blank lines are sentences of their own: the split is not empty.
    folder = prepare_text(*corpus.values(), out)
    assert read_meta(folder)["splits"]["valid"]["tokens"] == 3


def _elf_like(size: int) -> bytes:
    """Bytes shaped like an executable: a header, runs of NULs, high bytes, a few newlines."""
    body = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    body[::3] = 0
    return b"\x7fELF\x02\x01\x01\x00" + body.tobytes()


@pytest.mark.parametrize(
    ("split", "data"),
    [
        ("train", _elf_like(4000)),
        ("test", np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes()),
        ("valid", "the cat sat\nthe dog sat\n".encode("utf-16")),  # a NUL beside every letter
        # Binary for its first MiB, then 6 MB of text: under a tenth bad over all, refused early.
        ("train", _elf_like(1 << 20) + b"the cat sat\n" * 500_000),
    ],
)
def test_binary_input_is_refused(corpus, tmp_path, split, data):
    corpus[split].write_bytes(data)
    with pytest.raises(ValueError, match=rf"{split}\.txt does not look like text: \d+%"):
        prepare_text(*corpus.values(), tmp_path / "out")
    assert not list((tmp_path / "out").glob("*"))


def test_a_few_bad_bytes_pass_with_a_warning(corpus, tmp_path, capsys):
    # Stray corruption in real text: two bad bytes and a NUL among a few hundred.
    corpus["train"].write_bytes(b"the cat sat on the mat\n" * 10 + b"a \xff\xfe b \x00 c\n")
    # The line is drawn at a quarter of the bytes: 1 bad byte of 4 still passes.
    corpus["valid"].write_bytes(b"ab\xff\n")
    folder = prepare_text(*corpus.values(), tmp_path / "out")
    stats = read_meta(folder)["text_stats"]
    assert stats["train"]["invalid_utf8_lines"] == 1 and stats["valid"]["invalid_utf8_lines"] == 1
    err = capsys.readouterr().err
    assert "warning:" in err and "train.txt: 1 lines with invalid UTF-8" in err
    # ... and 2 of 4 does not.
    corpus["valid"].write_bytes(b"a\xff\xff\n")
    with pytest.raises(ValueError, match="does not look like text: 50% of the 4 bytes"):
        prepare_text(*corpus.values(), tmp_path / "out")


def test_a_damaged_meta_json_names_itself_and_is_rebuilt(corpus, tmp_path):
    folder = prepare_text(*corpus.values(), tmp_path / "out")
    meta = folder / "meta.json"
    meta.write_text(meta.read_text().replace(",", "", 1))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(meta))} is not valid JSON \(Expecting"):
        read_meta(folder)
    # Preparing again does not trust the damaged folder: it writes it anew.
    assert prepare_text(*corpus.values(), tmp_path / "out") == folder
    assert read_meta(folder)["dataset"] == "toy"
