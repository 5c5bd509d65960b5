import dataclasses
import json
import math

import numpy as np
import pytest

from data_prep import synthetic
from data_prep.binarize import SPLITS, file_sha256, read_meta, read_split
from data_prep.synthetic import (
    PRESETS,
    SyntheticConfig,
    build_topics,
    entropy_floor,
    prepare_synthetic,
    sample_split,
    sentence_entropy,
)
from data_prep.vocab import Vocabulary
from lstm_moe.files import read_split_extra

TINY = PRESETS["tiny"]


def _bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------------------------- exact floor


def test_sentence_entropy_hand_computed():
    # States: 0 = </S>, 1 = a, 2 = b.  </S> -> a | b (1/2 each); a -> b | </S> (1/2 each);
    # b -> </S>.  Visits per sentence: a 1/2, b 1/2 + 1/4 = 3/4, so 2.25 tokens with </S>;
    # nats: ln 2 (first word) + 1/2 · ln 2 (after a) + 3/4 · 0 (after b) = 1.5 ln 2.
    transition = np.array([[0, 0.5, 0.5], [0.5, 0, 0.5], [1, 0, 0]])
    nats, tokens = sentence_entropy(transition, eos=0)
    assert tokens == pytest.approx(2.25, abs=1e-12)
    assert nats == pytest.approx(1.5 * math.log(2), abs=1e-12)
    # The rate, (2/3) ln 2, equals Σ_s π(s) H(next | s) with π = (1, 1/2, 3/4) / 2.25.
    assert nats / tokens == pytest.approx(2 / 3 * math.log(2), abs=1e-12)


def test_sentence_entropy_matches_stationary_distribution():
    rng = np.random.default_rng(0)
    n = 7
    transition = rng.random((n, n)) * (rng.random((n, n)) < 0.5)
    transition[:, 0] += 0.1  # every state can end the sentence (state 0 is </S>)
    transition /= transition.sum(1, keepdims=True)
    eigenvalues, eigenvectors = np.linalg.eig(transition.T)
    pi = np.real(eigenvectors[:, np.argmin(abs(eigenvalues - 1))])
    pi /= pi.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        h = np.where(transition > 0, -transition * np.log(transition), 0).sum(1)
    nats, tokens = sentence_entropy(transition, eos=0)
    assert nats / tokens == pytest.approx(pi @ h, rel=1e-10)
    assert tokens == pytest.approx(1 / pi[0], rel=1e-10)  # mean return time to </S>


def test_entropy_floor_of_a_hand_built_chain():
    # One topic over two words {a, b}, its tables set by hand:
    # </S> -> a | b (1/2 each), a -> a | </S> (1/2 each), b -> </S>.
    config = dataclasses.replace(TINY, n_topics=1, n_words=2, topic_words=2, branching=2)
    topics = build_topics(config, np.random.default_rng(0))
    prob = np.zeros_like(topics.prob)  # [1, 3, 3]: states a, b, </S>; options 0, 1, </S>
    successor = np.full_like(topics.successor, 2)
    successor[0, :, :2] = [0, 1]
    prob[0, 0] = [0.5, 0, 0.5]
    prob[0, 1] = [0, 0, 1]
    prob[0, 2] = [0.5, 0.5, 0]
    topics = dataclasses.replace(topics, prob=prob, successor=successor)
    # Visits: a 1/2 + 1/4 + ... = 1, b 1/2; tokens 2.5; nats ln 2 + 1 · ln 2 = 2 ln 2.
    assert entropy_floor(topics) == pytest.approx(2 * math.log(2) / 2.5, abs=1e-12)


def test_tables_are_distributions_over_the_topic_slice():
    config = SyntheticConfig(n_topics=5, n_words=50, topic_words=20, branching=4)
    topics = build_topics(config, np.random.default_rng(3))
    K = config.topic_words
    np.testing.assert_allclose(topics.prob.sum(-1), 1.0, atol=1e-12)
    np.testing.assert_allclose(topics.prob[:, :K, -1], 1 / config.mean_sentence_length)
    assert (topics.prob[:, K, -1] == 0).all()  # no empty sentence
    assert (topics.successor[:, :, -1] == K).all()
    for t in range(config.n_topics):
        words = topics.state_token[t, :K]
        assert len(set(words.tolist())) == K and words.min() >= 3
        for row in topics.successor[t, :, :-1]:
            assert len(set(row.tolist())) == config.branching  # distinct candidates


