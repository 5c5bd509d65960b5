"""data_prep.parallel: the binarized pairs read back through lstm_moe.pairs, normalisation,
alignment errors, the training filters, evaluation splits kept whole, meta.json last, reuse.

Every corpus is written here; the Multi30k run uses ../shared when it is present."""

import dataclasses
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from sacremoses import MosesPunctNormalizer

from data_prep import parallel
from data_prep.parallel import FilePair, Normalizer, ParallelConfig, prepare_parallel
from data_prep.wordpieces import WordpieceConfig, load
from lstm_moe.files import EOS_ID, PARALLEL_FORMAT, UNK_ID
from lstm_moe.pairs import read_pairs, read_parallel_meta

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
MULTI30K = SHARED / "multi30k"
NEWSTEST = SHARED / "wmt14"

SRC_WORDS = ["the", "a", "small", "red", "dog", "cat", "sees", "runs", "house", "garden", "and"]
TGT_WORDS = ["der", "die", "ein", "kleine", "rote", "Hund", "Katze", "sieht", "läuft", "Haus"]
TGT_WORDS += ["und"]
SRC_WORDS += [",", ".", "?", "!"]
TGT_WORDS += [",", ".", "?", "!"]


def _write(path: Path, lines: list[str] | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = lines if isinstance(lines, bytes) else "".join(f"{s}\n" for s in lines).encode()
    path.write_bytes(data)
    return path


def _sentences(rng: random.Random, n: int) -> tuple[list[str], list[str]]:
    """n pairs of words from the two small vocabularies, the same length on both sides."""
    src, tgt = [], []
    for _ in range(n):
        picks = [rng.randrange(len(SRC_WORDS)) for _ in range(rng.randint(3, 8))]
        src.append(" ".join(SRC_WORDS[i] for i in picks))
        tgt.append(" ".join(TGT_WORDS[i] for i in picks))
    return src, tgt


# Untouched evaluation text: typographic quotes and dashes (Moses normalises them), doubled
# spaces, a tab and a control character (non-printing: a space), an empty line.
VALID_SRC = ["the „small“ dog  sees a cat", "", "a red\thouse – and\x01a garden", "the cat runs ."]
VALID_TGT = ["der „kleine“ Hund sieht", "die Katze", "ein rotes Haus", ""]


@pytest.fixture
def corpus(tmp_path) -> dict[str, list[FilePair]]:
    rng = random.Random(0)
    train_src, train_tgt = _sentences(rng, 300)
    # Every character of the normalised evaluation text, often enough to be in the vocabulary
    # (character_coverage drops the rarest).
    train_src += ['the dog says "run" , and runs - a cat ...'] * 5
    train_tgt += ['der Hund sagt "lauf" , und läuft - eine rote Katze ...'] * 5
    test_src, test_tgt = _sentences(rng, 5)
    root = tmp_path / "text"
    files = {
        "train": (train_src, train_tgt),
        "valid": (VALID_SRC, VALID_TGT),
        "test": (test_src, test_tgt),
    }
    return {
        split: [FilePair(_write(root / f"{split}.en", s), _write(root / f"{split}.de", t))]
        for split, (s, t) in files.items()
    }


def _config(**changes) -> ParallelConfig:
    fields = {"name": "toy", "src_lang": "en", "tgt_lang": "de"}
    fields["wordpieces"] = WordpieceConfig(vocab_size=changes.pop("vocab_size", 80))
    return ParallelConfig(**{**fields, **changes})


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = parallel.main([*map(str, argv), "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


# --------------------------------------------------------------------------- the round trip


def test_round_trip_through_read_pairs(corpus, tmp_path):
    # No ratio filter: every training pair stays, to be compared with its line.
    folder = prepare_parallel(_config(max_ratio=100.0), corpus, tmp_path / "out", progress=False)
    meta = read_parallel_meta(folder)
    assert meta["format"] == PARALLEL_FORMAT
    assert folder.name == f"toy-en-de-{meta['recipe_id']}"
    assert (meta["dataset"], meta["src_lang"], meta["tgt_lang"]) == ("toy", "en", "de")
    assert meta["dtype"] == "uint16" and meta["vocab"]["size"] == 80
    assert meta["vocab"]["file"] == "spm.model" and (folder / "vocab.txt").is_file()
    processor = load(folder / "spm.model")
    assert processor.get_piece_size() == 80
    normalize = {"en": Normalizer("en"), "de": Normalizer("de")}
    for split, pairs in corpus.items():
        entry = meta["splits"][split]
        data = read_pairs(folder, split, meta)
        src_lines = pairs[0].src.read_text().splitlines()
        tgt_lines = pairs[0].tgt.read_text().splitlines()
        assert len(data) == entry["pairs"] == len(src_lines)
        assert entry["src_tokens"] == len(data.src) and entry["tgt_tokens"] == len(data.tgt)
        for i in range(len(data)):
            src_ids, tgt_ids = data.pair(i)
            assert src_ids[-1] == EOS_ID and tgt_ids[-1] == EOS_ID
            assert EOS_ID not in src_ids[:-1] and EOS_ID not in tgt_ids[:-1]
            # The ids decode back to the normalised text.
            assert processor.decode(src_ids[:-1].tolist()) == normalize["en"](src_lines[i])
            assert processor.decode(tgt_ids[:-1].tolist()) == normalize["de"](tgt_lines[i])
        if split == "train":
            assert "raw" not in entry
        else:  # the untouched text, byte for byte
            assert entry["raw"] == {"src": f"{split}.en", "tgt": f"{split}.de"}
            assert (folder / f"{split}.en").read_bytes() == pairs[0].src.read_bytes()
            assert (folder / f"{split}.de").read_bytes() == pairs[0].tgt.read_bytes()
        for key in ("src", "tgt", "index"):
            path = folder / entry["files"][key]
            assert entry["sha256"][key] == parallel.file_sha256(path)
    assert meta["vocab"]["sha256"] == parallel.file_sha256(folder / "spm.model")
    assert meta["splits"]["valid"]["unk_tokens"] == {"src": 0, "tgt": 0}
    # Moses' rules turned the quotes and the dash into ASCII; the tab and \x01 became spaces.
    assert normalize["en"](VALID_SRC[0]) == 'the "small" dog sees a cat'
    assert normalize["en"](VALID_SRC[2]) == "a red house - and a garden"
    assert not list(folder.glob("*.tmp")) and not list(folder.glob("vocab-sample*"))


def test_normalizer_matches_sacremoses():
    lines = [*VALID_SRC, "He said ``yes'' , 5 % and ( this ) ...", "« Oui » : 3\u00a0000 ?"]
    if NEWSTEST.is_dir():
        lines += (NEWSTEST / "newstest2013.fr").read_text().splitlines()[:500]
    for lang in ("en", "fr"):
        moses = MosesPunctNormalizer(lang=lang)
        ours = Normalizer(lang)
        for line in lines:
            expected = " ".join(moses.normalize(line).split())
            if line.isprintable():
                assert ours(line) == expected


def test_unknown_characters_are_counted(corpus, tmp_path):
    corpus["test"] = [
        FilePair(
            _write(tmp_path / "t.en", ["the dog ☃ sees ☃ a cat"]),
            _write(tmp_path / "t.de", ["der Hund ♜ sieht"]),
        )
    ]
    folder = prepare_parallel(_config(), corpus, tmp_path / "out", progress=False)
    meta = read_parallel_meta(folder)
    assert meta["splits"]["test"]["unk_tokens"] == {"src": 2, "tgt": 1}
    src, tgt = read_pairs(folder, "test").pair(0)
    assert src.tolist().count(UNK_ID) == 2 and tgt.tolist().count(UNK_ID) == 1


# --------------------------------------------------------------------------- alignment


def test_misaligned_files_are_named_with_their_counts(tmp_path, capsys):
    root = tmp_path / "text"
    _write(root / "train.en", ["a b", "b c", "c d"])
    _write(root / "train.de", ["u v", "v w"])
    for split in ("valid", "test"):
        _write(root / f"{split}.en", ["a b"])
        _write(root / f"{split}.de", ["u v"])
    out = tmp_path / "out"
    code, stdout, stderr = _run(
        capsys, "--train-prefix", root / "train", "--valid-prefix", root / "valid",
        "--test-prefix", root / "test", "--src", "en", "--tgt", "de", "--out", out,
        "--vocab-size", 20,
    )  # fmt: skip
    assert code == 2 and stdout == "" and stderr.count("\n") == 1
    assert stderr.startswith("error: ")
    assert f"{root / 'train.en'} has 3 lines but {root / 'train.de'} has 2" in stderr
    assert not out.exists() or not list(out.iterdir())


def test_line_ends_are_newlines_only(tmp_path):
    """A carriage return or a Unicode line separator inside a line does not split it; a CRLF
    ending is a line end; a last line without a newline counts."""
    root = tmp_path / "text"
    src = _write(root / "train.en", b"a b\r\nc \r d\ne\xe2\x80\xa8f\na b c")
    tgt = _write(root / "train.de", b"u v\nw x\ny z\nu v w\n")
    assert parallel.count_lines(src) == parallel.count_lines(tgt) == 4
    lines = [s for s, _ in parallel.pair_lines([FilePair(src, tgt)])]
    assert lines == [b"a b", b"c \r d", "e\u2028f".encode(), b"a b c"]
    assert Normalizer("en")("c \r d") == "c d"
    assert Normalizer("en")("e\u2028f") == "e f"


def test_missing_file_and_bad_options(tmp_path, capsys):
    root = tmp_path / "text"
    _write(root / "x.en", ["a"])
    base = ["--src", "en", "--tgt", "de", "--out", tmp_path / "out"]
    code, _, stderr = _run(
        capsys, "--train-prefix", root / "x", "--valid-prefix", root / "x",
        "--test-prefix", root / "x", *base,
    )  # fmt: skip
    assert code == 2 and stderr.count("\n") == 1 and f"{root / 'x.de'} not found" in stderr
    _write(root / "x.de", ["u"])
    prefixes = ["--train-prefix", root / "x", "--valid-prefix", root / "x", "--test-prefix"]
    code, _, stderr = _run(capsys, *prefixes, root / "x", *base, "--max-ratio", "0.5")
    assert code == 2 and "--max-ratio must be >= 1" in stderr
    code, _, stderr = _run(capsys, *prefixes, root / "x", *base[:3], "en", *base[4:])
    assert code == 2 and "both 'en'" in stderr


def test_vocabulary_too_large_says_the_maximum(tmp_path, capsys):
    root = tmp_path / "text"
    rng = random.Random(1)
    for split in ("train", "valid", "test"):
        _write(root / f"{split}.en", [" ".join(rng.choices("abcdef", k=4)) for _ in range(50)])
        _write(root / f"{split}.de", [" ".join(rng.choices("uvwxyz", k=4)) for _ in range(50)])
    prefixes = [f"--{s}-prefix" for s in ("train", "valid", "test")]
    argv = [x for p, s in zip(prefixes, ("train", "valid", "test"), strict=True)
            for x in (p, root / s)]  # fmt: skip
    code, stdout, stderr = _run(
        capsys, *argv, "--src", "en", "--tgt", "de", "--out", tmp_path / "out",
        "--vocab-size", 29,
    )  # fmt: skip
    # 12 letters, each also as a word-initial piece, '▁' and the three specials: 28.
    assert code == 2 and stdout == "" and stderr.count("\n") == 1
    assert "vocab size 29 is too large" in stderr and "at most 28" in stderr
    assert not list((tmp_path / "out").iterdir())


# --------------------------------------------------------------------------- filtering


def test_training_filters_and_evaluation_splits_kept_whole(tmp_path):
    """Single letters are single wordpieces here (vocabulary 28: every '▁x' piece), so the
    lengths below are wordpiece counts."""
    rng = random.Random(2)
    filler_src = [" ".join(rng.choices("abcdef", k=4)) for _ in range(60)]
    filler_tgt = [" ".join(rng.choices("uvwxyz", k=4)) for _ in range(60)]
    cases = [
        ("a b c", "u v w", None),
        ("", "u v", "empty"),
        ("a b", "   ", "empty"),  # blank after normalisation
        ("a a a a a a", "u u u u u u", "too_long"),  # 6 > 5
        ("a b c d e f", "u", "too_long"),  # too long comes before the ratio
        ("a", "u v", "ratio"),  # 2 > 1.5 × 1
        ("a b", "u v w", None),  # 3 = 1.5 × 2: kept
        ("a b c d", "u v", "ratio"),
        ("a b c d e", "u v w x y", None),  # 5 = the maximum: kept
    ]
    root = tmp_path / "text"
    train_src = filler_src + [c[0] for c in cases]
    train_tgt = filler_tgt + [c[1] for c in cases]
    valid = [("", "u v"), ("a a a a a a a", "u"), ("a b", "")]
    corpus = {
        "train": [FilePair(_write(root / "train.en", train_src),
                           _write(root / "train.de", train_tgt))],
        "valid": [FilePair(_write(root / "valid.en", [s for s, _ in valid]),
                           _write(root / "valid.de", [t for _, t in valid]))],
        "test": [FilePair(_write(root / "test.en", ["a b"]), _write(root / "test.de", ["u"]))],
    }  # fmt: skip
    config = _config(vocab_size=28, max_tokens_per_sentence=5, max_ratio=1.5)
    folder = prepare_parallel(config, corpus, tmp_path / "out", progress=False)
    meta = read_parallel_meta(folder)
    train = meta["splits"]["train"]
    assert train["removed"] == {"empty": 2, "too_long": 2, "ratio": 2}
    assert train["lines"] == len(train_src) and train["pairs"] == len(train_src) - 6
    kept = [c for c in cases if c[2] is None]
    data = read_pairs(folder, "train")
    processor = load(folder / "spm.model")
    decoded = [
        tuple(processor.decode(ids[:-1].tolist()) for ids in data.pair(i))
        for i in range(len(filler_src), len(data))
    ]
    assert decoded == [(s, t) for s, t, _ in kept]

    valid_entry = meta["splits"]["valid"]
    assert valid_entry["pairs"] == 3 and valid_entry["removed"] == {}
    assert valid_entry["empty_lines"] == {"src": 1, "tgt": 1}
    assert valid_entry["long_pairs"] == 1
    pairs = read_pairs(folder, "valid")
    assert pairs.pair(0)[0].tolist() == [EOS_ID]  # an empty source is just EOS
    assert pairs.pair(2)[1].tolist() == [EOS_ID]
    assert pairs.src_lengths.tolist() == [1, 8, 3]


def test_max_train_pairs_and_gzipped_files(corpus, tmp_path):
    import gzip

    gz = tmp_path / "gz" / "train.de.gz"
    gz.parent.mkdir()
    gz.write_bytes(gzip.compress(corpus["train"][0].tgt.read_bytes()))
    plain = gz.parent / "train.en"
    plain.write_bytes(corpus["train"][0].src.read_bytes())
    pair = parallel.prefix_pair(gz.parent / "train", "en", "de")
    assert pair == FilePair(plain, gz)
    truncated = gz.with_name("cut.de.gz")
    truncated.write_bytes(gz.read_bytes()[:-20])
    with pytest.raises(parallel.PrepareError, match=r"cut\.de\.gz is not a complete gzip file"):
        parallel.count_lines(truncated)
    corpus["train"] = [pair]
    folder = prepare_parallel(
        _config(max_train_pairs=120), corpus, tmp_path / "out", progress=False
    )
    meta = read_parallel_meta(folder)
    assert meta["splits"]["train"]["lines"] == 120
    assert meta["vocab"]["trained_on"]["of_pairs"] == 120


def test_vocabulary_sample_is_bounded_and_seeded(corpus, tmp_path):
    one = prepare_parallel(_config(vocab_sentences=100), corpus, tmp_path / "a", progress=False)
    two = prepare_parallel(_config(vocab_sentences=100), corpus, tmp_path / "b", progress=False)
    other = prepare_parallel(
        _config(vocab_sentences=100, seed=2), corpus, tmp_path / "c", progress=False
    )
    trained_on = read_parallel_meta(one)["vocab"]["trained_on"]
    assert trained_on == {
        "sampled_pairs": 100,
        "of_pairs": 305,
        "sentences": {"src": 100, "tgt": 100},
    }
    # The same model wherever it is trained, so the same ids.
    assert (one / "spm.model").read_bytes() == (two / "spm.model").read_bytes()
    assert read_parallel_meta(one)["vocab"] == read_parallel_meta(two)["vocab"]
    assert (one / "train.src.bin").read_bytes() == (two / "train.src.bin").read_bytes()
    assert one.name == two.name and other.name != one.name
    assert (other / "spm.model").read_bytes() != (one / "spm.model").read_bytes()


# --------------------------------------------------------------------------- the folder


def test_meta_is_written_last_and_a_killed_run_leaves_nothing(corpus, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def killed(path, data):
        assert sorted(p.name for p in path.parent.iterdir()) == sorted(
            ["spm.model", "vocab.txt", "train.src.bin", "train.tgt.bin", "train.idx",
             *[f"{s}.{x}" for s in ("valid", "test") for x in ("src.bin", "tgt.bin", "idx",
                                                                 "en", "de")]]
        )  # fmt: skip
        raise KeyboardInterrupt

    monkeypatch.setattr(parallel, "write_json_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare_parallel(_config(), corpus, out, progress=False)
    assert list(out.iterdir()) == []  # no folder, no .tmp, no meta.json
    monkeypatch.undo()

    # A run killed harder leaves its .tmp folder (never taken for a dataset); the next run
    # of the recipe starts afresh.
    folder = prepare_parallel(_config(), corpus, out, progress=False)
    (folder / "meta.json").unlink()  # as if meta.json had never been written
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir()
    (tmp / "train.src.bin.tmp").write_bytes(b"partial")
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        read_pairs(folder, "train")
    again = prepare_parallel(_config(), corpus, out, progress=False)
    assert again == folder and (folder / "meta.json").is_file() and not tmp.exists()


def test_reuse_of_a_complete_folder(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    folder = prepare_parallel(_config(), corpus, out, progress=False)
    mtimes = _mtimes(folder)
    capsys.readouterr()
    assert prepare_parallel(_config(), corpus, out, progress=False) == folder
    assert "up to date" in capsys.readouterr().err and _mtimes(folder) == mtimes
    # A damaged folder is rebuilt; another option is another folder.
    (folder / "valid.tgt.bin").write_bytes(b"\0\0")
    assert prepare_parallel(_config(), corpus, out, progress=False) == folder
    assert "up to date" not in capsys.readouterr().err
    read_pairs(folder, "valid")
    other = prepare_parallel(_config(max_ratio=2.0), corpus, out, progress=False)
    assert other != folder and _mtimes(folder).keys() == mtimes.keys()


def test_extra_files_of_evaluation_splits(corpus, tmp_path):
    topics = _write(tmp_path / "valid.topic", ["0", "1", "1", "2"])
    folder = prepare_parallel(
        _config(), corpus, tmp_path / "out", extra_files={"valid": {"topic": topics}},
        extra_recipe={"generator": "hand-made"}, progress=False,
    )  # fmt: skip
    meta = read_parallel_meta(folder)
    assert meta["splits"]["valid"]["extra"] == {"topic": "valid.topic"}
    assert (folder / "valid.topic").read_bytes() == topics.read_bytes()
    assert meta["recipe"]["generator"] == "hand-made"
    short = _write(tmp_path / "short.topic", ["0"])
    with pytest.raises(parallel.PrepareError, match="has 1 lines but the valid split has 4"):
        prepare_parallel(
            _config(), corpus, tmp_path / "out", extra_files={"valid": {"topic": short}},
            progress=False,
        )  # fmt: skip


def test_help(capsys):
    with pytest.raises(SystemExit) as info:
        parallel.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    options = ["--train-prefix", "--valid-prefix", "--test-prefix", "--src", "--tgt", "--out"]
    options += ["--name", "--vocab-size", "--model-type", "--max-ratio", "--vocab-sentences"]
    options += ["--max-tokens-per-sentence", "--max-train-pairs", "--character-coverage"]
    for option in options:
        assert option in text


# --------------------------------------------------------------------------- Multi30k


@pytest.mark.skipif(not MULTI30K.is_dir(), reason=f"{MULTI30K} not present")
def test_multi30k_command_line(tmp_path, capsys):
    code, stdout, _ = _run(
        capsys, "--train-prefix", MULTI30K / "train", "--valid-prefix", MULTI30K / "val",
        "--test-prefix", MULTI30K / "test_2016_flickr", "--src", "en", "--tgt", "de",
        "--out", tmp_path, "--vocab-size", 500, "--max-train-pairs", 3000,
    )  # fmt: skip
    assert code == 0
    folder = Path(stdout.splitlines()[-1])
    assert folder.parent == tmp_path and re.fullmatch(r"multi30k-en-de-[0-9a-f]{12}", folder.name)
    meta = read_parallel_meta(folder)
    assert meta["splits"]["valid"]["pairs"] == 1014 and meta["splits"]["test"]["pairs"] == 1000
    assert meta["splits"]["train"]["lines"] == 3000
    assert sum(meta["splits"]["train"]["removed"].values()) == 3000 - len(
        read_pairs(folder, "train")
    )
    assert (folder / "test.de").read_bytes() == (MULTI30K / "test_2016_flickr.de").read_bytes()
    first = read_pairs(folder, "valid").source(0)
    assert (
        load(folder / "spm.model").decode(first[:-1].tolist())
        == ((MULTI30K / "val.en").read_text().splitlines()[0])
    )
    assert json.loads((folder / "meta.json").read_text())["recipe"]["max_train_pairs"] == 3000
    assert np.dtype(meta["dtype"]) == np.uint16


def test_worker_processes_give_the_same_folder(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(parallel, "_BATCH", 64)  # several batches in flight per worker
    one = prepare_parallel(_config(), corpus, tmp_path / "one", progress=False)
    two = prepare_parallel(_config(), corpus, tmp_path / "two", workers=2, progress=False)
    assert one.name == two.name
    for path in sorted(one.iterdir()):
        if path.suffix in (".bin", ".idx", ".en", ".de"):
            assert (two / path.name).read_bytes() == path.read_bytes(), path.name


def test_unigram_model(corpus, tmp_path):
    config = dataclasses.replace(_config(), wordpieces=WordpieceConfig(60, "unigram"))
    folder = prepare_parallel(config, corpus, tmp_path / "out", progress=False)
    meta = read_parallel_meta(folder)
    assert meta["vocab"]["model_type"] == "unigram" and meta["vocab"]["size"] == 60
    assert read_pairs(folder, "test").pair(0)[0][-1] == EOS_ID
