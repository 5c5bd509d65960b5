"""Corpus BLEU (Papineni et al. 2002) of translations against one reference each, two ways.

sacreBLEU (Post 2018): detokenized hypotheses against the untouched references, tokenized by
sacreBLEU itself (13a by default), reported with its signature, which says exactly how the
number was computed. This is the number to compare with other systems today.

Tokenized BLEU, the kind of number papers of 2016–2017 report on WMT'14 (GNMT's, which the
tables of Shazeer et al. 2017 compare with), computed as tensor2tensor's get_ende_bleu.sh
does: both sides tokenized by the Moses tokenizer (tokenizer.perl -l LANG with its default
options, so with Moses's escaping and without -a's dash splitting; sacremoses here), and for
German each hyphen between two non-blank characters split off as ` ##AT##-##AT## ` (the
Stanford WMT'14 En–De data splits compounds so, "for historical reasons"), then scored like
Moses's multi-bleu.perl: case-sensitive, n-grams up to 4, counts clipped by the reference's
and summed over the corpus, geometric mean of the four precisions, brevity penalty
exp(1 − r/c) when the hypotheses' length c is below the references' r. No smoothing: a corpus
with no matching 4-gram scores 0. (Dash splitting before the compound split would be wrong:
Moses's "@-@" would itself be split into "@ ##AT##-##AT## @".)

    python -m eval.bleu --hyp FILE --ref FILE --lang de [--json OUT]
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import sacrebleu
import sacremoses
from sacrebleu.metrics import BLEU

from lstm_moe.files import PATH_ERRORS, write_json_atomic

MAX_ORDER = 4
# get_ende_bleu.sh's `perl -ple 's{(\S)-(\S)}{$1 ##AT##-##AT## $2}g'`. Like perl's, the
# matches do not overlap ("x-y-z" becomes "x ##AT##-##AT## y-z"), and, as perl reading bytes
# does, only ASCII whitespace is blank (a no-break space before a hyphen is not).
COMPOUND_HYPHEN = re.compile(r"(\S)-(\S)", re.ASCII)

__all__ = [
    "Bleu",
    "moses_bleu",
    "moses_tokenize",
    "print_scores",
    "read_lines",
    "sacre_bleu",
    "score_files",
    "split_compounds",
    "tokenized_bleu",
]


@dataclass
class Bleu:
    """score: BLEU × 100; precisions: the 1- to 4-gram precisions × 100; brevity_penalty;
    hyp_len, ref_len: tokens of the hypotheses and of the references; signature: how the
    score was computed."""

    score: float
    precisions: list[float]
    brevity_penalty: float
    hyp_len: int
    ref_len: int
    signature: str

    def summary(self) -> str:
        precisions = "/".join(f"{p:.1f}" for p in self.precisions)
        return (
            f"BLEU = {self.score:.2f}, {precisions} (BP={self.brevity_penalty:.3f}, "
            f"hyp_len={self.hyp_len}, ref_len={self.ref_len})"
        )


def _check_pairs(hypotheses: list, references: list) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(
            f"{len(hypotheses)} hypotheses but {len(references)} references: one each needed"
        )


def sacre_bleu(hypotheses: list[str], references: list[str], tokenize: str = "13a") -> Bleu:
    """sacreBLEU's corpus BLEU of detokenized hypotheses against untouched references (one
    each), with its defaults (mixed case, exponential smoothing) and the given tokenizer."""
    _check_pairs(hypotheses, references)
    metric = BLEU(tokenize=tokenize)
    result = metric.corpus_score(hypotheses, [references])
    return Bleu(
        result.score,
        list(result.precisions),
        result.bp,
        result.sys_len,
        result.ref_len,
        str(metric.get_signature()),
    )


def split_compounds(line: str) -> str:
    """Every hyphen between two non-blank characters as a token ##AT##-##AT## of its own."""
    return COMPOUND_HYPHEN.sub(r"\1 ##AT##-##AT## \2", line)