def test_oracle_converges_to_the_exact_rate():
    # Documents are i.i.d. blocks of the stream, so the oracle mean is a ratio estimator
    # (Σ nats / Σ tokens over documents) whose standard error follows from the per-document
    # residuals; 5 standard errors leave a false-failure chance below 1e-6 (and the sample is
    # seeded, so the outcome is fixed).
    config = dataclasses.replace(TINY, n_topics=8, topic_zipf=1.0)
    topics = build_topics(config, np.random.default_rng(1))
    sample = sample_split(topics, config, 300_000, np.random.default_rng(2))
    exact = entropy_floor(topics)
    doc_of_token = np.repeat(sample.sentence_document, sample.sentence_tokens)
    nats = np.bincount(doc_of_token, weights=sample.nll)
    tokens = np.bincount(doc_of_token)
    rate = nats.sum() / tokens.sum()
    se = math.sqrt(((nats - rate * tokens) ** 2).sum()) / tokens.sum()
    assert se < 0.01 * exact  # the test has power
    assert abs(rate - exact) < 5 * se


def test_sample_layout():
    topics = build_topics(TINY, np.random.default_rng(0))
    sample = sample_split(topics, TINY, 2_000, np.random.default_rng(1))
    ends = np.flatnonzero(sample.ids == 1)
    assert len(ends) == len(sample.sentence_tokens)
    np.testing.assert_array_equal(ends + 1, np.cumsum(sample.sentence_tokens))
    assert sample.sentence_tokens.min() >= 2  # a word and </S>: no empty sentence
    # The fewest whole sentences that reach the budget.
    assert len(sample.ids) >= 2_000 > len(sample.ids) - sample.sentence_tokens[-1]
    # Every word belongs to its sentence's topic slice; one topic per document.
    for start, n, t in zip(
        np.cumsum(sample.sentence_tokens) - sample.sentence_tokens,
        sample.sentence_tokens,
        sample.sentence_topic,
        strict=True,
    ):
        assert set(sample.ids[start : start + n - 1].tolist()) <= set(topics.state_token[t])
    for d in np.unique(sample.sentence_document):
        assert len(set(sample.sentence_topic[sample.sentence_document == d].tolist())) == 1
    assert np.isfinite(sample.nll).all() and (sample.nll >= 0).all()


# ---------------------------------------------------------------------------------- dataset


def test_prepare_writes_a_consistent_dataset(tmp_path):
    folder = prepare_synthetic(TINY, tmp_path)
    meta = read_meta(folder)
    assert folder.name == f"synthetic-{meta['recipe_id']}"
    assert meta["dataset"] == "synthetic"
    assert meta["recipe"] == synthetic.recipe(TINY)
    vocab = Vocabulary.load(folder / "vocab.txt")
    assert len(vocab) == meta["vocab"]["size"] == TINY.n_words + 3
    assert file_sha256(folder / "vocab.txt") == meta["vocab"]["sha256"]
    train_counts = np.zeros(len(vocab), dtype=np.int64)
    for split in SPLITS:
        entry = meta["splits"][split]
        ids = read_split(folder, split, meta)
        assert file_sha256(folder / entry["file"]) == entry["sha256"]
        assert entry["tokens"] == len(ids) >= TINY.split_tokens(split)
        assert entry["sentences"] == int((ids == 1).sum())
        assert ids[-1] == 1 and ids.max() < len(vocab)
        assert not np.isin(ids, [0, 2]).any()  # no <S>, no <UNK> in the stream
        assert not ((ids[1:] == 1) & (ids[:-1] == 1)).any()  # no empty sentence
        if split == "train":
            train_counts = np.bincount(ids, minlength=len(vocab))
    # Ids in the order of decreasing training count, as vocab.txt says.
    assert vocab.counts[3:] == train_counts[3:].tolist()
    assert (np.diff(train_counts[3:]) <= 0).all()
    floor = meta["entropy_floor"]
    assert floor["perplexity"] == pytest.approx(math.exp(floor["nats_per_token"]))
    assert floor["test_oracle_perplexity"] == pytest.approx(
        math.exp(floor["test_oracle_nats_per_token"])
    )
    assert 0 < floor["nats_per_token"] < math.log(TINY.branching + 1)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = prepare_synthetic(TINY, tmp_path / "a")
    b = prepare_synthetic(TINY, tmp_path / "b")
    assert a.name == b.name and _bytes(a) == _bytes(b)
    c = prepare_synthetic(dataclasses.replace(TINY, seed=TINY.seed + 1), tmp_path / "a")
    assert c != a
    assert (c / "train.bin").read_bytes() != (a / "train.bin").read_bytes()


