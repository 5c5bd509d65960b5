"""Beam search against slow, obviously correct references, on toy decoders with known
distributions (tests/eval/toy_decoders.py): exhaustive search over every hypothesis, a greedy
argmax loop, each sentence decoded alone; GNMT's penalties on hand-computed values; and two
gloo ranks whose model meets in a collective at every call, against one process."""

from __future__ import annotations

import datetime
import itertools
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eval.beam_search import (
    Hypothesis,
    Translation,
    beam_search,
    coverage_penalty,
    deal_batches,
    length_batches,
    length_penalty,
    max_lengths,
    pad_sources,
    translate_ids,
)
from lstm_moe.files import BOS_ID, EOS_ID
from lstm_moe.moe.parallel import ParallelGroup
from tests.eval.toy_decoders import CollectiveHashDecoder, HashDecoder, TableDecoder
from tests.ranks import free_port

CPU = torch.device("cpu")
# Sources of several lengths (ids as the model reads them).
SOURCES = [[7, 3, 9], [4], [5, 6, 2, 8, 3, 3, 1], [9, 9], [2, 7, 4, 4, 6]]


def decode(model, sources, **options) -> list[Translation]:
    return beam_search(model, *pad_sources(sources, CPU), **options)


# ----------------------------------------------------------------------------- references


def exhaustive(model, source, vocab, alpha, beta, max_len, min_len):
    """Every hypothesis of `source` as (score, tokens, ended), best first: each sequence of at
    most max_len - 1 tokens followed by EOS (at least min_len tokens), and each sequence of
    max_len tokens cut there, scored by GNMT's formula written out in float64."""
    src = torch.tensor([source])
    found = []

    def score(log_prob, length, coverage):
        lp = ((5 + length) / 6) ** alpha
        cp = beta * sum(math.log(min(c, 1.0)) for c in coverage) if beta else 0.0
        return log_prob / lp + cp

    def expand(state, prefix, log_prob, coverage):
        last = prefix[-1] if prefix else BOS_ID
        out = model.decode_step(torch.tensor([last]), state)
        step = len(prefix) + 1
        if beta:
            coverage = [c + a for c, a in zip(coverage, out.attention[0].tolist(), strict=True)]
        for v in range(vocab):
            total = log_prob + float(out.log_probs[0, v])
            if math.isinf(total):
                continue
            if v == EOS_ID:
                if step > min_len:
                    found.append((score(total, step, coverage), prefix, True))
            elif step == max_len:
                found.append((score(total, step, coverage), [*prefix, v], False))
            else:
                expand(out.state, [*prefix, v], total, coverage)

    expand(
        model.start_decoding(src, torch.ones_like(src, dtype=torch.bool)),
        [],
        0.0,
        [0.0] * len(source),
    )
    return sorted(found, key=lambda hypothesis: -hypothesis[0])


def greedy(model, source, max_len, min_len):
    """Argmax decoding: the most probable token at each step until EOS or max_len tokens."""
    src = torch.tensor([source])
    state = model.start_decoding(src, torch.ones_like(src, dtype=torch.bool))
    token, out_tokens = BOS_ID, []
    for step in range(1, max_len + 1):
        out = model.decode_step(torch.tensor([token]), state)
        log_probs, state = out.log_probs[0].clone(), out.state
        if step <= min_len:
            log_probs[EOS_ID] = -math.inf
        token = int(log_probs.argmax())
        if token == EOS_ID:
            break
        out_tokens.append(token)
    return out_tokens


def table_log_prob(table, tokens, ended):
    """Σ log P of `tokens` (and EOS if ended) under a TableDecoder's table."""
    path = [BOS_ID, *tokens] + ([EOS_ID] if ended else [])
    return sum(math.log(table[a][b]) for a, b in itertools.pairwise(path))


# ----------------------------------------------------------------------------- penalties


