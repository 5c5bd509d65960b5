"""A generated multi-topic corpus with an exactly known entropy floor; needs no network.

The language
------------
A shared vocabulary of `n_words` words (`w0000`, `w0001`, ...) and `n_topics` topics. Each topic
owns a slice of `topic_words` distinct words drawn from the shared vocabulary (slices overlap,
so a single word rarely identifies its topic) and a first-order Markov chain over the states
{`</S>`, the words of its slice}:

  - after `</S>` (the first word of a sentence): one of `branching` candidate words;
  - after a word: `</S>` with probability p_end = 1 / `mean_sentence_length` (sentence lengths
    are geometric with that mean), otherwise one of `branching` successor words.

Each state's candidates are drawn without replacement with Zipf(`word_zipf`) weights over the
slice's ranks (every topic has its own frequent and rare words), and their probabilities are
Dirichlet(`alpha`). A document picks a topic (Zipf(`topic_zipf`) over topic ranks; 0 is uniform)
and emits a geometric number of sentences (mean `sentences_per_document`) from that topic's
chain. Each split is an independent stream of documents, cut after the first sentence that
reaches the split's token budget. Everything follows from `seed`.

A model has to infer the topic from the words it has seen and hold n_topics × (topic_words + 1)
distinct next-word distributions: with many topics, capacity is what limits a model, which is
the regime where a mixture of experts should beat a dense model of equal compute.

The floor
---------
Let T_i be the topic of the document holding token X_i. Given the topic, the chain is Markov,
so for any model q that is not told the topic (in the stream layout of `binarize.py`)

    E[-log q(X_i | X_<i)] >= H(X_i | X_<i) >= H(X_i | X_<i, T_i) = H(X_i | X_i-1, T_i),

since cross entropy is at least entropy and conditioning never increases entropy. Averaged over
a long stream, the right-hand side is the entropy rate given the topic,

    H = Σ_t w_t H_t,   H_t = Σ_s π_t(s) H_t(next | s),

with π_t the stationary distribution of topic t's chain (the `</S>` state included, so every
`</S>` is counted as a token, as in the perplexity), and w_t the share of tokens that come from
topic t. It is computed exactly by `entropy_floor` from renewal arguments: a sentence is a
path from `</S>` back to `</S>`, so a rate is (expected nats per sentence) / (expected tokens
per sentence), and the mixture over topics weights each topic by its document probability
(the number of sentences of a document does not depend on its topic).

meta.json stores that rate and, for the generated valid and test splits, the oracle score: the
mean of -log p(x_i | x_i-1, t_i) under the true chains over the split's tokens. No model can beat
the oracle in expectation; on a split of N tokens the oracle differs from the exact rate by
sampling noise of order 1/sqrt(N), which is why the test perplexity is best compared with the
test oracle.

The valid and test splits come with `valid.topic` and `test.topic`, the topic of each of their
sentences, one line per sentence in stream order (listed in meta["splits"][split]["extra"], as
the parallel corpus lists its own): evaluation can then measure what the experts learned about
the topic (eval.experts: the mutual information of topic and expert choice).

Command: `python -m data_prep.synthetic --out data [--preset tiny] [--n-topics 128 ...]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.binarize import (
    SPLITS,
    SplitWriter,
    is_prepared,
    recipe_id,
    token_dtype,
    write_meta,
)
from data_prep.vocab import EOS, SPECIALS, Vocabulary
from lstm_moe.files import PATH_ERRORS, write_text_atomic

# Bump when the sampling or the folder's files change, so old folders are not reused: /2 adds
# the valid and test topics (the token streams are those of /1, byte for byte).
GENERATOR = "markov-topics/2"
_EOS_ID = SPECIALS.index(EOS)
TOPIC_SPLITS = ("valid", "test")  # the splits whose sentence topics are stored
_MAX_DOCS_PER_CHUNK = 4096  # documents sampled in parallel (about 10^6 tokens by default)


@dataclass(frozen=True)
class SyntheticConfig:
    seed: int = 1
    n_topics: int = 64
    n_words: int = 4096  # shared vocabulary, without the three specials
    topic_words: int = 256  # words in each topic's slice
    branching: int = 6  # candidate next words of each state
    alpha: float = 1.0  # Dirichlet concentration of the candidates' probabilities
    word_zipf: float = 1.0  # Zipf exponent of candidate selection over a slice's ranks
    mean_sentence_length: float = 20.0  # words per sentence, without </S>
    sentences_per_document: float = 10.0
    topic_zipf: float = 0.0  # Zipf exponent of the topic of a document (0: uniform)
    train_tokens: int = 2_000_000
    valid_tokens: int = 100_000
    test_tokens: int = 100_000

    def __post_init__(self) -> None:
        checks = [
            (self.n_topics >= 1, "n_topics must be >= 1"),
            (self.n_words >= 1, "n_words must be >= 1"),
            (1 <= self.topic_words <= self.n_words, "topic_words must be in [1, n_words]"),
            (1 <= self.branching <= self.topic_words, "branching must be in [1, topic_words]"),
            (self.alpha > 0, "alpha must be > 0"),
            (self.word_zipf >= 0 and self.topic_zipf >= 0, "Zipf exponents must be >= 0"),
            (
                math.isfinite(self.mean_sentence_length) and self.mean_sentence_length >= 1,
                "mean_sentence_length must be finite and >= 1",
            ),
            (
                math.isfinite(self.sentences_per_document) and self.sentences_per_document >= 1,
                "sentences_per_document must be finite and >= 1",
            ),
            (
                min(self.train_tokens, self.valid_tokens, self.test_tokens) >= 1,
                "token counts must be >= 1",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message}; got {self}")

    def split_tokens(self, split: str) -> int:
        return {"train": self.train_tokens, "valid": self.valid_tokens, "test": self.test_tokens}[
            split
        ]


PRESETS = {
    "default": SyntheticConfig(),
    # For tests and smoke runs: generates in milliseconds.
    "tiny": SyntheticConfig(
        n_topics=4,
        n_words=64,
        topic_words=24,
        branching=3,
        mean_sentence_length=8.0,
        sentences_per_document=4.0,
        train_tokens=5_000,
        valid_tokens=1_000,
        test_tokens=1_000,
    ),
}


# ---------------------------------------------------------------------------------- the chains


@dataclass(frozen=True)
class MarkovTopics:
    """Sparse transition tables of every topic's chain (T topics, K = topic_words, B = branching).

    A state is a slice position 0..K-1 or K for `</S>`; option B of every state leads to `</S>`
    (probability 0 from the `</S>` state itself: sentences are never empty).

    state_token: [T, K+1] int64, the raw token id of each state (3 + word index; `</S>` is 1)
    successor:   [T, K+1, B+1] int64, the next state of each option
    prob:        [T, K+1, B+1] float64, each option's probability (rows sum to 1)
    topic_prob:  [T] float64, the probability that a document is about each topic
    """

    state_token: np.ndarray
    successor: np.ndarray
    prob: np.ndarray
    topic_prob: np.ndarray

    @property
    def eos_state(self) -> int:
        return self.state_token.shape[1] - 1

    def transition(self, topic: int) -> np.ndarray:
        """The dense row-stochastic transition matrix [K+1, K+1] of one topic's chain."""
        n = self.state_token.shape[1]
        matrix = np.zeros((n, n))
        rows = np.broadcast_to(np.arange(n)[:, None], self.successor[topic].shape)
        np.add.at(matrix, (rows, self.successor[topic]), self.prob[topic])
        return matrix


