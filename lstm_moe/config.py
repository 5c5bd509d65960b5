"""Configurations of the paper's models (Shazeer et al. 2017): the LSTM language model
(App. C.1) and the GNMT-style translation model (App. E); lstm_moe.fields sets them from the
command line and JSON.

LMConfig's defaults are the paper's 1B Word values: width 512 everywhere, LSTM → MoE → LSTM,
k = 4, w_importance = w_load = 0.1, DropProb 0.1, a sampled softmax for the 793,471-word
vocabulary. NMTConfig's are its WMT'14 single-pair values (App. E): width 512, LSTMs of 2048
cells projected to 512, experts 512 → 2048 → 512, strictly balanced gating (App. F) with
w_importance = w_load = 0.01, DropProb 0.4, a shared 32K wordpiece vocabulary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from lstm_moe.moe import MoEConfig
from lstm_moe.moe.routers import ROUTERS

LAYER_KINDS = ("lstm", "moe", "ffn")
SOFTMAX_KINDS = ("full", "sampled")
ATTENTION_KINDS = ("factored", "additive")


# What allow_noncausal_routing admits and why it is off (LSTM and Transformer configs alike;
# shown by --help through each config's HELP).
NONCAUSAL_ROUTING_HELP = (
    "admit expert choice in a causal stack; it picks each expert's tokens among the whole "
    "batch, so a token's experts depend on later tokens: the model learns from the future and "
    "cannot be decoded one token at a time as it was trained (Zhou et al. 2022, §6)"
)


def check_causal_routing(moe: MoEConfig, causal_stack: str | None, allowed: bool, remedy: str):
    """Refuses a router that chooses among the whole batch (Router.sees_whole_batch) in a
    causal stack, named by causal_stack (None: the causal stacks have no MoE layer), unless
    allowed (the config's allow_noncausal_routing). remedy: what else the user can do."""
    if causal_stack is None or allowed or not ROUTERS[moe.router].sees_whole_batch:
        return
    raise ValueError(
        f"router {moe.router!r} chooses among the whole batch, so in {causal_stack} a token's "
        f"experts would depend on later tokens; {remedy}set --allow_noncausal_routing=true to "
        "train it anyway (see --help)"
    )


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
    allow_noncausal_routing: NONCAUSAL_ROUTING_HELP (the language model is causal).
    """

    # Allowed values of string fields, by field name (shown by --help, checked below).
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "layers": LAYER_KINDS,
        "softmax": SOFTMAX_KINDS,
        "router": tuple(ROUTERS),
    }
    HELP: ClassVar[dict[str, str]] = {"allow_noncausal_routing": NONCAUSAL_ROUTING_HELP}

    vocab_size: int = 793_471
    layers: tuple[str, ...] = ("lstm", "moe", "lstm")
    d_model: int = 512
    lstm_hidden: int = 512
    moe: MoEConfig = field(default_factory=_paper_moe)
    ffn_hidden: tuple[int, ...] = (4096,)
    dropout: float = 0.1
    softmax: str = "sampled"
    n_samples: int = 8192
    allow_noncausal_routing: bool = False

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
        check_causal_routing(
            self.moe,
            "a causal language model" if "moe" in self.layers else None,
            self.allow_noncausal_routing,
            "",
        )

    def moe_config(self) -> MoEConfig:
        return self.moe


def _paper_translation_moe() -> MoEConfig:
    """The MT MoE-32 layer: 32 experts 512 → 2048 → 512, k = 4, strictly balanced gating,
    w_importance = w_load = 0.01 (App. E, F)."""
    return MoEConfig(
        d_model=512,
        n_experts=32,
        expert_hidden=2048,
        k=4,
        router="batchwise",
        w_importance=0.01,
        w_load=0.01,
    )


@dataclass(frozen=True)
class NMTConfig:
    """The GNMT-style encoder-decoder of App. E (lstm_moe.nmt), every layer `h + Dropout(f(h))`.

    encoder_layers: the encoder's stack, listed explicitly; the paper's is three LSTMs with the
        MoE between the second and the third: ("lstm", "lstm", "moe", "lstm").
    decoder_layers: the decoder's, ("lstm", "moe", "lstm") in the paper. The first must be an
        LSTM: it queries the attention (and, with input_feeding, reads its last context).
    d_model: width of the embeddings, of every layer's output, of the MoE and the attention
        context.
    lstm_hidden: LSTM cells, projected to d_model when larger (2048 → 512 in the paper).
    moe: both MoE layers' config (each layer has its own weights); set flat on the command line.
    ffn_hidden: hidden widths of a dense "ffn" layer (the compute-matched baseline).
    bidirectional_first: the first encoder layer reads the source both ways, each direction
        with half the cells and half the output width (GNMT §3.1; the paper is silent).
    attention: "factored", App. G's Σ_d V_d tanh((x_i U)_d) tanh((y_j W)_d), whose source side
        is computed once per sentence; or "additive", GNMT's Σ_d V_d tanh((x_i U)_d + (y_j W)_d).
    attention_hidden: n, the attention function's hidden width.
    input_feeding: the first decoder layer reads the previous step's attention context beside
        the previous target word (footnote 5: it provides the attention's input and receives
        its output). This makes that layer step by step in training; False runs it over all
        steps at once and computes every step's attention in one product, App. G's motivation.
    dropout: DropProb on the output of every embedding, LSTM and MoE layer (0.4, App. E).
    label_smoothing: ε of the training loss (the paper is silent; 0 keeps the training loss a
        log-likelihood, comparable with the reported perplexities). Validation is never smoothed.
    allow_noncausal_routing: NONCAUSAL_ROUTING_HELP (the decoder is causal; the encoder takes
        expert choice freely).
    """

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "encoder_layers": LAYER_KINDS,
        "decoder_layers": LAYER_KINDS,
        "attention": ATTENTION_KINDS,
        "router": tuple(ROUTERS),
    }
    HELP: ClassVar[dict[str, str]] = {"allow_noncausal_routing": NONCAUSAL_ROUTING_HELP}

    vocab_size: int = 32_000
    encoder_layers: tuple[str, ...] = ("lstm", "lstm", "moe", "lstm")
    decoder_layers: tuple[str, ...] = ("lstm", "moe", "lstm")
    d_model: int = 512
    lstm_hidden: int = 2048
    moe: MoEConfig = field(default_factory=_paper_translation_moe)
    ffn_hidden: tuple[int, ...] = (8192,)
    bidirectional_first: bool = True
    attention: str = "factored"
    attention_hidden: int = 512
    input_feeding: bool = True
    dropout: float = 0.4
    label_smoothing: float = 0.0
    allow_noncausal_routing: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "lstm_hidden", "attention_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("encoder_layers", "decoder_layers"):
            layers = getattr(self, name)
            if not layers or any(kind not in LAYER_KINDS for kind in layers):
                raise ValueError(f"{name} must be a non-empty list of {LAYER_KINDS}, got {layers}")
        if self.decoder_layers[0] != "lstm":
            raise ValueError(
                f"decoder_layers must start with an LSTM (it queries the attention), got "
                f"{self.decoder_layers}"
            )
        if self.bidirectional_first and (
            self.encoder_layers[0] != "lstm" or self.d_model % 2 or self.lstm_hidden % 2
        ):
            raise ValueError(
                "bidirectional_first needs an encoder starting with an LSTM and even d_model "
                f"and lstm_hidden (each direction has half), got {self.encoder_layers}, "
                f"d_model={self.d_model}, lstm_hidden={self.lstm_hidden}"
            )
        if "ffn" in self.encoder_layers + self.decoder_layers and (
            not self.ffn_hidden or min(self.ffn_hidden) < 1
        ):
            raise ValueError(f"ffn_hidden must list widths >= 1, got {self.ffn_hidden}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.moe.d_model != self.d_model:  # the layer's width is the model's
            object.__setattr__(self, "moe", dataclasses.replace(self.moe, d_model=self.d_model))
        check_causal_routing(
            self.moe,
            "the causal decoder" if "moe" in self.decoder_layers else None,
            self.allow_noncausal_routing,
            "use it in the encoder only (decoder_layers without moe) or ",
        )


__all__ = [
    "ATTENTION_KINDS",
    "LAYER_KINDS",
    "NONCAUSAL_ROUTING_HELP",
    "SOFTMAX_KINDS",
    "LMConfig",
    "NMTConfig",
    "check_causal_routing",
]