def test_length_penalty_on_hand_computed_values():
    """lp = ((5 + |Y|) / 6)^α: 1 at |Y| = 1 whatever α;
    (9/6)^0.6 = exp(0.6 · ln 1.5) = exp(0.243279) = 1.2754245; (12/6)^1 = 2; (7/6)^0 = 1."""
    assert length_penalty(1, 0.6) == pytest.approx(1.0)
    assert length_penalty(4, 0.6) == pytest.approx(1.2754245, abs=1e-7)
    assert length_penalty(7, 1.0) == pytest.approx(2.0)
    assert length_penalty(2, 0.0) == 1.0
    lengths = torch.tensor([1, 4, 7])
    assert length_penalty(lengths, 1.0).tolist() == pytest.approx([1.0, 1.5, 2.0])


def test_coverage_penalty_on_a_hand_computed_attention_matrix():
    """Three target steps over three source positions and one of padding:

        p = [[0.5, 0.3, 0.2, 0],      Σ_j p_ij = [1.2, 0.8, 1.0, (0: padding)]
             [0.6, 0.3, 0.1, 0],      min(., 1) = [1, 0.8, 1.0]
             [0.1, 0.2, 0.7, 0]]      Σ_i log   = log 0.8 = -0.223144

    so cp = 0.2 · log 0.8 = -0.0446287; the padding position (coverage 0, log 0 = −∞) is
    left out."""
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.6, 0.3, 0.1, 0.0], [0.1, 0.2, 0.7, 0.0]])
    mask = torch.tensor([True, True, True, False])
    cp = coverage_penalty(p.sum(0), mask, beta=0.2)
    assert float(cp) == pytest.approx(0.2 * math.log(0.8), abs=1e-7)
    assert float(coverage_penalty(p.sum(0), mask, beta=0.0)) == 0.0
    # A real position with no attention at all costs log(1e-10) instead of −∞.
    assert float(coverage_penalty(torch.zeros(2), torch.ones(2, dtype=torch.bool), 1.0)) == (
        pytest.approx(2 * math.log(1e-10))
    )


def test_max_lengths_are_per_sentence():
    """⌊1.5 · |X| + 10⌋ over the real positions: |X| = 3 → 14, |X| = 1 → 11; never below
    min_len or 1."""
    mask = torch.tensor([[True, True, True], [True, False, False]])
    assert max_lengths(mask, 1.5, 10, 1).tolist() == [14, 11]
    assert max_lengths(mask, 0.0, 0, 3).tolist() == [3, 3]
    assert max_lengths(mask, 0.0, 0, 0).tolist() == [1, 1]


# ----------------------------------------------------------------------------- search


@pytest.mark.parametrize(
    ("alpha", "beta", "min_len"), [(0.0, 0.0, 0), (0.6, 0.0, 1), (1.0, 0.3, 0), (0.6, 0.2, 2)]
)
def test_a_beam_wide_enough_for_every_prefix_is_exhaustive_search(alpha, beta, min_len):
    """V = 5 (BOS impossible, EOS, three words), 4 steps: 3^4 = 81 prefixes at most, so a
    beam of 200 keeps every one and finishes every EOS. Decoded to the maximum length, the
    5-best are exhaustive search's; stopped early, the best still is."""
    model = HashDecoder(vocab=5)
    options = dict(alpha=alpha, beta=beta, max_len_a=0.0, max_len_b=4, min_len=min_len)
    full = decode(model, SOURCES, beam=200, n_best=5, stop="max_len", **options)
    early = decode(model, SOURCES, beam=200, **options)
    for source, translation, best in zip(SOURCES, full, early, strict=True):
        want = exhaustive(model, source, 5, alpha, beta, 4, min_len)
        gaps = [want[i][0] - want[i + 1][0] for i in range(5)]
        assert min(gaps) > 1e-5  # no near ties among the first five
        assert [h.tokens for h in translation.hypotheses] == [w[1] for w in want[:5]]
        assert [h.ended for h in translation.hypotheses] == [w[2] for w in want[:5]]
        assert [h.score for h in translation.hypotheses] == pytest.approx(
            [w[0] for w in want[:5]], abs=1e-5
        )
        assert best.hypotheses == translation.hypotheses[:1]


