"""data_prep.synthetic_parallel: determinism, the reordering and topic properties the docstring
claims (checked on the written text with the lexicon), and the binarized folder with its
topic files."""

import dataclasses
import json
from pathlib import Path

import pytest

from data_prep import synthetic_parallel as sp
from lstm_moe.pairs import read_pairs, read_parallel_meta

TINY = sp.PRESETS["tiny"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny preset prepared once: (dataset folder, text folder, lexicon)."""
    out = tmp_path_factory.mktemp("synthetic")
    folder = sp.prepare_synthetic_parallel(TINY, out, progress=False)
    text = sp.text_folder(TINY, out)
    lexicon = json.loads((text / "lexicon.json").read_text())
    return folder, text, lexicon


def _lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()]


def test_deterministic_from_the_seed():
    lex, splits = sp.generate(TINY)
    again_lex, again = sp.generate(TINY)
    assert lex == again_lex and splits == again
    _, other = sp.generate(dataclasses.replace(TINY, seed=2))
    assert other["train"] != splits["train"]
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [2000, 200, 200]
    # Each split is its own stream: a longer training split extends it and leaves valid and
    # test alone.
    _, longer = sp.generate(dataclasses.replace(TINY, train_pairs=2100))
    assert longer["valid"] == splits["valid"] and longer["train"][:2000] == splits["train"]


def test_written_text_is_the_same_every_time(tiny, tmp_path):
    _, text, _ = tiny
    other, _ = sp.write_text(TINY, tmp_path)
    for path in sorted(text.iterdir()):
        assert (other / path.name).read_bytes() == path.read_bytes(), path.name


def test_reordering(tiny):
    _, text, lex = tiny
    tr = lex["translation"]
    nouns = {w for w in lex["nouns"]} | {w for ws in lex["topic_nouns"] for w in ws}
    adjectives, verbs = set(lex["adjectives"]), set(lex["verbs"])
    tgt_nouns = {t for w in nouns for t in tr[w]}
    tgt_adjectives = {t for w in adjectives for t in tr[w]}
    tgt_verbs = {t for w in verbs for t in tr[w]}
    topics = [int(t) for t in (text / "train.topic").read_text().split()]
    pairs = zip(_lines(text / "train.src"), _lines(text / "train.tgt"), topics, strict=True)
    for src, tgt, topic in pairs:
        assert len(src) == len(tgt) and 6 <= len(src) <= 15
        # Source: subject, verb, object ...; target: ..., verb, '.'.
        (verb,) = [w for w in src if w in verbs]
        assert src.index(verb) in (2, 3, 4)  # after the subject noun phrase of 2 to 4 words
        assert tgt[-2] == tr[verb][topic] and tgt[-1] == "." and tgt[-2] in tgt_verbs
        # Adjectives come before their noun in the source and after it in the target.
        for i, w in enumerate(src):
            if w in adjectives:
                assert src[i + 1] in adjectives or src[i + 1] in nouns
        for j, w in enumerate(tgt):
            if w in tgt_adjectives and w not in tgt_nouns:
                assert tgt[j - 1] in tgt_adjectives or tgt[j - 1] in tgt_nouns


def test_topic_is_marked_by_context_words_and_changes_the_translation(tiny):
    _, text, lex = tiny
    owner = {w: t for t, words in enumerate(lex["topic_nouns"]) for w in words}
    for split in ("train", "valid", "test"):
        topics = [int(t) for t in (text / f"{split}.topic").read_text().split()]
        for src, topic in zip(_lines(text / f"{split}.src"), topics, strict=True):
            marks = {owner[w] for w in src if w in owner}
            assert marks == {topic}  # at least one context word, and only its topic's
    tr = lex["translation"]
    ambiguous = [w for ws in (lex["nouns"], lex["adjectives"], lex["verbs"]) for w in ws[:6]]
    for w in ambiguous:
        assert len(set(tr[w])) == TINY.n_topics  # one translation per topic, all different
    for w in lex["nouns"][6:] + lex["verbs"][6:]:
        assert len(set(tr[w])) == 1
    # So a translation that ignores the topic is often wrong (a model must read the context).
    src_lines = _lines(text / "valid.src")
    topics = [int(t) for t in (text / "valid.topic").read_text().split()]
    tgt_lines = _lines(text / "valid.tgt")
    wrong = 0
    for src, tgt, topic in zip(src_lines, tgt_lines, topics, strict=True):
        if topic != 0 and any(w in ambiguous for w in src):
            blind = {tr[w][0] for w in src if w in ambiguous}
            wrong += not blind <= set(tgt)
    assert wrong > len(src_lines) / 4
    # Every topic is present in the evaluation splits.
    assert set(topics) == set(range(TINY.n_topics))


def test_binarized_folder_with_topic_files(tiny, capsys):
    folder, text, _ = tiny
    meta = read_parallel_meta(folder)
    assert folder.name == f"synthetic-parallel-src-tgt-{meta['recipe_id']}"
    assert (meta["src_lang"], meta["tgt_lang"]) == ("src", "tgt")
    assert meta["vocab"]["size"] == TINY.vocab_size
    assert meta["splits"]["train"]["pairs"] == TINY.train_pairs  # nothing filtered
    for split in ("valid", "test"):
        entry = meta["splits"][split]
        assert entry["extra"] == {"topic": f"{split}.topic"}
        assert (folder / f"{split}.topic").read_bytes() == (text / f"{split}.topic").read_bytes()
        assert len(read_pairs(folder, split)) == entry["pairs"] == TINY.pairs(split)
        assert (folder / f"{split}.src").read_bytes() == (text / f"{split}.src").read_bytes()
    baselines = meta["synthetic"]["baseline_bleu"]
    for split in ("valid", "test"):
        assert 0 < baselines[split]["monotone"] < 60
        assert 0 < baselines[split]["topic_blind"] < 90
    assert meta["synthetic"]["config"] == dataclasses.asdict(TINY)

    # The command: the same folder, found at once, printed last.
    mtimes = {p.name: p.stat().st_mtime_ns for p in text.iterdir()}
    code = sp.main(["--out", str(folder.parent), "--preset", "tiny", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0 and captured.out.splitlines()[-1] == str(folder)
    assert "up to date" in captured.err
    assert {p.name: p.stat().st_mtime_ns for p in text.iterdir()} == mtimes


def test_bad_options(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        sp.main(["--out", str(tmp_path), "--preset", "tiny", "--n-ambiguous", "99"])
    assert info.value.code == 2 and "n_ambiguous must be in" in capsys.readouterr().err
    code = sp.main(["--out", str(tmp_path), "--preset", "tiny", "--vocab-size", "100000"])
    stderr = capsys.readouterr().err
    assert code == 2 and stderr.splitlines()[-1].startswith("error: vocab size 100000 is too")