def zipf_weights(n: int, exponent: float) -> np.ndarray:
    """[n] float64 probabilities ∝ (rank + 1)^-exponent."""
    w = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    return w / w.sum()


def build_topics(config: SyntheticConfig, rng: np.random.Generator) -> MarkovTopics:
    T, V, K, B = config.n_topics, config.n_words, config.topic_words, config.branching
    p_end = 1.0 / config.mean_sentence_length
    log_w = np.log(zipf_weights(K, config.word_zipf))  # [K]
    state_token = np.full((T, K + 1), _EOS_ID, dtype=np.int64)
    successor = np.full((T, K + 1, B + 1), K, dtype=np.int64)
    for t in range(T):
        # The slice: K distinct words, its order being the topic's Zipf ranks.
        state_token[t, :K] = len(SPECIALS) + rng.permutation(V)[:K]
        # B distinct candidates per state, drawn ∝ weights without replacement: the B largest
        # of log w + Gumbel noise (the Gumbel-top-k trick).
        keys = log_w + rng.gumbel(size=(K + 1, K))  # [K+1, K]
        top = np.argpartition(-keys, B - 1, axis=1)[:, :B]  # [K+1, B]
        successor[t, :, :B] = np.sort(top, axis=1)  # canonical order
    gamma = rng.gamma(config.alpha, size=(T, K + 1, B))  # Dirichlet(alpha) via normalized gammas
    total = gamma.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        dirichlet = np.where(total > 0, gamma / total, 1.0 / B)  # all-underflow rows: uniform
    prob = np.zeros((T, K + 1, B + 1))
    prob[:, :K, :B] = (1.0 - p_end) * dirichlet[:, :K]
    prob[:, :K, B] = p_end
    prob[:, K, :B] = dirichlet[:, K]
    topic_prob = zipf_weights(T, config.topic_zipf)
    return MarkovTopics(state_token, successor, prob, topic_prob)


