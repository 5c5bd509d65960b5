"""Word vocabulary: counting, cut-offs, and the id <-> word mapping stored beside every dataset.

Ids are assigned in a fixed order: the three special symbols first (`<S>` = 0, `</S>` = 1,
`<UNK>` = 2, the lm1b benchmark's spellings), then words by decreasing count, ties broken by
the word itself. Frequency order is what a log-uniform (Zipfian) candidate sampler for the
sampled softmax assumes, and the tie-break makes the file identical on every machine.

The file `vocab.txt` holds one `word<TAB>count` line per id; the specials have count 0.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lstm_moe.files import BOS_ID, EOS_ID, UNK_ID

BOS, EOS, UNK = "<S>", "</S>", "<UNK>"
SPECIALS = (BOS, EOS, UNK)
# Their ids (BOS_ID, EOS_ID, UNK_ID) are the dataset format's, from lstm_moe.files.
assert tuple(SPECIALS.index(s) for s in SPECIALS) == (BOS_ID, EOS_ID, UNK_ID)


def count_words(sentences: Iterable[list[str]], counts: Counter | None = None) -> Counter:
    """Add the words of every sentence (a list of tokens) to `counts` and return it."""
    counts = Counter() if counts is None else counts
    for words in sentences:
        counts.update(words)
    return counts


@dataclass
class Vocabulary:
    """words[i] is the word with id i; counts[i] its training count (0 for the specials)."""

    words: list[str]
    counts: list[int]

    def __post_init__(self) -> None:
        if tuple(self.words[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with {SPECIALS}, got {self.words[:3]}")
        if len(set(self.words)) != len(self.words):
            raise ValueError("a vocabulary must not repeat a word")
        self.index = {word: i for i, word in enumerate(self.words)}

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_counts(
        cls, counts: Counter, min_count: int = 1, max_size: int | None = None
    ) -> Vocabulary:
        """Keep words seen at least `min_count` times, the most frequent first, and at most
        `max_size` entries including the three specials.

        The lm1b benchmark's vocabulary is min_count=3 over the training shards (793,471
        entries with the specials)."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        if max_size is not None and max_size <= len(SPECIALS):
            raise ValueError(f"max_size must be > {len(SPECIALS)} (the specials), got {max_size}")
        kept = [(w, c) for w, c in counts.items() if c >= min_count and w not in SPECIALS]
        kept.sort(key=lambda item: (-item[1], item[0]))
        if max_size is not None:
            kept = kept[: max_size - len(SPECIALS)]
        return cls([*SPECIALS, *(w for w, _ in kept)], [0] * len(SPECIALS) + [c for _, c in kept])

    # ------------------------------------------------------------------ mapping

    def __len__(self) -> int:
        return len(self.words)

    @property
    def bos_id(self) -> int:
        return 0

    @property
    def eos_id(self) -> int:
        return 1

    @property
    def unk_id(self) -> int:
        return 2

    def encode(self, words: list[str]) -> list[int]:
        """Word ids of one sentence (out-of-vocabulary words map to `<UNK>`), no markers."""
        get, unk = self.index.get, self.unk_id
        return [get(word, unk) for word in words]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.words[i] for i in ids]

    # ------------------------------------------------------------------ file

    def save(self, path: Path) -> str:
        """Write `vocab.txt` atomically; returns its sha256."""
        from lstm_moe.files import write_text_atomic

        text = "".join(f"{w}\t{c}\n" for w, c in zip(self.words, self.counts, strict=True))
        write_text_atomic(path, text)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        words, counts = [], []
        for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            word, sep, count = line.rpartition("\t")
            if not sep:
                raise ValueError(f"{path}:{n}: expected 'word<TAB>count', got {line!r}")
            words.append(word)
            counts.append(int(count))
        return cls(words, counts)
