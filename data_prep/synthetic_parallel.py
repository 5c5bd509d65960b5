"""A generated parallel corpus with reordering and topic-dependent word choice; needs no network.

Command: `python -m data_prep.synthetic_parallel --out data [--preset tiny|demo] [--seed N ...]`.
It writes the text into `OUT/synthetic-parallel-text-<id>/` ({train,valid,test}.{src,tgt}, one
sentence per line, `<split>.topic` with each pair's topic, `lexicon.json`), then binarizes it
through data_prep.parallel into `OUT/synthetic-parallel-src-tgt-<recipe_id>/`, whose path is
the last line on stdout. The valid and test topics are copied into that folder
(`valid.topic`, `test.topic`, listed in meta["splits"][split]["extra"]): evaluation splits are
never filtered, so line i is pair i, and a tool can measure how much the experts' choices tell
about the topic (their mutual information).

The source language. Words are made of consonant-vowel syllables. A sentence is

    DET ADJ* NOUN  VERB  DET ADJ* NOUN  [PREP DET ADJ* NOUN]  .

(subject, verb, object, an optional prepositional phrase; 0 to `max_adjectives` adjectives per
noun phrase), 6 to 15 words. Nouns, adjectives and verbs are drawn with Zipf(`zipf`) weights
over their ranks. Sentences come in documents (a geometric number, mean
`sentences_per_document`), each about one of `n_topics` topics drawn uniformly.

The target language is the source translated by rule:
  * reordering: adjectives follow their noun (`DET NOUN ADJ*`, the adjectives in source order)
    and the verb goes to the end of the sentence (subject, object, prepositional phrase, verb),
    so a word's translation can be several positions away from it, in either direction;
  * agreement: each target noun has a gender (0 or 1) and the target determiner depends on it,
    so the determiner, which comes first, depends on a noun that comes after the adjectives;
  * topic-dependent word choice: the `n_ambiguous` most frequent nouns, adjectives and verbs
    (frequent words are the polysemous ones, as in natural language) have one translation per
    topic, all different; every other word has a single translation.
The topic is marked only by context words: each topic owns `topic_nouns` nouns found in no
other topic's sentences, and every sentence holds at least one of its topic's (one noun phrase
chosen at random; each other noun phrase with probability `context_prob`). So translating an
ambiguous word needs the context noun, which may come before or after it, and the words of one
topic form a subset that an expert can specialise in.

meta.json (key "synthetic") adds the BLEU of two rule-based baselines on valid and test,
computed with sacreBLEU against the references: the correct words in source order
(`monotone`: what no reordering costs) and the correct order with every ambiguous word
translated as in topic 0 (`topic_blind`: what ignoring the context costs). A model that
learned both rules reaches 100. Everything follows from `seed`, drawn with Python's
`random.Random` (whose methods may change between Python versions: the version is part of the
recipe).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import sacrebleu

from data_prep.binarize import recipe_id
from data_prep.parallel import (
    EVAL_SPLITS,
    SPLITS,
    FilePair,
    ParallelConfig,
    PrepareError,
    prepare_parallel,
)
from data_prep.wordpieces import VocabularyError, WordpieceConfig
from lstm_moe.files import PATH_ERRORS, write_json_atomic, write_text_atomic

GENERATOR = "synthetic-parallel/1"  # bump when the generation changes
NAME = "synthetic-parallel"
SRC, TGT = "src", "tgt"  # the language codes: the files are <split>.src and <split>.tgt
_SRC_LETTERS = ("bdgklmnprst", "aeiou")  # consonants, vowels of the source words
_TGT_LETTERS = ("cfhjvwxz", "aeiouy")  # disjoint consonants: no word is in both languages
_N_DETERMINERS, _N_PREPOSITIONS = 4, 5
_DONE = "generated.json"  # written last into a complete text folder


@dataclass(frozen=True)
class SyntheticParallelConfig:
    seed: int = 1
    n_topics: int = 8
    n_nouns: int = 120  # shared by all topics
    n_adjectives: int = 60
    n_verbs: int = 60
    n_ambiguous: int = 20  # of each of nouns, adjectives, verbs: translated per topic
    topic_nouns: int = 16  # context nouns owned by each topic
    zipf: float = 1.0
    max_adjectives: int = 2
    pp_prob: float = 0.5  # a prepositional phrase
    context_prob: float = 0.3  # a noun phrase beyond the first holds a topic noun
    sentences_per_document: float = 6.0
    train_pairs: int = 60_000
    valid_pairs: int = 1_000
    test_pairs: int = 1_000
    vocab_size: int = 1_000  # wordpieces

    def __post_init__(self) -> None:
        checks = [
            (self.n_topics >= 1, "n_topics must be >= 1"),
            (min(self.n_nouns, self.n_adjectives, self.n_verbs) >= 1,
             "n_nouns, n_adjectives and n_verbs must be >= 1"),
            (0 <= self.n_ambiguous <= min(self.n_nouns, self.n_adjectives, self.n_verbs),
             "n_ambiguous must be in [0, the smallest of n_nouns, n_adjectives, n_verbs]"),
            (self.topic_nouns >= 1, "topic_nouns must be >= 1"),
            (self.zipf >= 0, "zipf must be >= 0"),
            (self.max_adjectives >= 0, "max_adjectives must be >= 0"),
            (0 <= self.pp_prob <= 1 and 0 <= self.context_prob <= 1,
             "pp_prob and context_prob must be in [0, 1]"),
            (self.sentences_per_document >= 1, "sentences_per_document must be >= 1"),
            (min(self.train_pairs, self.valid_pairs, self.test_pairs) >= 1,
             "train_pairs, valid_pairs and test_pairs must be >= 1"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message}; got {self}")

    def pairs(self, split: str) -> int:
        return {"train": self.train_pairs, "valid": self.valid_pairs, "test": self.test_pairs}[
            split
        ]


PRESETS = {
    # For demos: 60,000 pairs of 6 to 15 words, 1,179 distinct words, generated and binarized
    # in 14 s on 2 cores; meant to be learned by a 64-wide model in minutes on 2 CPU cores
    # (not measured yet: no translation model trains in this repository so far).
    "demo": SyntheticParallelConfig(),
    # For tests: generates and binarizes in well under a second.
    "tiny": SyntheticParallelConfig(
        n_topics=4,
        n_nouns=30,
        n_adjectives=12,
        n_verbs=12,
        n_ambiguous=6,
        topic_nouns=6,
        train_pairs=2_000,
        valid_pairs=200,
        test_pairs=200,
        vocab_size=200,
    ),
}


# --------------------------------------------------------------------------- the lexicon


@dataclass(frozen=True)
class Lexicon:
    """The words of both languages and the translation rules.

    translation[word][t]: the target word for source `word` in topic t (the same for every t
    unless the word is ambiguous); gender[target noun]: 0 or 1; target_determiners[d][g]: the
    target of source determiner d before a noun of gender g."""

    determiners: list[str]
    prepositions: list[str]
    nouns: list[str]  # by rank (frequency order)
    adjectives: list[str]
    verbs: list[str]
    topic_nouns: list[list[str]]  # [topic][i]
    translation: dict[str, list[str]]
    gender: dict[str, int]
    target_determiners: list[list[str]]


def _words(rng: random.Random, n: int, letters: tuple[str, str], syllables: tuple[int, int],
           taken: set[str]) -> list[str]:  # fmt: skip
    """n new distinct words of `syllables` consonant-vowel syllables (added to `taken`)."""
    consonants, vowels = letters
    words: list[str] = []
    for _ in range(100 * n + 10_000):  # a bound, for word counts the syllables cannot give
        if len(words) == n:
            return words
        k = rng.randint(*syllables)
        word = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(k))
        if word not in taken:
            taken.add(word)
            words.append(word)
    if len(words) == n:
        return words
    raise ValueError(f"cannot make {n} distinct words of {syllables} syllables: ask for fewer")


def build_lexicon(config: SyntheticParallelConfig, rng: random.Random) -> Lexicon:
    T = config.n_topics
    src_taken: set[str] = set()
    tgt_taken: set[str] = set()

    def src(n: int, syllables=(2, 3)) -> list[str]:
        return _words(rng, n, _SRC_LETTERS, syllables, src_taken)

    def tgt(n: int, syllables=(2, 3)) -> list[str]:
        return _words(rng, n, _TGT_LETTERS, syllables, tgt_taken)

    determiners, prepositions = src(_N_DETERMINERS, (1, 1)), src(_N_PREPOSITIONS, (1, 1))
    nouns, adjectives = src(config.n_nouns), src(config.n_adjectives)
    verbs = src(config.n_verbs)
    topic_nouns = [src(config.topic_nouns) for _ in range(T)]

    translation: dict[str, list[str]] = {}
    for words in (nouns, adjectives, verbs):
        for rank, word in enumerate(words):
            translation[word] = tgt(T) if rank < config.n_ambiguous else tgt(1) * T
    for word in itertools.chain(*topic_nouns):
        translation[word] = tgt(1) * T
    for word in prepositions:
        translation[word] = tgt(1, (1, 1)) * T
    target_determiners = [tgt(2, (1, 1)) for _ in determiners]
    translated_nouns = {t for w in [*nouns, *itertools.chain(*topic_nouns)] for t in translation[w]}
    gender = {noun: rng.randrange(2) for noun in sorted(translated_nouns)}
    return Lexicon(determiners, prepositions, nouns, adjectives, verbs, topic_nouns, translation,
                   gender, target_determiners)  # fmt: skip


# --------------------------------------------------------------------------- sentences


@dataclass(frozen=True)
class NounPhrase:
    determiner: int
    adjectives: tuple[str, ...]
    noun: str


@dataclass(frozen=True)
class Sentence:
    """One generated sentence, in structure; `source()` and `target()` spell it."""

    topic: int
    subject: NounPhrase
    verb: str
    object: NounPhrase
    preposition: int | None  # with `phrase`, the optional prepositional phrase
    phrase: NounPhrase | None

    def source(self, lex: Lexicon) -> list[str]:
        words = [*self._np(self.subject, lex), self.verb, *self._np(self.object, lex)]
        if self.phrase is not None:
            words += [lex.prepositions[self.preposition], *self._np(self.phrase, lex)]
        return [*words, "."]

    def target(self, lex: Lexicon, order: bool = True, topic: int | None = None) -> list[str]:
        """The translation; `order=False` keeps the source order (the monotone baseline), and
        `topic` translates as if the sentence were about another topic (the topic-blind one)."""
        t = self.topic if topic is None else topic

        def phrase(np_: NounPhrase) -> list[str]:
            noun = lex.translation[np_.noun][t]
            determiner = lex.target_determiners[np_.determiner][lex.gender[noun]]
            adjectives = [lex.translation[a][t] for a in np_.adjectives]
            return [determiner, noun, *adjectives] if order else [determiner, *adjectives, noun]

        verb = lex.translation[self.verb][t]
        pp = []
        if self.phrase is not None:
            pp = [lex.translation[lex.prepositions[self.preposition]][t], *phrase(self.phrase)]
        if order:  # subject, object, prepositional phrase, verb
            return [*phrase(self.subject), *phrase(self.object), *pp, verb, "."]
        return [*phrase(self.subject), verb, *phrase(self.object), *pp, "."]

    @staticmethod
    def _np(np_: NounPhrase, lex: Lexicon) -> list[str]:
        return [lex.determiners[np_.determiner], *np_.adjectives, np_.noun]


class Generator:
    """Draws sentences of a topic from the lexicon with one random.Random."""

    def __init__(self, config: SyntheticParallelConfig, lex: Lexicon, rng: random.Random):
        self.config, self.lex, self.rng = config, lex, rng
        weights = [(rank + 1) ** -config.zipf for rank in range(max(
            config.n_nouns, config.n_adjectives, config.n_verbs))]  # fmt: skip
        self.cum = {
            name: list(itertools.accumulate(weights[: len(words)]))
            for name, words in (("n", lex.nouns), ("a", lex.adjectives), ("v", lex.verbs))
        }

    def _zipf(self, kind: str, words: list[str]) -> str:
        return self.rng.choices(words, cum_weights=self.cum[kind])[0]

    def _noun_phrase(self, topic: int, context: bool) -> NounPhrase:
        rng, lex = self.rng, self.lex
        noun = rng.choice(lex.topic_nouns[topic]) if context else self._zipf("n", lex.nouns)
        n_adj = rng.randint(0, self.config.max_adjectives)
        adjectives = tuple(self._zipf("a", lex.adjectives) for _ in range(n_adj))
        return NounPhrase(rng.randrange(len(lex.determiners)), adjectives, noun)

    def sentence(self, topic: int) -> Sentence:
        rng, config = self.rng, self.config
        n_phrases = 3 if rng.random() < config.pp_prob else 2
        forced = rng.randrange(n_phrases)  # the noun phrase sure to hold a topic noun
        phrases = [
            self._noun_phrase(topic, i == forced or rng.random() < config.context_prob)
            for i in range(n_phrases)
        ]
        verb = self._zipf("v", self.lex.verbs)
        preposition = rng.randrange(len(self.lex.prepositions)) if n_phrases == 3 else None
        return Sentence(topic, phrases[0], verb, phrases[1], preposition,
                        phrases[2] if n_phrases == 3 else None)  # fmt: skip

    def split(self, n: int) -> list[Sentence]:
        """n sentences in documents of one topic each."""
        sentences, topic = [], None
        p_new = 1.0 / self.config.sentences_per_document
        for _ in range(n):
            if topic is None or self.rng.random() < p_new:
                topic = self.rng.randrange(self.config.n_topics)
            sentences.append(self.sentence(topic))
        return sentences


def generate(config: SyntheticParallelConfig) -> tuple[Lexicon, dict[str, list[Sentence]]]:
    """The lexicon and every split, from `config.seed` alone (each split its own stream)."""
    lex = build_lexicon(config, random.Random(config.seed))
    splits = {
        split: Generator(config, lex, random.Random(config.seed * 10 + i + 1)).split(
            config.pairs(split)
        )
        for i, split in enumerate(SPLITS)
    }
    return lex, splits


def baseline_bleu(lex: Lexicon, sentences: list[Sentence]) -> dict[str, float]:
    """sacreBLEU of the monotone and the topic-blind rule-based translations (module docstring)."""
    refs = [" ".join(s.target(lex)) for s in sentences]
    systems = {
        "monotone": [" ".join(s.target(lex, order=False)) for s in sentences],
        "topic_blind": [" ".join(s.target(lex, topic=0)) for s in sentences],
    }
    return {
        name: round(sacrebleu.corpus_bleu(hyps, [refs], force=True).score, 2)
        for name, hyps in systems.items()
    }


# --------------------------------------------------------------------------- the files


def generator_recipe(config: SyntheticParallelConfig) -> dict:
    python = ".".join(map(str, sys.version_info[:2]))  # random.Random's methods may change
    return {"generator": GENERATOR, "python": python, "config": dataclasses.asdict(config)}


def text_folder(config: SyntheticParallelConfig, out: Path) -> Path:
    rid = recipe_id(generator_recipe(config))
    return Path(out) / f"{NAME}-text-{rid}"


def write_text(config: SyntheticParallelConfig, out: Path) -> tuple[Path, dict]:
    """The text folder (generated unless complete) and the baselines of its meta."""
    folder = text_folder(config, out)
    done = folder / _DONE
    if done.is_file():
        return folder, json.loads(done.read_text(encoding="utf-8"))["baseline_bleu"]
    lex, splits = generate(config)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for split, sentences in splits.items():
            for name, lines in (
                (SRC, (" ".join(s.source(lex)) for s in sentences)),
                (TGT, (" ".join(s.target(lex)) for s in sentences)),
                ("topic", (str(s.topic) for s in sentences)),
            ):
                write_text_atomic(tmp / f"{split}.{name}", "".join(f"{x}\n" for x in lines))
        write_json_atomic(tmp / "lexicon.json", dataclasses.asdict(lex))
        baselines = {split: baseline_bleu(lex, splits[split]) for split in EVAL_SPLITS}
        write_json_atomic(
            tmp / _DONE,
            {**generator_recipe(config), "baseline_bleu": baselines},
        )  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder, baselines


def prepare_synthetic_parallel(
    config: SyntheticParallelConfig, out: Path, progress: bool = True
) -> Path:
    """Generate (or find) the text, then build (or find) the binarized folder; returns it."""
    text, baselines = write_text(config, out)
    corpus = {
        split: [FilePair(text / f"{split}.{SRC}", text / f"{split}.{TGT}")] for split in SPLITS
    }
    parallel_config = ParallelConfig(
        name=NAME,
        src_lang=SRC,
        tgt_lang=TGT,
        wordpieces=WordpieceConfig(vocab_size=config.vocab_size),
        # Both sides have the same number of words by construction: nothing to clean, and a
        # ratio of wordpieces (words split differently in the two languages) would only
        # remove good pairs. A word is at most 3 syllables, so 10 keeps every pair.
        max_ratio=10.0,
    )
    generator = generator_recipe(config)
    return prepare_parallel(
        parallel_config,
        corpus,
        out,
        extra_files={split: {"topic": text / f"{split}.topic"} for split in EVAL_SPLITS},
        extra_recipe={"synthetic": generator},
        extra_meta={
            "synthetic": {**generator, "text": str(text.resolve()), "baseline_bleu": baselines}
        },
        progress=progress,
    )


# --------------------------------------------------------------------------- command line

_HELP = {
    "seed": "seed of everything generated",
    "n_topics": "topics (a document is about one)",
    "n_nouns": "nouns shared by all topics",
    "n_adjectives": "adjectives",
    "n_verbs": "verbs",
    "n_ambiguous": "most frequent nouns, adjectives and verbs (each) translated per topic",
    "topic_nouns": "context nouns owned by each topic",
    "zipf": "Zipf exponent of word frequencies over ranks",
    "max_adjectives": "adjectives per noun phrase, at most",
    "pp_prob": "probability of a prepositional phrase",
    "context_prob": "probability that another noun phrase holds a topic noun too",
    "sentences_per_document": "mean sentences per document (geometric)",
    "train_pairs": "training pairs",
    "valid_pairs": "validation pairs",
    "test_pairs": "test pairs",
    "vocab_size": "wordpieces of the shared vocabulary",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.synthetic_parallel",
        description="Generate a parallel corpus whose target reorders the source (adjectives"
        " after nouns, verb last) and translates its frequent words by topic, a topic marked"
        " only by context words; write it as text, then binarize it with data_prep.parallel"
        " into OUT/synthetic-parallel-src-tgt-<recipe_id>/ (printed last).",
    )
    parser.add_argument("--out", type=Path, required=True, help="parent folder of the outputs")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="default demo")
    for f in dataclasses.fields(SyntheticParallelConfig):
        default = getattr(PRESETS["demo"], f.name)
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(default),
            default=None,
            help=f"{_HELP[f.name]} (demo preset: {default})",
        )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(SyntheticParallelConfig)
        if getattr(args, f.name) is not None
    }
    try:
        config = dataclasses.replace(PRESETS[args.preset], **overrides)
    except ValueError as error:
        parser.error(str(error))
    try:
        folder = prepare_synthetic_parallel(config, args.out, progress=not args.no_progress)
    except (PrepareError, VocabularyError, ValueError, *PATH_ERRORS) as error:  # bad input
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the disk failed or is full
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