# ---------------------------------------------------------------------------------- the floor


def _row_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in nats of each row of p [..., n], with 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    return terms.sum(axis=-1)


def sentence_entropy(transition: np.ndarray, eos: int) -> tuple[float, float]:
    """Expected (nats, tokens) per sentence of a chain that restarts at state `eos`.

    transition: [S, S] float64, row-stochastic. A sentence is the path from `eos` back to `eos`;
    its tokens are its words and the final `eos`. With Q the word-to-word block and s the
    start row, the expected visits to each word per sentence are v = s (I - Q)^-1, so

        tokens = 1 + Σ v,   nats = H(next | eos) + Σ_w v_w H(next | w),

    and nats / tokens is the chain's entropy rate Σ_s π(s) H(next | s) (renewal-reward)."""
    transition = np.asarray(transition, dtype=np.float64)
    words = np.arange(transition.shape[0]) != eos
    Q = transition[np.ix_(words, words)]  # [W, W]
    start = transition[eos, words]  # [W]
    visits = np.linalg.solve((np.eye(len(Q)) - Q).T, start)  # [W]  v (I - Q) = s
    h = _row_entropy(transition)  # [S]
    return float(h[eos] + visits @ h[words]), float(1.0 + visits.sum())


def entropy_floor(topics: MarkovTopics) -> float:
    """The entropy rate given the topic, in nats per token (see the module docstring)."""
    nats = tokens = 0.0
    for t, weight in enumerate(topics.topic_prob):
        n, k = sentence_entropy(topics.transition(t), topics.eos_state)
        nats, tokens = nats + weight * n, tokens + weight * k
    return nats / tokens


# ---------------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class Sample:
    """A generated split in raw token ids (3 + word index; `</S>` is 1).

    ids:               [N] int64, the stream; each sentence ends with `</S>`
    nll:               [N] float64, -log p(ids[i] | ids[i-1], topic) under the true chain
    sentence_tokens:   [S] int64, tokens of each sentence (with its `</S>`)
    sentence_topic:    [S] int64
    sentence_document: [S] int64, the document each sentence belongs to (0, 1, ...)
    """

    ids: np.ndarray
    nll: np.ndarray
    sentence_tokens: np.ndarray
    sentence_topic: np.ndarray
    sentence_document: np.ndarray


