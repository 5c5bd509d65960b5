"""The interface a sequence-to-sequence model offers for decoding one token at a time.

A search (eval.beam_search) knows nothing of the model behind it: it encodes a batch of
sources once, then asks for the next token's log-probabilities row by row, and selects,
repeats or drops rows of the decoder state as hypotheses are expanded, reordered and
finished. The LSTM model (lstm_moe.nmt) and the Transformer offer the same three methods, so
one search serves both.

Shapes: B sentences, S source positions (padded), N decoder rows (B × beam at most, fewer as
sentences finish), V the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor

__all__ = ["DecodeStep", "IncrementalDecoder"]


@dataclass
class DecodeStep:
    """One decoding step: log_probs [N, V] float32 (log-softmax over the vocabulary);
    attention [N, S] the step's attention over the source positions (rows sum to 1 over the
    real ones; None when the model has none), for the coverage penalty; state: the decoder
    state after the step."""

    log_probs: Tensor
    attention: Tensor | None
    state: Any


class IncrementalDecoder(Protocol):
    def start_decoding(self, src: Tensor, src_mask: Tensor) -> Any:
        """Encode src [B, S] int64 (src_mask [B, S] bool, False on padding) and return the
        decoder state of B rows, before any target token (the encoder's output inside)."""

    def decode_step(self, tokens: Tensor, state: Any) -> DecodeStep:
        """Feed tokens [N] int64 (the previous target token of each row; BOS first) and
        return the next token's distribution per row. A row's result depends on that row
        alone, never on the other rows of the call."""

    def select_rows(self, state: Any, index: Tensor) -> Any:
        """The state of rows `index` [N'] int64 of `state`, in that order (rows may repeat:
        beam expansion; or be left out: finished sentences)."""
