"""BLEU: the tokenized BLEU on a hand-worked corpus, sacreBLEU against its own corpus_bleu,
the Moses tokenization and compound splitting of get_ende_bleu.sh, and the command."""

from __future__ import annotations

import json
import math

import pytest
import sacrebleu

from eval.bleu import (
    main,
    moses_bleu,
    moses_tokenize,
    read_lines,
    sacre_bleu,
    split_compounds,
    tokenized_bleu,
)


def test_tokenized_bleu_on_a_hand_worked_corpus():
    """Two sentences (one reference each):

        hyp "w x y z v"   ref "w x y z u"     hyp "x x x y"   ref "x y X x y"

    Sentence 1: 1-grams 4/5 (v unmatched), 2-grams 3/4, 3-grams 2/3, 4-grams 1/2.
    Sentence 2, clipped by the reference's counts and case-sensitive (X is not x):
    1-grams x 3 times in the hypothesis, 2 in the reference -> 2, y 1 -> 3/4;
    2-grams "x x" ×2 (0 in the reference), "x y" ×1 (2) -> 1/3; 3-grams "x x x", "x x y" -> 0/2;
    4-gram "x x x y" -> 0/1.
    Corpus: p1 = 7/9, p2 = 4/7, p3 = 2/5, p4 = 1/3; c = 9 < r = 10, BP = exp(1 - 10/9);
    BLEU = BP · (7/9 · 4/7 · 2/5 · 1/3)^(1/4) = 0.894839 · (8/135)^(1/4) = 0.441503.
    """
    hyps = [["w", "x", "y", "z", "v"], ["x", "x", "x", "y"]]
    refs = [["w", "x", "y", "z", "u"], ["x", "y", "X", "x", "y"]]
    result = tokenized_bleu(hyps, refs)
    assert result.precisions == pytest.approx([700 / 9, 400 / 7, 40.0, 100 / 3])
    assert result.brevity_penalty == pytest.approx(math.exp(-1 / 9))
    assert (result.hyp_len, result.ref_len) == (9, 10)
    assert result.score == pytest.approx(100 * math.exp(-1 / 9) * (8 / 135) ** 0.25)
    assert result.score == pytest.approx(44.1503, abs=1e-4)


def test_tokenized_bleu_edge_cases():
    """Identical corpora: 100. No 4-gram in common: 0 (no smoothing). Longer hypotheses: no
    brevity penalty. Nothing translated: 0."""
    same = [["a", "b", "c", "d", "e"]]
    assert tokenized_bleu(same, same).score == pytest.approx(100.0)
    assert tokenized_bleu([["a", "b", "c", "d"]], [["a", "b", "c", "e"]]).score == 0.0
    longer = tokenized_bleu([["a", "b", "c", "d", "e", "f"]], same)
    assert longer.brevity_penalty == 1.0 and longer.precisions[0] == pytest.approx(500 / 6)
    assert tokenized_bleu([[]], same).score == 0.0
    with pytest.raises(ValueError, match="one each"):
        tokenized_bleu(same, same * 2)


CORPUS = (
    ["Das Haus ist klein.", "Der Hund bellt laut!", "Ein rich-text Format, bitte."],
    ["Das Haus ist sehr klein.", "Der Hund bellt laut!", "Ein Rich-Text-Format, bitte."],
)


def test_sacre_bleu_is_sacrebleus_corpus_bleu():
    hyps, refs = CORPUS
    want = sacrebleu.corpus_bleu(hyps, [refs])
    got = sacre_bleu(hyps, refs)
    assert got.score == want.score
    assert got.precisions == want.precisions
    assert (got.brevity_penalty, got.hyp_len, got.ref_len) == (want.bp, want.sys_len, want.ref_len)
    assert got.signature == "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0"


def test_moses_tokenization_then_compounds_as_get_ende_bleu_sh():
    """tokenizer.perl -l de (escaping, no -a), then each hyphen between two non-blank
    characters split off; like perl's s///g, the matches never overlap."""
    (line,) = moses_tokenize(['Ein rich-text Format, "x-y-z" & 5-6.'], "de")
    assert line == "Ein rich-text Format , &quot; x-y-z &quot; &amp; 5-6 ."
    assert split_compounds(line) == (
        "Ein rich ##AT##-##AT## text Format , &quot; x ##AT##-##AT## y-z &quot; &amp; "
        "5 ##AT##-##AT## 6 ."
    )
    assert split_compounds("a - b -x y-") == "a - b -x y-"
    # perl -ple reads bytes: a no-break space is not blank to it.
    assert split_compounds("a\u00a0-b") == "a\u00a0 ##AT##-##AT## b"


def test_moses_bleu_tokenizes_both_sides_then_scores():
    hyps, refs = CORPUS
    sides = [
        [split_compounds(line).split() for line in moses_tokenize(lines, "de")]
        for lines in (hyps, refs)
    ]
    got = moses_bleu(hyps, refs, "de")
    assert got.score == pytest.approx(tokenized_bleu(*sides).score)
    assert "##AT##" in got.signature and "moses-de" in got.signature
    # "rich-text" against "Rich-Text-Format": the split hyphens match as tokens of their own.
    assert any("##AT##-##AT##" in tokens for tokens in sides[0])
    plain = moses_bleu(hyps, refs, "fr")  # no compound splitting outside German
    assert "##AT##" not in plain.signature


def test_read_lines_keeps_every_sentence(tmp_path):
    path = tmp_path / "text"
    path.write_bytes("a b\r\n\nc\u2028d\n".encode())
    assert read_lines(path) == ["a b", "", "c\u2028d"]


def test_the_command_prints_both_scores_and_writes_json(tmp_path, capsys):
    hyps, refs = CORPUS
    (tmp_path / "hyp").write_text("\n".join(hyps) + "\n", encoding="utf-8")
    (tmp_path / "ref").write_text("\n".join(refs) + "\n", encoding="utf-8")
    out = tmp_path / "eval" / "bleu.json"
    args = ["--hyp", str(tmp_path / "hyp"), "--ref", str(tmp_path / "ref"), "--lang", "de"]
    assert main([*args, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sacreBLEU  BLEU = " in printed and "version:2.6.0" in printed
    assert "tokenized  BLEU = " in printed and f"wrote {out}" in printed
    written = json.loads(out.read_text())
    assert written["sacrebleu"]["score"] == pytest.approx(sacre_bleu(hyps, refs).score)
    assert written["tokenized"]["score"] == pytest.approx(moses_bleu(hyps, refs, "de").score)
    assert written["sentences"] == 3


def test_the_command_refuses_bad_input(tmp_path, capsys):
    (tmp_path / "hyp").write_text("a\nb\n", encoding="utf-8")
    (tmp_path / "ref").write_text("a\n", encoding="utf-8")
    args = ["--hyp", str(tmp_path / "hyp"), "--lang", "de", "--ref"]
    assert main([*args, str(tmp_path / "ref")]) == 2
    assert "2 hypotheses but 1 references" in capsys.readouterr().err
    assert main([*args, str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