def _sample_sentences(
    topics: MarkovTopics, sentence_topic: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run every sentence's chain in parallel, one token per step for the unfinished ones.

    Returns the sentences concatenated in order: ids [N], nll [N], and tokens per sentence [S]."""
    eos = topics.eos_state
    cum = np.cumsum(topics.prob, axis=-1)  # [T, K+1, B+1]
    cum /= cum[..., -1:]  # exactly 1.0 at the end, so u < 1 never falls past the last option
    with np.errstate(divide="ignore"):
        neg_log = -np.log(topics.prob)  # inf only on options that are never drawn
    n = len(sentence_topic)
    state = np.full(n, eos)
    alive = np.arange(n)
    steps_sentence, steps_id, steps_nll = [], [], []
    while alive.size:
        t, s = sentence_topic[alive], state[alive]
        u = rng.random(alive.size)
        option = (cum[t, s] <= u[:, None]).sum(axis=1)  # [n_alive]  cum[j-1] <= u < cum[j]
        nxt = topics.successor[t, s, option]
        steps_sentence.append(alive)
        steps_id.append(topics.state_token[t, nxt])
        steps_nll.append(neg_log[t, s, option])
        state[alive] = nxt
        alive = alive[nxt != eos]
    sentence = np.concatenate(steps_sentence)
    # Steps are in time order, so a stable sort by sentence keeps each sentence's word order.
    order = np.argsort(sentence, kind="stable")
    ids = np.concatenate(steps_id)[order]
    nll = np.concatenate(steps_nll)[order]
    return ids, nll, np.bincount(sentence, minlength=n)


def sample_split(
    topics: MarkovTopics, config: SyntheticConfig, n_tokens: int, rng: np.random.Generator
) -> Sample:
    """Documents until `n_tokens` is reached, cut after the first sentence that reaches it."""
    tokens_per_document = config.sentences_per_document * (1 + config.mean_sentence_length)
    parts: list[tuple[np.ndarray, ...]] = []
    total = documents = 0
    while total < n_tokens:
        n_docs = min(_MAX_DOCS_PER_CHUNK, math.ceil(1.1 * (n_tokens - total) / tokens_per_document))
        doc_topic = rng.choice(len(topics.topic_prob), size=n_docs, p=topics.topic_prob)
        doc_sentences = rng.geometric(1.0 / config.sentences_per_document, size=n_docs)
        sentence_topic = np.repeat(doc_topic, doc_sentences)  # [S]
        sentence_document = documents + np.repeat(np.arange(n_docs), doc_sentences)  # [S]
        ids, nll, sentence_tokens = _sample_sentences(topics, sentence_topic, rng)
        ends = total + np.cumsum(sentence_tokens)  # [S]
        if ends[-1] >= n_tokens:  # keep the fewest whole sentences that reach the budget
            keep = int(np.searchsorted(ends, n_tokens)) + 1
            cut = int(ends[keep - 1] - total)
            ids, nll = ids[:cut], nll[:cut]
            sentence_tokens = sentence_tokens[:keep]
            sentence_topic, sentence_document = sentence_topic[:keep], sentence_document[:keep]
        parts.append((ids, nll, sentence_tokens, sentence_topic, sentence_document))
        total += len(ids)
        documents += n_docs
    return Sample(*(np.concatenate(column) for column in zip(*parts, strict=True)))


# ---------------------------------------------------------------------------------- the dataset


def recipe(config: SyntheticConfig) -> dict:
    return {"generator": GENERATOR, **dataclasses.asdict(config)}


def dataset_folder(config: SyntheticConfig, out_dir: Path) -> Path:
    return Path(out_dir) / f"synthetic-{recipe_id(recipe(config))}"


def _write_stream(path: Path, ids: np.ndarray, dtype: np.dtype) -> dict:
    """Write a stream whose sentences already end with `</S>` through the common writer."""
    writer = SplitWriter(path, dtype, _EOS_ID)
    try:
        ends = np.flatnonzero(ids == _EOS_ID)  # [S]
        starts = np.concatenate([[0], ends[:-1] + 1])
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            writer.add(ids[start:end].tolist())
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def _write_topics(folder: Path, split: str, sample: Sample) -> str:
    """Write `<split>.topic`: each sentence's topic, one line per sentence in stream order (the
    sentences end at the stream's `</S>`s, so line s belongs to the s-th of them)."""
    name = f"{split}.topic"
    write_text_atomic(folder / name, "".join(f"{t}\n" for t in sample.sentence_topic.tolist()))
    return name


def prepare_synthetic(config: SyntheticConfig, out_dir: Path) -> Path:
    """Generate the corpus into `out_dir/synthetic-<recipe_id>/` (nothing to do if it exists)."""
    rec = recipe(config)
    rid = recipe_id(rec)
    folder = dataset_folder(config, out_dir)
    if is_prepared(folder, rid):
        print(f"up to date: {folder}")
        return folder
    folder.mkdir(parents=True, exist_ok=True)

    seeds = np.random.SeedSequence(config.seed).spawn(1 + len(SPLITS))
    topics = build_topics(config, np.random.default_rng(seeds[0]))
    samples = {
        split: sample_split(topics, config, config.split_tokens(split), np.random.default_rng(seed))
        for split, seed in zip(SPLITS, seeds[1:], strict=True)
    }

    # Ids in the order of decreasing training count, as for every other dataset (vocab.py);
    # words never drawn in training keep their place after the others, by word index.
    n_special = len(SPECIALS)
    counts = np.bincount(samples["train"].ids, minlength=n_special + config.n_words)[n_special:]
    order = np.lexsort((np.arange(config.n_words), -counts))  # word indices, new id order
    width = max(4, len(str(config.n_words - 1)))
    vocab = Vocabulary(
        [*SPECIALS, *(f"w{w:0{width}d}" for w in order.tolist())],
        [0] * n_special + counts[order].tolist(),
    )
    new_id = np.arange(n_special + config.n_words)  # [raw id] -> vocabulary id
    new_id[n_special + order] = n_special + np.arange(config.n_words)
    dtype = token_dtype(len(vocab))

    splits = {}
    for split, sample in samples.items():
        splits[split] = _write_stream(folder / f"{split}.bin", new_id[sample.ids], dtype)
        if split in TOPIC_SPLITS:
            splits[split]["extra"] = {"topic": _write_topics(folder, split, sample)}
    vocab_sha = vocab.save(folder / "vocab.txt")

    floor = entropy_floor(topics)
    entropy = {"nats_per_token": floor, "perplexity": math.exp(floor)}
    for split in ("valid", "test"):
        oracle = float(samples[split].nll.mean())
        entropy[f"{split}_oracle_nats_per_token"] = oracle
        entropy[f"{split}_oracle_perplexity"] = math.exp(oracle)
    write_meta(
        folder,
        {
            "dataset": "synthetic",
            "recipe": rec,
            "recipe_id": rid,
            "vocab": {"file": "vocab.txt", "size": len(vocab), "sha256": vocab_sha},
            "dtype": dtype.name,
            "splits": splits,
            "entropy_floor": entropy,
            "numpy": np.__version__,  # the sampling algorithms belong to numpy's Generator
        },
    )
    print(
        f"synthetic: {config.n_topics} topics, vocabulary {len(vocab)}, "
        + ", ".join(f"{s} {e['tokens']:,} tokens" for s, e in splits.items())
    )
    print(
        f"entropy floor given the topic: {floor:.4f} nats/token (perplexity {math.exp(floor):.3f});"
        f" test oracle perplexity {entropy['test_oracle_perplexity']:.3f}"
    )
    return folder


# ---------------------------------------------------------------------------------- command


_HELP = {
    "seed": "seed of everything generated",
    "n_topics": "number of topics (documents are about one topic each)",
    "n_words": "shared vocabulary size, without the three specials",
    "topic_words": "words in each topic's slice of the vocabulary",
    "branching": "candidate next words of every state",
    "alpha": "Dirichlet concentration of each state's candidate probabilities",
    "word_zipf": "Zipf exponent of candidate selection over a slice's ranks",
    "mean_sentence_length": "mean words per sentence (geometric), without </S>",
    "sentences_per_document": "mean sentences per document (geometric)",
    "topic_zipf": "Zipf exponent of the topic distribution (0: uniform)",
    "train_tokens": "tokens in train.bin (rounded up to a whole sentence)",
    "valid_tokens": "tokens in valid.bin (rounded up to a whole sentence)",
    "test_tokens": "tokens in test.bin (rounded up to a whole sentence)",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.synthetic",
        description="Generate the multi-topic Markov corpus, whose entropy floor is known"
        " exactly, into OUT/synthetic-<recipe_id>/.",
    )
    parser.add_argument("--out", type=Path, required=True, help="parent folder of the dataset")
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="default", help="starting values"
    )
    for field in dataclasses.fields(SyntheticConfig):
        default = getattr(PRESETS["default"], field.name)
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            type=type(default),
            default=None,
            help=f"{_HELP[field.name]} (default preset: {default})",
        )
    args = parser.parse_args(argv)
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(SyntheticConfig)
        if getattr(args, f.name) is not None
    }
    try:
        config = dataclasses.replace(PRESETS[args.preset], **overrides)
    except ValueError as error:
        parser.error(str(error))
    try:
        folder = prepare_synthetic(config, args.out)
    except (ValueError, *PATH_ERRORS) as error:  # bad input, such as an --out that is a file
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the disk failed or is full
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