def moses_tokenize(lines: list[str], lang: str) -> list[str]:
    """Each line as tokenizer.perl -l LANG writes it (default options: special characters
    escaped, no aggressive dash splitting), tokens joined by single spaces."""
    tokenizer = sacremoses.MosesTokenizer(lang=lang)
    return [tokenizer.tokenize(line, return_str=True) for line in lines]


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def tokenized_bleu(hypotheses: list[list[str]], references: list[list[str]]) -> Bleu:
    """multi-bleu.perl's BLEU of token lists against one reference token list each.

    For n = 1..4: matches_n = Σ_sentences Σ_ngrams min(count in hypothesis, count in
    reference), total_n = Σ_sentences (hypothesis n-grams); p_n = matches_n / total_n (0 when
    total_n = 0). BLEU = BP · exp(Σ_n log p_n / 4), 0 if some p_n = 0; BP = exp(1 − r/c) if
    c < r else 1, c and r the corpus's hypothesis and reference lengths.
    """
    _check_pairs(hypotheses, references)
    matches, totals = [0] * MAX_ORDER, [0] * MAX_ORDER
    for hyp, ref in zip(hypotheses, references, strict=True):
        for n in range(1, MAX_ORDER + 1):
            hyp_ngrams, ref_ngrams = _ngrams(hyp, n), _ngrams(ref, n)
            matches[n - 1] += sum(min(c, ref_ngrams[g]) for g, c in hyp_ngrams.items())
            totals[n - 1] += sum(hyp_ngrams.values())
    precisions = [m / t if t else 0.0 for m, t in zip(matches, totals, strict=True)]
    hyp_len = sum(len(h) for h in hypotheses)
    ref_len = sum(len(r) for r in references)
    if hyp_len == 0:  # multi-bleu.perl would divide by zero: nothing was translated
        brevity_penalty = 0.0
    else:
        brevity_penalty = math.exp(1 - ref_len / hyp_len) if hyp_len < ref_len else 1.0
    if min(precisions) > 0:
        score = brevity_penalty * math.exp(sum(math.log(p) for p in precisions) / MAX_ORDER)
    else:
        score = 0.0
    return Bleu(
        100 * score,
        [100 * p for p in precisions],
        brevity_penalty,
        hyp_len,
        ref_len,
        "multi-bleu.perl|case:mixed|n:4|smooth:none",
    )


def moses_bleu(
    hypotheses: list[str], references: list[str], lang: str, compounds: bool | None = None
) -> Bleu:
    """The papers' tokenized BLEU of detokenized hypotheses against untouched references:
    Moses-tokenized, compounds split (compounds=None: for German only, as get_ende_bleu.sh
    does for En–De), then tokenized_bleu."""
    _check_pairs(hypotheses, references)
    compounds = lang == "de" if compounds is None else compounds
    sides = []
    for lines in (hypotheses, references):
        tokenized = moses_tokenize(lines, lang)
        if compounds:
            tokenized = [split_compounds(line) for line in tokenized]
        sides.append([line.split() for line in tokenized])
    result = tokenized_bleu(*sides)
    atat = "|compounds:##AT##" if compounds else ""
    result.signature = (
        f"tok:moses-{lang}(sacremoses {sacremoses.__version__}){atat}|{result.signature}"
    )
    return result


def read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file, without their line ends (a last empty line, left by a
    final newline, is not a sentence). Only \\n separates lines, as in sacreBLEU and Moses."""
    text = Path(path).read_bytes().decode("utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def score_files(hyp: Path, ref: Path, lang: str, tokenize: str = "13a") -> dict:
    """Both scores of a hypothesis file against its reference file, as bleu.json holds them."""
    hypotheses, references = read_lines(hyp), read_lines(ref)
    sacre = sacre_bleu(hypotheses, references, tokenize)
    tokenized = moses_bleu(hypotheses, references, lang)
    return {
        "hyp": str(hyp),
        "ref": str(ref),
        "lang": lang,
        "sentences": len(hypotheses),
        "sacrebleu": asdict(sacre),
        "tokenized": asdict(tokenized),
        "sacrebleu_version": sacrebleu.__version__,
    }


def print_scores(result: dict) -> None:
    for name, key in (("sacreBLEU", "sacrebleu"), ("tokenized", "tokenized")):
        print(f"{name:<10} {Bleu(**result[key]).summary()}")
        print(f"{'':<10} {result[key]['signature']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eval.bleu",
        description="sacreBLEU and the papers' tokenized BLEU of a translation file.",
    )
    parser.add_argument("--hyp", type=Path, required=True, help="detokenized translations")
    parser.add_argument("--ref", type=Path, required=True, help="untouched references")
    parser.add_argument("--lang", required=True, help="target language (de, fr, ...)")
    parser.add_argument(
        "--tokenize", default="13a", choices=sorted(BLEU.TOKENIZERS), help="sacreBLEU's (13a)"
    )
    parser.add_argument("--json", type=Path, help="also write both scores to this file")
    args = parser.parse_args(argv)
    try:
        result = score_files(args.hyp, args.ref, args.lang, args.tokenize)
    except (*PATH_ERRORS, UnicodeDecodeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_scores(result)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.json, result)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