@pytest.mark.parametrize("beam", [1, 2, 3])
@pytest.mark.parametrize(("alpha", "beta"), [(0.0, 0.0), (0.6, 0.0), (1.0, 0.4)])
def test_stopping_early_finds_what_decoding_to_the_maximum_length_finds(beam, alpha, beta):
    """The exact rule stops a sentence only when no live hypothesis can beat its best finished
    one: the best hypothesis is the one found by decoding every sentence to its maximum
    length, in fewer steps."""
    model = HashDecoder(vocab=7, eos_growth=0.5)
    options = dict(beam=beam, alpha=alpha, beta=beta, max_len_a=1.0, max_len_b=6)
    early = decode(model, SOURCES, **options)
    early_calls = model.calls
    late = decode(model, SOURCES, stop="max_len", **options)
    assert [t.tokens for t in early] == [t.tokens for t in late]
    assert [t.score for t in early] == [t.score for t in late]
    assert early_calls < model.calls - early_calls


def test_beam_one_is_greedy_decoding():
    """Beam 1 is argmax decoding: with stop="beam" whatever α (one finished hypothesis ends
    the sentence), and with the exact rule when α = 0 (an EOS chosen by argmax is at least as
    probable as any continuation)."""
    model = HashDecoder(vocab=6, eos_growth=0.4)
    max_len = max_lengths(pad_sources(SOURCES, CPU)[1], 1.0, 3, 1).tolist()
    want = [greedy(model, s, m, min_len=1) for s, m in zip(SOURCES, max_len, strict=True)]
    options = dict(beam=1, max_len_a=1.0, max_len_b=3, min_len=1)
    assert [t.tokens for t in decode(model, SOURCES, alpha=0.6, stop="beam", **options)] == want
    assert [t.tokens for t in decode(model, SOURCES, alpha=0.0, **options)] == want
    assert any(len(w) < m for w, m in zip(want, max_len, strict=True))  # some chose EOS


@pytest.mark.parametrize("stop", ["exact", "beam", "max_len"])
def test_a_translation_does_not_depend_on_the_other_sentences_of_its_batch(stop):
    """Each sentence decoded alone, and in a batch with others of other lengths (so with
    padding, other stopping steps and other rows around it), in two orders: the same tokens
    and the same scores, to the bit."""
    model = HashDecoder(vocab=6, eos_growth=0.5)
    options = dict(beam=3, n_best=3, alpha=0.6, beta=0.2, stop=stop)
    alone = [decode(model, [s], **options)[0] for s in SOURCES]
    together = decode(model, SOURCES, **options)
    reversed_ = decode(model, SOURCES[::-1], **options)[::-1]
    assert together == alone
    assert reversed_ == alone


def test_finished_rows_leave_the_batch():
    """Rows per decode_step: B at the first step, B·beam next, then fewer as sentences stop."""
    rows = []

    class Counting(HashDecoder):
        def decode_step(self, tokens, state):
            rows.append(tokens.shape[0])
            return super().decode_step(tokens, state)

    decode(Counting(vocab=6), SOURCES, beam=3)
    assert rows[:2] == [5, 15]
    assert all(a >= b for a, b in itertools.pairwise(rows[1:]))
    assert rows[-1] < 15 and rows[-1] % 3 == 0


# Tokens of the hand-written tables.
A, C, D, E = 2, 3, 4, 5


def test_a_hypothesis_finished_early_wins_after_the_others_continue():
    """Beam 2, α = 0, min_len 1 (columns: BOS, EOS, A, C, D):

        BOS -> A .3, C .7     A -> EOS .9, C .1     C -> EOS .1, C .6, D .3
        D -> EOS .2, C .45, D .35

    Step 2 ranks CC (log .42 = -0.868), A EOS (log .27 = -1.309), CD (-1.561), C EOS
    (-2.66): A EOS is among the first two and finishes, while CC and CD, both more probable,
    live on. Step 3: the best live one, CCC, has log .252 = -1.379 < -1.309: no continuation
    can win, and the search stops after 3 steps with [A]."""
    table = [
        [0, 0, 0.3, 0.7, 0],
        [0, 1, 0, 0, 0],
        [0, 0.9, 0, 0.1, 0],
        [0, 0.1, 0, 0.6, 0.3],
        [0, 0.2, 0, 0.45, 0.35],
    ]
    model = TableDecoder(table)
    options = dict(beam=2, alpha=0.0, min_len=1, max_len_a=0.0, max_len_b=10)
    (got,) = decode(model, [[9]], n_best=2, **options)
    assert model.calls == 3
    assert got.tokens == [A] and got.hypotheses[0].ended
    assert got.score == pytest.approx(math.log(0.3 * 0.9), abs=1e-6)
    (late,) = decode(model, [[9]], stop="max_len", **options)
    assert late.tokens == [A] and late.score == got.score


