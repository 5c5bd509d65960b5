"""A tiny prepared dataset, generated (never downloaded), in the format data_prep writes."""

from collections import Counter

import numpy as np
import pytest

from data_prep.binarize import recipe_id, token_dtype, write_meta, write_split
from data_prep.vocab import EOS_ID, Vocabulary


def make_dataset(folder, n_words=40, sentences=(400, 40, 40), seed=0):
    """Sentences from a random first-order Markov chain over `n_words` words: learnable, so a
    few training steps lower the loss."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(n_words)]
    successors = rng.integers(0, n_words, size=(n_words, 3))
    vocab = Vocabulary.from_counts(Counter({w: n_words - i for i, w in enumerate(words)}))
    folder.mkdir(parents=True, exist_ok=True)
    vocab_sha = vocab.save(folder / "vocab.txt")
    dtype = token_dtype(len(vocab))
    splits = {}
    for name, count in zip(("train", "valid", "test"), sentences, strict=True):
        sentences_ids = []
        for _ in range(count):
            word, sentence = int(rng.integers(n_words)), []
            for _ in range(int(rng.integers(3, 9))):
                sentence.append(vocab.index[words[word]])
                word = int(successors[word, rng.integers(3)])
            sentences_ids.append(sentence)
        splits[name] = write_split(folder / f"{name}.bin", sentences_ids, dtype, EOS_ID)
    recipe = {"kind": "test-markov", "n_words": n_words, "sentences": sentences, "seed": seed}
    write_meta(
        folder,
        {
            "dataset": "test-markov",
            "recipe": recipe,
            "recipe_id": recipe_id(recipe),
            "vocab": {"file": "vocab.txt", "size": len(vocab), "sha256": vocab_sha},
            "dtype": dtype.name,
            "splits": splits,
        },
    )
    return folder


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "tiny")
