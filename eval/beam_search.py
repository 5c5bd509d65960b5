"""Batched beam search over any lstm_moe.decoding.IncrementalDecoder, scored as GNMT does, and
the translation of a list of sources over one or several ranks.

Scoring (Wu et al. 2016, arXiv 1609.08144, §7): a finished hypothesis Y of source X scores

    s(Y, X) = log P(Y|X) / lp(Y) + cp(X; Y)
    lp(Y)   = (5 + |Y|)^α / (5 + 1)^α
    cp(X;Y) = β · Σ_i log(min(Σ_j p_ij, 1.0))

with p_ij the attention of target step j on source position i, i over the real source
positions only. |Y| counts every token whose log-probability is in log P(Y|X): the EOS that
ends a hypothesis is counted, so that lp divides a sum of |Y| terms by a function of |Y|; a
hypothesis cut at the maximum length has no EOS, and |Y| is its number of tokens. The coverage
sums p_ij over the same steps (the EOS step's attention included).

The search, per sentence: B sentences advance together, each with up to `beam` live
hypotheses, all B × beam rows in one decode_step call per step. Each step, every live row's
extensions by every token are ranked by log P (2·beam candidates per sentence, as fairseq
does, so that `beam` of them are not EOS): the EOS candidates among the first `beam` are
finished, scored by s(Y, X), and kept in the sentence's list of finished hypotheses; the first
`beam` candidates that are not EOS become the live hypotheses. A sentence stops

  * "exact" (default): when no live hypothesis can still beat its best finished one. Every
    future hypothesis extends a live one, so its log P is at most the live one's (log-probs
    are ≤ 0), its cp is ≤ 0, and lp(|Y|) ≤ lp(max length) for α ≥ 0: its score is at most
    log P(live) / lp(max length) (log P(live) / lp(t + 1) for α < 0). Once the best finished
    score reaches that bound for every live hypothesis, decoding on cannot change the best
    hypothesis (an equal score found later ranks after the earlier one). The n-best beyond the
    first are the best found by then.
  * "beam": once it has `beam` finished hypotheses (fairseq's rule; it makes beam 1 exactly
    greedy decoding for any α), or
  * "max_len": never early;

and always at its maximum length, ⌊max_len_a · |X| + max_len_b⌋ steps (|X| = its real source
positions, src_mask), where its live hypotheses are finished as they stand. A sentence that
stops leaves the batch: its rows are dropped from the decoder state (select_rows).

A sentence's result depends on its own source alone (its length bound, its stop, its ranking
and ties are per sentence; padding never enters a score), never on the sentences that share
its batch, provided the model keeps rows independent as IncrementalDecoder requires (an MoE
layer with a capacity that drops tokens would not).

With a ParallelGroup of several ranks, each rank decodes its own sentences, but every rank
calls decode_step on every step (with zero rows once its own sentences are done) until all
ranks are done: the MoE layers inside the model exchange tokens between all ranks at every
call. translate_ids deals length-sorted batches to the ranks and gathers the results.

Shapes: B sentences, S source positions, n sentences still decoding, k live hypotheses per
sentence (1 before the first step, then min(beam, ...)), V vocabulary, c candidates per
sentence, F = n_best finished hypotheses kept per sentence, T the batch's longest max length.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from lstm_moe.decoding import IncrementalDecoder
from lstm_moe.files import BOS_ID, EOS_ID
from lstm_moe.moe.parallel import ParallelGroup

# α = 0.6, β = 0: the length penalty of Vaswani et al. 2017 (§6.1: beam 4, α = 0.6, with
# GNMT's lp) and the default of tensor2tensor's decoder; no coverage penalty, which needs
# attention the Transformer spreads over heads and layers. GNMT tuned α and β on development
# data (Wu et al. 2016, §7): pass theirs to reproduce that setup.
BEAM, ALPHA, BETA = 4, 0.6, 0.0
# A cap proportional to the source, as a translation's length follows its source's: a
# hypothesis cut at the cap is returned as it stands, so the cap is generous (room for a
# target half as long again as its source, + 10 for short sources) while still stopping a
# hypothesis that repeats itself within a few dozen steps. (fairseq's default: a flat 200.)
MAX_LEN_A, MAX_LEN_B = 1.5, 10
# At least one token: an empty translation is never what an evaluation sentence wants.
MIN_LEN = 1
# A source position that got no attention at all would make cp −∞ (log 0); its coverage is
# floored here (cp term ≈ −23 β) so that such hypotheses still rank among the others.
COVERAGE_FLOOR = 1e-10
STOPS = ("exact", "beam", "max_len")

__all__ = [
    "ALPHA",
    "BEAM",
    "BETA",
    "MAX_LEN_A",
    "MAX_LEN_B",
    "MIN_LEN",
    "Hypothesis",
    "Translation",
    "beam_search",
    "coverage_penalty",
    "deal_batches",
    "length_batches",
    "length_penalty",
    "max_lengths",
    "pad_sources",
    "translate_ids",
]


@dataclass
class Hypothesis:
    """One finished hypothesis. tokens: target ids, BOS and EOS left out; score: s(Y, X);
    log_prob: log P(Y|X) (EOS's term included if ended); ended: True if it chose EOS, False
    if it was cut at the maximum length."""

    tokens: list[int]
    score: float
    log_prob: float
    ended: bool


@dataclass
class Translation:
    """A sentence's finished hypotheses, best first (n_best of them, fewer if fewer
    finished)."""

    hypotheses: list[Hypothesis]

    @property
    def tokens(self) -> list[int]:
        return self.hypotheses[0].tokens if self.hypotheses else []

    @property
    def score(self) -> float:
        return self.hypotheses[0].score if self.hypotheses else -math.inf


def length_penalty(length: Tensor | float, alpha: float) -> Tensor | float:
    """lp(Y) = (5 + |Y|)^α / (5 + 1)^α (GNMT §7); length: |Y| (a number or a tensor of
    any shape), returned in the same form (float64 for a tensor)."""
    if isinstance(length, Tensor):
        length = length.double()
    return ((5 + length) / 6) ** alpha


def coverage_penalty(coverage: Tensor, src_mask: Tensor, beta: float) -> Tensor:
    """cp(X; Y) = β Σ_i log(min(Σ_j p_ij, 1.0)) (GNMT §7) over the real source positions.

    coverage: [..., S] float, Σ_j p_ij per source position; src_mask: [..., S] bool
    (broadcastable to coverage), False on padding. Returns [...] float64. A coverage below
    COVERAGE_FLOOR counts as the floor.
    """
    capped = coverage.double().clamp(min=COVERAGE_FLOOR, max=1.0)
    return beta * torch.where(src_mask, capped.log(), 0.0).sum(-1)


def max_lengths(src_mask: Tensor, max_len_a: float, max_len_b: float, min_len: int) -> Tensor:
    """[B] int64 steps each sentence may take: ⌊a · |X| + b⌋, |X| its real source positions,
    and at least max(min_len, 1). src_mask: [B, S] bool."""
    src_len = src_mask.sum(1).double()  # [B]
    bound = torch.floor(max_len_a * src_len + max_len_b).long()
    return bound.clamp(min=max(min_len, 1))


class _Finished:
    """Each sentence's best F finished hypotheses, best first, as tensors: scores [B, F]
    float64 (−∞ in an empty slot), log_probs [B, F] float64, tokens [B, F, T] int64, lengths
    [B, F] int64 (tokens without EOS), ended [B, F] bool; count [B] int64 finished so far."""

    def __init__(self, sentences: int, keep: int, width: int, device: torch.device) -> None:
        self.scores = torch.full((sentences, keep), -math.inf, dtype=torch.float64, device=device)
        self.log_probs = torch.full_like(self.scores, -math.inf)
        self.tokens = torch.full((sentences, keep, width), EOS_ID, device=device)
        self.lengths = torch.zeros(sentences, keep, dtype=torch.long, device=device)
        self.ended = torch.zeros(sentences, keep, dtype=torch.bool, device=device)
        self.count = torch.zeros(sentences, dtype=torch.long, device=device)

    def add(
        self,
        sentence: Tensor,
        scores: Tensor,
        log_probs: Tensor,
        tokens: Tensor,
        length: int,
        ended: bool,
    ) -> None:
        """New hypotheses of sentences `sentence` [n]: scores [n, m] float64 (−∞: none),
        log_probs [n, m], tokens [n, m, T], all of `length` tokens."""
        new = {
            "scores": scores,
            "log_probs": log_probs.double(),
            "tokens": tokens,
            "lengths": torch.full_like(scores, length, dtype=torch.long),
            "ended": torch.full_like(scores, ended, dtype=torch.bool),
        }
        merged = torch.cat([self.scores[sentence], scores], 1)  # [n, F + m]
        # Stable: on equal scores the hypothesis found first stays first.
        order = torch.sort(merged, dim=1, descending=True, stable=True).indices
        order = order[:, : self.scores.shape[1]]  # [n, F]
        for name, value in new.items():
            kept = getattr(self, name)
            kept[sentence] = _rows(torch.cat([kept[sentence], value], 1), order)
        self.count[sentence] += torch.isfinite(scores).sum(1)

    def translations(self) -> list[Translation]:
        scores, log_probs = self.scores.tolist(), self.log_probs.tolist()
        tokens, lengths, ended = self.tokens.tolist(), self.lengths.tolist(), self.ended.tolist()
        out = []
        for b in range(len(scores)):
            out.append(
                Translation(
                    [
                        Hypothesis(
                            tokens[b][f][: lengths[b][f]],
                            scores[b][f],
                            log_probs[b][f],
                            ended[b][f],
                        )
                        for f in range(len(scores[b]))
                        if math.isfinite(scores[b][f])
                    ]
                )
            )
        return out


def _someone_decoding(rows: int, group: ParallelGroup | None) -> bool:
    """Whether any rank still has rows to decode; every rank of the group learns the same."""
    if group is None or group.world_size == 1:
        return rows > 0
    return group.sum_host([float(rows > 0)])[0] > 0


def _check_options(beam: int, n_best: int, min_len: int, stop: str, max_len_a: float) -> None:
    if beam < 1:
        raise ValueError(f"beam must be at least 1, got {beam}")
    if not 1 <= n_best <= beam:
        raise ValueError(f"n_best must be between 1 and beam ({beam}), got {n_best}")
    if min_len < 0 or max_len_a < 0:
        raise ValueError(f"min_len and max_len_a must be ≥ 0, got {min_len} and {max_len_a}")
    if stop not in STOPS:
        raise ValueError(f"stop must be one of {STOPS}, got {stop!r}")


@torch.no_grad()
def beam_search(
    model: IncrementalDecoder,
    src: Tensor,
    src_mask: Tensor,
    beam: int = BEAM,
    *,
    alpha: float = ALPHA,
    beta: float = BETA,
    max_len_a: float = MAX_LEN_A,
    max_len_b: float = MAX_LEN_B,
    min_len: int = MIN_LEN,
    n_best: int = 1,
    stop: str = "exact",
    group: ParallelGroup | None = None,
) -> list[Translation]:
    """Translate a batch: src [B, S] int64, src_mask [B, S] bool (False on padding). Returns B
    Translations (n_best hypotheses each, best first), in batch order.

    beam: live hypotheses per sentence (1: greedy; exactly argmax decoding with stop="beam",
    or with α = β = 0). alpha, beta: GNMT's length and coverage penalties (β ≠ 0 needs a model
    that returns attention). max_len_a, max_len_b: a sentence takes at most
    ⌊max_len_a · |X| + max_len_b⌋ steps. min_len: fewest tokens (EOS left out) of a
    hypothesis that chooses EOS. stop: "exact", "beam" or "max_len" (module docstring).
    group: the ranks decoding together (each its own batch); every rank must call this as
    many times as the others.
    """
    _check_options(beam, n_best, min_len, stop, max_len_a)
    distributed = group is not None and group.world_size > 1
    B, S = src.shape
    if B == 0 and not distributed:
        return []
    device = src.device
    max_len = max_lengths(src_mask, max_len_a, max_len_b, min_len)  # [B]
    width = int(max_len.max()) if B else 1  # T
    finished = _Finished(B, n_best, width, device)

    state = model.start_decoding(src, src_mask)
    sentence = torch.arange(B, device=device)  # [n] the sentence of each group of k rows
    live_log_prob = torch.zeros(B, 1, device=device)  # [n, k] log P of each live hypothesis
    history = torch.full((B, 1, width), EOS_ID, device=device)  # [n, k, T] their tokens
    coverage = torch.zeros(B, 1, S, device=device) if beta else None  # [n, k, S] Σ_j p_ij
    tokens = torch.full((B,), BOS_ID, device=device)  # [n·k] each row's previous token
    step = 0
    while _someone_decoding(sentence.numel(), group):
        out = model.decode_step(tokens, state)
        step += 1
        n, k = live_log_prob.shape
        if n == 0:  # only keeping the other ranks company
            state = out.state
            continue
        V = out.log_probs.shape[-1]
        # log P of every one-token extension of every live hypothesis.
        extended = live_log_prob.unsqueeze(-1) + out.log_probs.float().view(n, k, V)  # [n, k, V]
        if step <= min_len:  # an EOS now would leave fewer than min_len tokens
            extended[:, :, EOS_ID] = -math.inf
        if coverage is not None:
            if out.attention is None:
                raise ValueError("beta ≠ 0 needs attention, and this model's decode_step has none")
            coverage = coverage + out.attention.float().view(n, k, S)  # [n, k, S]
        mask = src_mask[sentence].unsqueeze(1)  # [n, 1, S]

        # 2·beam candidates hold at least beam that are not EOS (one EOS per row at most).
        c = min(2 * beam, k * V)
        top_log_prob, top_index = extended.view(n, k * V).topk(c, dim=1)  # [n, c], best first
        origin, token = top_index // V, top_index % V  # [n, c] the row extended, the token
        is_eos = token == EOS_ID

        # EOS among the first `beam` candidates: finished, scored by s(Y, X).
        f = min(beam, c)
        new_eos = is_eos[:, :f] & torch.isfinite(top_log_prob[:, :f])  # [n, f]
        if bool(new_eos.any()):
            o = origin[:, :f]
            score = top_log_prob[:, :f].double() / length_penalty(step, alpha)
            if coverage is not None:
                score = score + coverage_penalty(_rows(coverage, o), mask, beta)
            finished.add(
                sentence,
                torch.where(new_eos, score, -math.inf),
                top_log_prob[:, :f],
                _rows(history, o),
                length=step - 1,
                ended=True,
            )

        # The first candidates that are not EOS, in rank order, live on.
        k_next = min(beam, k * (V - 1))
        pick = torch.sort(is_eos.to(torch.uint8), dim=1, stable=True).indices[:, :k_next]
        live_log_prob = top_log_prob.gather(1, pick)  # [n, k']
        origin, token = origin.gather(1, pick), token.gather(1, pick)  # [n, k']
        history = _rows(history, origin)  # [n, k', T]
        history[:, :, step - 1] = token
        if coverage is not None:
            coverage = _rows(coverage, origin)  # [n, k', S]

        # At its maximum length a sentence's live hypotheses finish as they stand.
        done = max_len[sentence] == step  # [n]
        if bool(done.any()):
            score = live_log_prob.double() / length_penalty(step, alpha)
            if coverage is not None:
                score = score + coverage_penalty(coverage, mask, beta)
            alive = done.unsqueeze(1) & torch.isfinite(live_log_prob)
            finished.add(
                sentence,
                torch.where(alive, score, -math.inf),
                live_log_prob,
                history,
                length=step,
                ended=False,
            )
        if stop == "exact":
            best_live = live_log_prob.max(1).values.double()  # [n], log-probs ≤ 0
            bound = torch.maximum(
                best_live / length_penalty(step + 1, alpha),
                best_live / length_penalty(max_len[sentence], alpha),
            )
            done |= finished.scores[sentence, 0] >= bound
        elif stop == "beam":
            done |= finished.count[sentence] >= beam

        keep = (~done).nonzero().squeeze(1)  # [n'] positions among the n sentences
        sentence, live_log_prob = sentence[keep], live_log_prob[keep]
        history, origin, token = history[keep], origin[keep], token[keep]
        if coverage is not None:
            coverage = coverage[keep]
        rows = (keep.unsqueeze(1) * k + origin).reshape(-1)  # [n'·k'] rows of this step's state
        state = model.select_rows(out.state, rows)
        tokens = token.reshape(-1)
    return finished.translations()


def _rows(x: Tensor, index: Tensor) -> Tensor:
    """x[b, index[b, j]] for every b, j: x [n, k, ...], index [n, m] -> [n, m, ...]."""
    expanded = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return x.gather(1, expanded)


# ------------------------------------------------------------------ many sentences, many ranks


def length_batches(
    lengths: Sequence[int], batch_size: int, max_tokens: int | None = None
) -> list[np.ndarray]:
    """Batches of sentence indices (int64 arrays), the longest sentences first, each batch
    contiguous in that order: at most batch_size sentences and, if given, at most max_tokens
    source positions counting padding (sentences × the batch's longest). Sorting by length
    keeps the padding small; the longest batch first makes a batch that does not fit in
    memory fail at once."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest = int(lengths[order[start]])
        end = start + 1
        while (
            end < len(order)
            and end - start < batch_size
            and (max_tokens is None or (end + 1 - start) * longest <= max_tokens)
        ):
            end += 1
        batches.append(order[start:end])
        start = end
    return batches


def deal_batches(n_batches: int, world_size: int, rank: int) -> list[int | None]:
    """The batches rank `rank` decodes, one per round: batch i goes to rank i mod W, so the
    ranks decode batches of about the same lengths at the same time (they wait for each
    other at every step). Every rank gets the same number of rounds; None where it has no
    batch left (it must still take part)."""
    rounds = -(-n_batches // world_size)
    dealt = [r * world_size + rank for r in range(rounds)]
    return [i if i < n_batches else None for i in dealt]


def pad_sources(sources: Sequence[Sequence[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """src [B, S] int64 and src_mask [B, S] bool from B id sequences; padding holds EOS_ID
    (any id would do: the mask marks it)."""
    longest = max(len(s) for s in sources)
    src = np.full((len(sources), longest), EOS_ID, dtype=np.int64)
    mask = np.zeros((len(sources), longest), dtype=bool)
    for i, ids in enumerate(sources):
        src[i, : len(ids)] = np.asarray(ids, dtype=np.int64)
        mask[i, : len(ids)] = True
    return torch.from_numpy(src).to(device), torch.from_numpy(mask).to(device)


def translate_ids(
    model: IncrementalDecoder,
    sources: Sequence[np.ndarray | Sequence[int]],
    device: torch.device,
    beam: int = BEAM,
    *,
    alpha: float = ALPHA,
    beta: float = BETA,
    max_len_a: float = MAX_LEN_A,
    max_len_b: float = MAX_LEN_B,
    min_len: int = MIN_LEN,
    n_best: int = 1,
    stop: str = "exact",
    batch_size: int = 64,
    max_tokens: int | None = None,
    group: ParallelGroup | None = None,
    progress: bool = True,
) -> list[Translation]:
    """Translate every source (token ids as the model reads them, EOS included if it expects
    one) and return the Translations in input order, on every rank.

    The sources are cut into length-sorted batches (length_batches), dealt to the ranks of
    `group` (deal_batches; every rank passes the same full list), each decoded with
    beam_search and the options above. A rank with no batch left in a round decodes the
    shortest source again and throws the result away, so that the model's collectives still
    meet. A progress bar (on the main rank) shows sentences per second.
    """
    _check_options(beam, n_best, min_len, stop, max_len_a)
    group = ParallelGroup() if group is None else group
    if isinstance(model, nn.Module):
        model.eval()
    if not sources:
        return []
    lengths = [len(s) for s in sources]
    batches = length_batches(lengths, batch_size, max_tokens)
    stand_in = np.array([int(np.argmin(lengths))])
    options = dict(
        alpha=alpha,
        beta=beta,
        max_len_a=max_len_a,
        max_len_b=max_len_b,
        min_len=min_len,
        n_best=n_best,
        stop=stop,
        group=group,
    )
    mine: dict[int, Translation] = {}
    bar = tqdm(
        total=len(sources),
        desc="translate",
        unit="sent",
        disable=not (progress and group.is_main),
        leave=False,
    )
    start = time.perf_counter()
    for round_, index in enumerate(deal_batches(len(batches), group.world_size, group.rank)):
        batch = batches[index] if index is not None else stand_in
        src, src_mask = pad_sources([sources[i] for i in batch], device)
        results = beam_search(model, src, src_mask, beam, **options)
        if index is not None:
            mine.update(zip(batch.tolist(), results, strict=True))
        first = round_ * group.world_size
        bar.update(sum(len(b) for b in batches[first : first + group.world_size]))
        bar.set_postfix(sent_per_s=f"{bar.n / (time.perf_counter() - start):.1f}")
    bar.close()
    return _gather_translations(mine, len(sources), group, device)


def _gather_translations(
    mine: dict[int, Translation], total: int, group: ParallelGroup, device: torch.device
) -> list[Translation]:
    """Every rank's translations, in input order, on every rank. They travel as one int64
    stream: per sentence [index, hypotheses], then per hypothesis [score, log_prob (the bits
    of the float64s), ended, length, *tokens]."""
    if group.world_size > 1:
        stream = []
        for i, translation in mine.items():
            stream += [i, len(translation.hypotheses)]
            for h in translation.hypotheses:
                bits = torch.tensor([h.score, h.log_prob], dtype=torch.float64).view(torch.long)
                stream += [*bits.tolist(), int(h.ended), len(h.tokens), *h.tokens]
        stream_t = torch.tensor(stream, dtype=torch.long, device=device)
        everyone = group.gather_batch(stream_t)[0].cpu()
        stream = everyone.tolist()
        mine, at = {}, 0
        while at < len(stream):
            i, count = stream[at : at + 2]
            at += 2
            hypotheses = []
            for _ in range(count):
                score, log_prob = everyone[at : at + 2].view(torch.float64).tolist()
                ended, length = stream[at + 2 : at + 4]
                hypotheses.append(
                    Hypothesis(stream[at + 4 : at + 4 + length], score, log_prob, bool(ended))
                )
                at += 4 + length
            mine[i] = Translation(hypotheses)
    missing = total - len(mine)
    if missing:
        raise RuntimeError(f"{missing} of {total} sources were not translated")
    return [mine[i] for i in range(total)]