def test_the_length_penalty_changes_the_winner_and_the_stop_waits_for_it():
    """(columns: BOS, EOS, A, C, D, E)  BOS -> A .65, C .27, E .08; A -> EOS .5, A .1,
    E .4; C -> D .99; D -> E .99; E -> EOS .99 (and .01 left to EOS or E on each).

    α = 0: [A] (log .325 = -1.1239) beats [C, D, E] (log(.27 · .99³) = -1.3394).
    α = 1: [A] scores -1.1239 / (7/6) = -0.9634 and finishes at step 2, when the best live
    hypothesis, CD, has log P = -1.3194: its completions could reach -1.3194 / lp(6) =
    -0.7197 (lp at the maximum length, 6), so the search goes on, and [C, D, E] wins with
    -1.3394 / (9/6) = -0.8929. (A bound taken at the next length, -1.3194 / (8/6) = -0.9896,
    would have stopped at step 2 with [A].)"""
    table = [
        [0, 0, 0.65, 0.27, 0, 0.08],
        [0, 1, 0, 0, 0, 0],
        [0, 0.5, 0.1, 0, 0, 0.4],
        [0, 0.01, 0, 0, 0.99, 0],
        [0, 0.01, 0, 0, 0, 0.99],
        [0, 0.99, 0, 0, 0, 0.01],
    ]
    model = TableDecoder(table)
    options = dict(beam=3, min_len=1, max_len_a=0.0, max_len_b=6)
    (short,) = decode(model, [[9]], alpha=0.0, **options)
    (long,) = decode(model, [[9]], alpha=1.0, **options)
    assert short.tokens == [A] and short.score == pytest.approx(math.log(0.325), abs=1e-6)
    assert long.tokens == [C, D, E]
    assert long.score == pytest.approx(math.log(0.27 * 0.99**3) / 1.5, abs=1e-6)
    for alpha, got in ((0.0, short), (1.0, long)):
        want = exhaustive(model, [9], 6, alpha, 0.0, 6, 1)[0]
        assert (got.tokens, got.hypotheses[0].ended) == (want[1], want[2])


def test_hypotheses_are_cut_at_each_sentences_maximum_length():
    """EOS is impossible: every hypothesis is cut at ⌊1 · |X| + 1⌋ steps, 2 and 4 tokens here,
    in one batch, and scored as it stands: log P (no EOS term) / lp(its length)."""
    table = [
        [0, 0, 0.6, 0.4, 0],
        [0, 1, 0, 0, 0],
        [0, 0, 0.7, 0.3, 0],
        [0, 0, 0.15, 0.8, 0.05],
        [0, 0, 0.5, 0.5, 0],
    ]
    model = TableDecoder(table)
    got = decode(model, [[9], [9, 9, 9]], beam=2, n_best=2, alpha=0.6, max_len_a=1.0, max_len_b=1)
    for translation, length in zip(got, (2, 4), strict=True):
        for h in translation.hypotheses:
            assert len(h.tokens) == length and not h.ended
            log_prob = table_log_prob(table, h.tokens, ended=False)
            assert h.log_prob == pytest.approx(log_prob, abs=1e-6)
            assert h.score == pytest.approx(log_prob / ((5 + length) / 6) ** 0.6, abs=1e-6)
        want = exhaustive(model, [9] * (length - 1), 5, 0.6, 0.0, length, 1)
        assert translation.tokens == want[0][1]


def test_min_len_keeps_eos_out_of_the_first_steps():
    """min_len 3 on a model whose EOS is very probable: no hypothesis has fewer than 3 tokens."""
    model = HashDecoder(vocab=5, eos_growth=3.0)
    for min_len in (0, 3):
        got = decode(model, SOURCES, beam=2, n_best=2, min_len=min_len)
        shortest = min(len(h.tokens) for t in got for h in t.hypotheses)
        assert shortest == min_len if min_len else shortest < 3


