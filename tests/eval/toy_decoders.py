"""Small IncrementalDecoders with fixed, known distributions, for testing searches.

HashDecoder: every row's next-token distribution and attention are a fixed function of its
source (real positions only) and its prefix, through an integer hash: distinct, reproducible
numbers with no weights, and rows that never see each other or the padding.
TableDecoder: log P(next | previous token) from a hand-written table; no attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from lstm_moe.decoding import DecodeStep
from lstm_moe.files import BOS_ID, EOS_ID

PRIME = 2_147_483_647  # hashes stay below 2^31, so their products with small ints fit int64


@dataclass
class HashState:
    """h [N] int64 hash of the source and prefix; mask [N, S] bool; steps [N] int64."""

    h: Tensor
    mask: Tensor
    steps: Tensor


class HashDecoder:
    """V tokens; BOS is never produced (log-prob −∞). `eos_growth` raises EOS's logit with
    each step, so that hypotheses end; `spread` scales the hashed logits of the others."""

    def __init__(self, vocab: int = 5, spread: float = 3.0, eos_growth: float = 0.7) -> None:
        self.vocab, self.spread, self.eos_growth = vocab, spread, eos_growth
        self.calls = 0

    def start_decoding(self, src: Tensor, src_mask: Tensor) -> HashState:
        h = torch.full((src.shape[0],), 12345, dtype=torch.long)
        for i in range(src.shape[1]):  # the real positions only: padding leaves h alone
            mixed = (h * 1_000_003 + src[:, i] + 11) % PRIME
            h = torch.where(src_mask[:, i], mixed, h)
        return HashState(h, src_mask, torch.zeros_like(h))

    def decode_step(self, tokens: Tensor, state: HashState) -> DecodeStep:
        self.calls += 1
        h = (state.h * 1_000_003 + tokens + 7) % PRIME  # [N]
        steps = state.steps + 1
        v = torch.arange(self.vocab)
        logits = ((h.unsqueeze(1) * (2 * v + 3) + 5 * v) % 10_007).float()  # [N, V]
        logits = logits / 10_007 * self.spread
        logits[:, EOS_ID] += self.eos_growth * steps.float() - 1.5
        logits[:, BOS_ID] = -math.inf
        i = torch.arange(state.mask.shape[1])
        scores = ((h.unsqueeze(1) * (5 * i + 1) + 3 * i) % 997).float() / 997 * 4  # [N, S]
        scores = scores.masked_fill(~state.mask, -math.inf)
        attention = torch.softmax(scores, dim=1).masked_fill(~state.mask, 0.0)
        new = HashState(h, state.mask, steps)
        return DecodeStep(torch.log_softmax(logits, dim=1), attention, new)

    def select_rows(self, state: HashState, index: Tensor) -> HashState:
        return HashState(state.h[index], state.mask[index], state.steps[index])


class CollectiveHashDecoder(HashDecoder):
    """A HashDecoder that, like a model with MoE layers, takes part in a collective at every
    call: ranks that call decode_step a different number of times would wait forever (here:
    until the process group's timeout)."""

    def _meet(self) -> None:
        if dist.is_initialized():
            dist.all_reduce(torch.zeros(1))

    def start_decoding(self, src: Tensor, src_mask: Tensor) -> HashState:
        self._meet()
        return super().start_decoding(src, src_mask)

    def decode_step(self, tokens: Tensor, state: HashState) -> DecodeStep:
        self._meet()
        return super().decode_step(tokens, state)


class TableDecoder:
    """log P(next | previous) = log table[previous, next]; table [V, V] of probabilities
    (rows sum to 1; zeros are impossible tokens). The state is the rows' count."""

    def __init__(self, table: list[list[float]]) -> None:
        self.log_table = torch.tensor(table, dtype=torch.float64).log().float()
        self.calls = 0

    def start_decoding(self, src: Tensor, src_mask: Tensor) -> Tensor:
        return torch.zeros(src.shape[0], dtype=torch.long)

    def decode_step(self, tokens: Tensor, state: Tensor) -> DecodeStep:
        self.calls += 1
        return DecodeStep(self.log_table[tokens], None, state)

    def select_rows(self, state: Tensor, index: Tensor) -> Tensor:
        return state[index]
