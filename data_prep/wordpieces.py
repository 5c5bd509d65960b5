"""The shared wordpiece vocabulary of a parallel corpus: a sentencepiece model of both languages.

Why sentencepiece BPE. The paper's translation models (§5.3) use the wordpieces of GNMT (Wu et
al. 2016, §4.1): a greedy bottom-up algorithm that keeps adding the merge of two units that most
improves the training data's likelihood, which its authors describe as similar to byte pair
encoding. Of sentencepiece's models, `bpe` (merge the most frequent pair, bottom-up) is the
closest to that procedure, and it segments a word deterministically once trained. `unigram`
(sentencepiece's default, Kudo 2018), which prunes a large seed vocabulary top-down instead, is
available with `model_type="unigram"`.

The model is trained on both languages at once, so the source and the target share one id
space (GNMT and the paper share one wordpiece vocabulary across the pair, 32,000 entries).
Its special ids are those of the dataset format (lstm_moe.files): BOS 0, EOS 1, UNK 2, and no
padding id. `character_coverage` 0.9999 keeps all but the rarest characters of the training
text (sentencepiece's recommendation for languages with small alphabets); the others, and any
character never seen in training, encode as UNK: there is no byte fallback, so an unknown
character costs one UNK token and the count of UNK tokens is an honest measure of coverage.
Sentencepiece's own normalisation (`nmt_nfkc`: Unicode NFKC, whitespace collapsed) is applied
inside the model, so decoding ids gives the NFKC form of the text that was encoded.

Too small a corpus. Sentencepiece cannot build more pieces than the training text supports; it
says how many it could. That is reported as a one-line error naming the maximum, rather than
training with `hard_vocab_limit=False`, which would silently give a smaller vocabulary than
the recipe (and the folder name derived from it) says.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from lstm_moe.files import BOS_ID, EOS_ID, UNK_ID, write_text_atomic

MODEL_TYPES = ("bpe", "unigram")
MODEL_FILE = "spm.model"
VOCAB_FILE = "vocab.txt"
TRAINING_THREADS = 16  # sentencepiece's default; fixed, whatever the machine (train_wordpieces)
_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")


class VocabularyError(ValueError):
    """The training text cannot give the requested vocabulary (bad input, exit 2)."""


@dataclass(frozen=True)
class WordpieceConfig:
    vocab_size: int = 32_000  # the paper's shared wordpiece vocabulary (§5.3, as in GNMT)
    model_type: str = "bpe"
    character_coverage: float = 0.9999

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if self.vocab_size < 8:
            raise ValueError(f"vocab size must be >= 8, got {self.vocab_size}")
        if not 0.9 <= self.character_coverage <= 1.0:
            raise ValueError(
                f"character coverage must be in [0.9, 1], got {self.character_coverage}"
            )


def train_wordpieces(sample: Path, folder: Path, config: WordpieceConfig) -> Path:
    """Train the model on `sample` (one sentence per line, both languages) and write
    `folder/spm.model` and `folder/vocab.txt` (`piece<TAB>score` per id). Returns the model path.

    The sentences are streamed to the trainer and the model comes back as bytes, so the model
    records no path, and the trainer always runs TRAINING_THREADS threads (unigram's scores
    depend on their number, and the model records it): the same sample gives the same file on
    every machine. Raises
    VocabularyError when the text supports fewer pieces than `config.vocab_size`."""
    folder = Path(folder)
    model = io.BytesIO()
    try:
        with open(sample, encoding="utf-8") as lines:
            spm.SentencePieceTrainer.train(
                sentence_iterator=(line.rstrip("\n") for line in lines),
                model_writer=model,
                vocab_size=config.vocab_size,
                model_type=config.model_type,
                character_coverage=config.character_coverage,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                unk_id=UNK_ID,
                pad_id=-1,
                input_sentence_size=0,  # the sample is already bounded: use all of it
                num_threads=TRAINING_THREADS,
                minloglevel=2,  # its progress log is long; errors still raise
            )
    except RuntimeError as error:
        match = _TOO_HIGH.search(str(error))
        if match:
            raise VocabularyError(
                f"vocab size {match.group(1)} is too large for this training text: sentencepiece"
                f" can build at most {match.group(2)} pieces from it; give --vocab-size"
                f" {match.group(2)} or less"
            ) from None
        raise VocabularyError(f"sentencepiece training failed: {error}") from None
    path = folder / MODEL_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(path)
    processor = load(path)
    pieces = range(processor.get_piece_size())
    write_text_atomic(
        folder / VOCAB_FILE,
        "".join(f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n" for i in pieces),
    )
    return path


def load(model: Path) -> spm.SentencePieceProcessor:
    """The sentencepiece processor of a model file, checked to use the format's special ids."""
    processor = spm.SentencePieceProcessor(model_file=str(model))
    ids = (processor.bos_id(), processor.eos_id(), processor.unk_id(), processor.pad_id())
    if ids != (BOS_ID, EOS_ID, UNK_ID, -1):
        raise ValueError(f"{model}: special ids (bos, eos, unk, pad) {ids}, expected (0, 1, 2, -1)")
    return processor