def test_valid_and_test_do_not_depend_on_the_train_size(tmp_path):
    # Each split has its own random stream: a bigger train split changes the id order (by
    # training count) but not the words of valid and test.
    a = prepare_synthetic(TINY, tmp_path)
    b = prepare_synthetic(dataclasses.replace(TINY, train_tokens=2 * TINY.train_tokens), tmp_path)
    assert a != b
    for split in ("valid", "test"):
        words_a = Vocabulary.load(a / "vocab.txt").decode(read_split(a, split).tolist())
        words_b = Vocabulary.load(b / "vocab.txt").decode(read_split(b, split).tolist())
        assert words_a == words_b


def test_idempotent(tmp_path, capsys):
    folder = prepare_synthetic(TINY, tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    capsys.readouterr()
    assert prepare_synthetic(TINY, tmp_path) == folder
    assert "up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    # A truncated split, or an unfinished folder (no meta.json), is generated again.
    (folder / "train.bin").write_bytes(b"")
    prepare_synthetic(TINY, tmp_path)
    assert read_split(folder, "train").size == read_meta(folder)["splits"]["train"]["tokens"]
    (folder / "meta.json").unlink()
    (folder / "test.bin").write_bytes(b"")
    prepare_synthetic(TINY, tmp_path)
    assert read_split(folder, "test").size == read_meta(folder)["splits"]["test"]["tokens"]


def test_cli(tmp_path, capsys):
    assert synthetic.main(["--out", str(tmp_path), "--preset", "tiny", "--n-topics", "3"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    folder = tmp_path / out[-1].split("/")[-1]
    assert out[-1] == str(folder)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["recipe"]["n_topics"] == 3
    with pytest.raises(SystemExit) as error:
        synthetic.main(["--out", str(tmp_path), "--preset", "tiny", "--branching", "0"])
    assert error.value.code == 2
    capsys.readouterr()
    # An --out that is a file is bad input too: one line, exit status 2.
    (tmp_path / "a-file").write_text("")
    assert synthetic.main(["--out", str(tmp_path / "a-file"), "--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "a-file" in err


def test_config_validation():
    with pytest.raises(ValueError, match="topic_words"):
        SyntheticConfig(n_words=10, topic_words=11)
    with pytest.raises(ValueError, match="mean_sentence_length"):
        SyntheticConfig(mean_sentence_length=0.5)


# ---------------------------------------------------------------------------------- topics

# The tiny preset's token streams as generator markov-topics/1 wrote them, before the topics
# were stored: storing them must leave every byte of the streams as it was.
TINY_STREAM_SHA256 = {
    "train": "abe21fb52a2b49628cfc6cd58fc325fd89d8db21479af5624fbba9db5bb4c938",
    "valid": "a5ec4c9b64c8dc5d974db62f5b197869b44040280f125be5d68a604db4e4bcb8",
    "test": "8f2774119490a384d350a4717e1658d95e4380af6a5afe890fbf640145be33ed",
}


def test_valid_and_test_topics_are_stored_beside_unchanged_streams(tmp_path):
    folder = prepare_synthetic(TINY, tmp_path)
    meta = read_meta(folder)
    assert {s: e["sha256"] for s, e in meta["splits"].items()} == TINY_STREAM_SHA256
    assert "extra" not in meta["splits"]["train"]
    # The topics' slices, as prepare_synthetic draws them (its first seed).
    seeds = np.random.SeedSequence(TINY.seed).spawn(1 + len(SPLITS))
    topics = build_topics(TINY, np.random.default_rng(seeds[0]))
    vocab = Vocabulary.load(folder / "vocab.txt")
    for split in ("valid", "test"):
        entry = meta["splits"][split]
        assert entry["extra"] == {"topic": f"{split}.topic"}
        stored = read_split_extra(folder, split, "topic", meta)
        assert len(stored) == entry["sentences"]
        ids = read_split(folder, split, meta)
        ends = np.flatnonzero(ids == 1)
        for topic, start, end in zip(map(int, stored), [-1, *ends[:-1]], ends, strict=True):
            assert 0 <= topic < TINY.n_topics
            # vocabulary word `w0042` is raw token 3 + 42: every word is in its topic's slice
            raw = {3 + int(w[1:]) for w in vocab.decode(ids[start + 1 : end].tolist())}
            assert raw <= set(topics.state_token[topic].tolist())
    assert len(set(read_split_extra(folder, "test", "topic", meta))) > 1


def test_a_folder_without_its_topic_file_is_prepared_again(tmp_path):
    folder = prepare_synthetic(TINY, tmp_path)
    (folder / "test.topic").unlink()
    assert prepare_synthetic(TINY, tmp_path) == folder
    meta = read_meta(folder)
    sentences = meta["splits"]["test"]["sentences"]
    assert len(read_split_extra(folder, "test", "topic", meta)) == sentences