def test_bad_options_are_refused():
    model = HashDecoder()
    with pytest.raises(ValueError, match="n_best"):
        decode(model, SOURCES, beam=2, n_best=3)
    with pytest.raises(ValueError, match="stop"):
        decode(model, SOURCES, stop="never")
    with pytest.raises(ValueError, match="attention"):
        decode(TableDecoder([[0.5, 0.5], [0.5, 0.5]]), [[1]], beta=0.2)


# ----------------------------------------------------------------------------- many sentences


def test_length_batches_and_dealing_them_to_ranks():
    lengths = [3, 9, 1, 5, 5, 2, 8]
    batches = length_batches(lengths, batch_size=3)
    assert [b.tolist() for b in batches] == [[1, 6, 3], [4, 0, 5], [2]]  # longest first, stable
    # At most 12 source positions with padding: 9 alone, then 8 + 5 (2 × 8 = 16 > 12)...
    by_tokens = length_batches(lengths, batch_size=10, max_tokens=12)
    assert [b.tolist() for b in by_tokens] == [[1], [6], [3, 4], [0, 5, 2]]
    assert deal_batches(3, 2, 0) == [0, 2]
    assert deal_batches(3, 2, 1) == [1, None]
    assert deal_batches(1, 3, 2) == [None]


def test_translate_ids_returns_every_translation_in_input_order():
    model = HashDecoder(vocab=6)
    sources = [np.array(s) for s in SOURCES] * 2
    got = translate_ids(model, sources, CPU, beam=3, batch_size=2, max_tokens=9, progress=False)
    assert got == [decode(model, [s], beam=3)[0] for s in sources]
    assert translate_ids(model, [], CPU) == []


# ----------------------------------------------------------------------------- two ranks

# What each rank decodes by itself with beam_search: rank 0 one short sentence, rank 1 a long
# one, both to their maximum lengths (11 and 22 steps): rank 0 must go on calling the model
# with zero rows for 11 more steps.
SHARES = ([[4]], [[5, 6, 2, 8, 3, 3, 1, 7]])
OPTIONS = dict(beam=3, n_best=2, alpha=0.6, beta=0.2)
JOBS = ((SOURCES * 2, 2), (SOURCES[:3], 1), (SOURCES[:1], 4))  # sources, batch_size


def two_ranks(rank: int, world: int, port: int, expected: dict) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A rank that called the model a different number of times would wait for the other in
    # its collective: the timeout turns that into an error instead of a hang.
    timeout = datetime.timedelta(seconds=30)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    try:
        group = ParallelGroup(dist.group.WORLD)
        for (sources, batch_size), want in zip(JOBS, expected["jobs"], strict=True):
            model = CollectiveHashDecoder()
            got = translate_ids(
                model, sources, CPU, batch_size=batch_size, group=group, progress=False, **OPTIONS
            )
            assert got == want, f"rank {rank}: {len(sources)} sources by {batch_size}"
        model = CollectiveHashDecoder()
        got = decode(model, SHARES[rank], stop="max_len", group=group, **OPTIONS)
        assert got == expected["shares"][rank]
        calls = group.gather(torch.tensor([model.calls])).view(-1).tolist()
        assert calls == [22, 22], calls
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_decode_what_one_process_decodes():
    """Two gloo ranks, whose model meets in an all-reduce at every call: translate_ids over
    sources that split into an even and an odd number of batches, and fewer sources than
    ranks; and beam_search on shares whose decoding takes 11 and 22 steps. Every result
    equals one process's, on every rank."""
    model = HashDecoder()
    expected = {
        "jobs": [
            translate_ids(model, sources, CPU, batch_size=b, progress=False, **OPTIONS)
            for sources, b in JOBS
        ],
        "shares": [decode(model, share, stop="max_len", **OPTIONS) for share in SHARES],
    }
    assert all(len(t.hypotheses) == 2 for job in expected["jobs"] for t in job)
    mp.spawn(two_ranks, args=(2, free_port(), expected), nprocs=2, join=True)


def test_results_are_plain_data():
    """What a search returns compares by value (the two-rank test relies on it)."""
    assert Translation([Hypothesis([3], -1.0, -1.0, True)]) == Translation(
        [Hypothesis([3], -1.0, -1.0, True)]
    )
    assert Translation([]).tokens == [] and Translation([]).score == -math.inf
