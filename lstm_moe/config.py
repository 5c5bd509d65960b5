"""Configuration of the LSTM language model (Shazeer et al. 2017, App. C.1); lstm_moe.fields
sets it from the command line and JSON.

Defaults are the paper's 1B Word values: width 512 everywhere, LSTM → MoE → LSTM, k = 4,
w_importance = w_load = 0.1, DropProb 0.1, a sampled softmax for the 793,471-word vocabulary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from lstm_moe.moe import MoEConfig
from lstm_moe.moe.routers import ROUTERS

LAYER_KINDS = ("lstm", "moe", "ffn")
SOFTMAX_KINDS = ("full", "sampled")


def _paper_moe() -> MoEConfig:
    """The paper's LM layer: 32 experts of hidden width 1024, k = 4 (App. C.1)."""
    return MoEConfig(d_model=512, n_experts=32, expert_hidden=1024)


@dataclass(frozen=True)
class LMConfig:
    """Embedding → layers → softmax, each layer `h + Dropout(f(h))` (App. C.1).

    layers: the stack between embedding and softmax, listed explicitly, e.g.
        ("lstm", "moe", "lstm") for the MoE models, ("lstm",) * 4 for 4xLSTM-512,
        ("lstm", "ffn", "lstm") for MoE-1-Wide / MoE-1-Deep, ("lstm",) for LSTM-2048-512.
    d_model: width of the embedding, of every layer's output and of the MoE's input/output.
    lstm_hidden: LSTM cells. When it differs from d_model the LSTM's output is projected down
        to d_model and fed back (the LSTMP of Sak et al. 2014), as in LSTM-2048-512 and MoE-143M.
    moe: the MoE layer (lstm_moe.moe.MoEConfig); its d_model is this config's. Its fields are
        set flat on the command line (`--n_experts=64`, `--router=switch`).
    ffn_hidden: hidden widths of the dense "ffn" layer (one ReLU layer per entry): (4096,) is
        MoE-1-Wide, (1024,) * 4 is MoE-1-Deep.
    dropout: DropProb, applied to every layer's output except the softmax.
    softmax: "full", or "sampled" (importance sampling from a log-uniform proposal over the
        frequency-ranked vocabulary, Jozefowicz et al. 2016) for training; evaluation always uses
        the exact full softmax.
    n_samples: sampled-softmax candidates per training step.
    """

    # Allowed values of string fields, by field name (shown by --help, checked below).
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "layers": LAYER_KINDS,
        "softmax": SOFTMAX_KINDS,
        "router": tuple(ROUTERS),
    }

    vocab_size: int = 793_471
    layers: tuple[str, ...] = ("lstm", "moe", "lstm")
    d_model: int = 512
    lstm_hidden: int = 512
    moe: MoEConfig = field(default_factory=_paper_moe)
    ffn_hidden: tuple[int, ...] = (4096,)
    dropout: float = 0.1
    softmax: str = "sampled"
    n_samples: int = 8192

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "lstm_hidden", "n_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.layers or any(kind not in LAYER_KINDS for kind in self.layers):
            raise ValueError(f"layers must be a non-empty list of {LAYER_KINDS}, got {self.layers}")
        if "ffn" in self.layers and (not self.ffn_hidden or min(self.ffn_hidden) < 1):
            raise ValueError(f"ffn_hidden must list widths >= 1, got {self.ffn_hidden}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.softmax not in SOFTMAX_KINDS:
            raise ValueError(f"softmax must be one of {SOFTMAX_KINDS}, got {self.softmax!r}")
        if self.moe.d_model != self.d_model:  # the layer's width is the model's
            object.__setattr__(self, "moe", dataclasses.replace(self.moe, d_model=self.d_model))

    def moe_config(self) -> MoEConfig:
        return self.moe


__all__ = ["LAYER_KINDS", "SOFTMAX_KINDS", "LMConfig"]
