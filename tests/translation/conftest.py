"""A tiny parallel dataset, generated (never downloaded) and prepared by data_prep.parallel, so
the folder is exactly what the pipeline writes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from data_prep.parallel import FilePair, ParallelConfig, prepare_parallel
from data_prep.wordpieces import WordpieceConfig

CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"


def made_up_words(rng: random.Random, n: int) -> list[str]:
    """n distinct words of one to three consonant-vowel syllables."""
    words: set[str] = set()
    while len(words) < n:
        syllables = rng.randint(1, 3)
        words.add("".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(syllables)))
    return sorted(words)


def make_parallel_dataset(
    root: Path,
    *,
    src_lang: str = "en",
    tgt_lang: str = "de",
    seed: int = 0,
    n_words: int = 60,
    pairs: tuple[int, int, int] = (2000, 100, 100),
    vocab_size: int = 120,
) -> Path:
    """A "reverse the words" corpus: each source is 3 to 8 words of a made-up lexicon, its
    target the same words in reverse order (learnable, and only through the attention: word
    j of the target is word |X| - j of the source). Written as text under root/text and
    prepared under root/data; returns the dataset folder."""
    rng = random.Random(seed)
    lexicon = made_up_words(rng, n_words)
    text = Path(root) / "text"
    text.mkdir(parents=True, exist_ok=True)
    corpus = {}
    for split, count in zip(("train", "valid", "test"), pairs, strict=True):
        sources = [[rng.choice(lexicon) for _ in range(rng.randint(3, 8))] for _ in range(count)]
        src, tgt = text / f"{split}.{src_lang}", text / f"{split}.{tgt_lang}"
        src.write_text("".join(" ".join(words) + "\n" for words in sources))
        tgt.write_text("".join(" ".join(reversed(words)) + "\n" for words in sources))
        corpus[split] = [FilePair(src, tgt)]
    config = ParallelConfig("reverse", src_lang, tgt_lang, WordpieceConfig(vocab_size=vocab_size))
    generator = {"kind": "test-reverse", "seed": seed, "n_words": n_words, "pairs": pairs}
    return prepare_parallel(
        config, corpus, Path(root) / "data", extra_recipe={"generator": generator}, progress=False
    )


@pytest.fixture(scope="session")
def parallel_dataset(tmp_path_factory) -> Path:
    return make_parallel_dataset(tmp_path_factory.mktemp("parallel"))
