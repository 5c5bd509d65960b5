"""Configurations of the Transformer backbones (switch/transformer.py): a decoder-only language
model and an encoder-decoder translation model, each with MoE layers in the positions listed
(Fedus et al. 2021, Switch Transformers; Lepikhin et al. 2020, GShard).

Defaults are Switch-Base's shape (§3, Table 9 of the Switch paper): width 768, 12 layers of 12
heads, a 3072-wide feed-forward layer, a Switch layer (top-1 of 128 experts, capacity factor
1.25) in every other layer, dropout 0.1. The presets (switch/presets.py) scale them down.

Positions are sinusoidal by default (Vaswani et al. 2017, §3.5): they have no parameters, so a
dense model and a sparse one differ in their feed-forward layers only, and they are defined at
every length, so decoding a sentence longer than any seen in training, or evaluating with a
longer window, needs no extrapolation; Vaswani et al. found learned ones no better.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from lstm_moe.config import NONCAUSAL_ROUTING_HELP, check_causal_routing
from lstm_moe.moe import MoEConfig
from lstm_moe.moe.routers import ROUTERS

POSITION_KINDS = ("sinusoidal", "learned")
SOFTMAX_KINDS = ("full", "sampled")
ACTIVATIONS = ("relu", "geglu")


def _switch_base_moe() -> MoEConfig:
    """Switch-Base's layer: top-1 of 128 experts of width 3072, capacity factor 1.25, the
    balance loss at α = 0.01 (Switch §2.2, §3)."""
    return MoEConfig(
        d_model=768, n_experts=128, expert_hidden=3072, k=1, router="switch", capacity_factor=1.25
    )


def _check_layers(name: str, positions: tuple[int, ...], n_layers: int) -> None:
    if any(not 0 <= i < n_layers for i in positions) or len(set(positions)) != len(positions):
        raise ValueError(
            f"{name} must list distinct layer indices in [0, {n_layers}) (every other layer of "
            f"{n_layers}: {','.join(map(str, range(1, n_layers, 2)))}), got {positions}"
        )


def _check_common(config) -> None:
    for name in ("vocab_size", "d_model", "n_heads", "ffn_hidden", "max_positions"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    if config.d_model % config.n_heads:
        raise ValueError(
            f"d_model ({config.d_model}) must be a multiple of n_heads ({config.n_heads})"
        )
    if config.positions not in POSITION_KINDS:
        raise ValueError(f"positions must be one of {POSITION_KINDS}, got {config.positions!r}")
    if config.activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {config.activation!r}")
    for name in ("dropout", "attention_dropout"):
        if not 0 <= getattr(config, name) < 1:
            raise ValueError(f"{name} must be in [0, 1), got {getattr(config, name)}")
    # The MoE layer's width is the model's, and its experts compute the model's activation.
    moe = config.moe
    if moe.d_model != config.d_model:
        moe = dataclasses.replace(moe, d_model=config.d_model)
    if moe.expert_activation != config.activation:
        moe = dataclasses.replace(moe, expert_activation=config.activation)
    object.__setattr__(config, "moe", moe)


@dataclass(frozen=True)
class TransformerLMConfig:
    """A decoder-only (causal) Transformer language model, pre-norm (Xiong et al. 2020):
    each layer is x + Dropout(Attention(LN(x))), then x + Dropout(FFN(LN(x))), where FFN is a
    dense feed-forward layer or, in the layers listed in moe_layers, an MoE layer.

    n_layers, n_heads, d_model: the stack, its heads per attention, its width.
    ffn_hidden: the dense feed-forward layer's hidden width (the baseline's FLOPs per token).
    activation: "relu" (Vaswani et al.; the 2017 paper's experts) or "geglu" (Shazeer 2020,
        as T5.1.1 and Switch's experts): GELU(x·W_gate) ⊙ (x·W_in), one more D×H product.
        Dense layers and experts use the same one.
    moe: the MoE layers' config (one each, own weights), its fields set flat on the command
        line (`--n_experts=32`, `--router=switch`, `--capacity_factor=1.25`).
    moe_layers: indices of the layers whose FFN is an MoE layer, listed explicitly; () for
        the dense model. Default: every other layer, as Switch and GShard.
    attention_moe_layers: indices of the layers whose self-attention takes its query, key and
        value projections from experts (`--attention_moe_layers=1,3`): Switch's attention
        experts (App. A, Figure 10, Table 10). Each token is routed by the layer's own router
        (the moe config: router, n_experts, k, capacity) to k experts, each holding a [D, 3D]
        projection, through the one dispatcher; the output projection stays dense. Default ()
        (Switch left them out of its final models: in bfloat16 they diverged).
        Cost: per layer, (n_experts - 1)·3·D² parameters more than the dense projection, and
        the router's D·E; per token, for top-1, the dense projection's D·3D multiply-adds and
        the gating's D·E. The switch-32-attn preset (attention experts in layers 1 and 3 of
        switch-32) has 12.2M parameters more (47.9M against 35.7M, embedding and softmax
        excluded), 3.178M against 3.162M multiply-adds per token, and took 1.07× the time of
        a switch-32 training step on 2 CPU cores (0.95 against 0.88 s for 32 × 64 tokens;
        `python -m eval.bench_transformer --presets transformer-dense switch-32
        switch-32-attn`, the presets taking turns; README, Transformer backbones).
    attention_moe_float32: the attention experts' product runs in float32 under autocast (as
        Table 10 trained them; bfloat16 diverged there); false lets it take the autocast dtype.
    positions: "sinusoidal" (default, see the module docstring) or "learned" (max_positions
        of them).
    max_positions: the longest window a learned position table covers.
    tie_embeddings: the softmax's weights are the input embedding's (Press & Wolf 2017).
    dropout: on every sublayer's output and on the embeddings (Switch: 0.1).
    attention_dropout: on the attention probabilities.
    softmax, n_samples: as LMConfig: "sampled" for a large vocabulary (training only).
    allow_noncausal_routing: lstm_moe.config.NONCAUSAL_ROUTING_HELP (the model is causal).
    """

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "positions": POSITION_KINDS,
        "softmax": SOFTMAX_KINDS,
        "activation": ACTIVATIONS,
        "router": tuple(ROUTERS),
    }
    HELP: ClassVar[dict[str, str]] = {"allow_noncausal_routing": NONCAUSAL_ROUTING_HELP}

    vocab_size: int = 32_000
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    ffn_hidden: int = 3072
    activation: str = "relu"
    moe: MoEConfig = field(default_factory=_switch_base_moe)
    moe_layers: tuple[int, ...] = (1, 3, 5, 7, 9, 11)
    attention_moe_layers: tuple[int, ...] = ()
    attention_moe_float32: bool = True
    positions: str = "sinusoidal"
    max_positions: int = 2048
    tie_embeddings: bool = True
    dropout: float = 0.1
    attention_dropout: float = 0.0
    softmax: str = "full"
    n_samples: int = 8192
    allow_noncausal_routing: bool = False

    def __post_init__(self) -> None:
        _check_common(self)
        if self.n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {self.n_layers}")
        _check_layers("moe_layers", self.moe_layers, self.n_layers)
        _check_layers("attention_moe_layers", self.attention_moe_layers, self.n_layers)
        if self.softmax not in SOFTMAX_KINDS:
            raise ValueError(f"softmax must be one of {SOFTMAX_KINDS}, got {self.softmax!r}")
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {self.n_samples}")
        check_causal_routing(
            self.moe,
            "a causal language model" if self.moe_layers or self.attention_moe_layers else None,
            self.allow_noncausal_routing,
            "",
        )


@dataclass(frozen=True)
class TransformerNMTConfig:
    """An encoder-decoder Transformer (Vaswani et al. 2017), pre-norm, for translation over a
    shared vocabulary: the encoder's layers are x + Attention(LN(x)), x + FFN(LN(x)); the
    decoder's add x + CrossAttention(LN(x), encoder output) between the two. The FFN of the
    layers listed in encoder_moe_layers / decoder_moe_layers is an MoE layer.

    encoder_layers, decoder_layers: the depth of each stack. tie_embeddings: the source and
    target embeddings and the softmax share one matrix (the vocabulary is shared). The decoder
    is causal: allow_noncausal_routing admits expert choice there (the encoder takes it
    freely). label_smoothing: ε of the training loss (0.1 in Vaswani et al.; validation is
    never smoothed). Every other field as TransformerLMConfig.
    encoder_attention_moe_layers, decoder_attention_moe_layers: the layers whose
    self-attention takes its query, key and value projections from experts (Switch's
    attention experts, App. A, Table 10; see TransformerLMConfig.attention_moe_layers, and
    attention_moe_float32 for their precision). The decoder's cross-attention stays dense
    (these options route self-attention only): its keys and values are projected once per
    source sentence, for every step of a beam search alike.
    """

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "positions": POSITION_KINDS,
        "activation": ACTIVATIONS,
        "router": tuple(ROUTERS),
    }
    HELP: ClassVar[dict[str, str]] = {"allow_noncausal_routing": NONCAUSAL_ROUTING_HELP}

    vocab_size: int = 32_000
    d_model: int = 768
    encoder_layers: int = 12
    decoder_layers: int = 12
    n_heads: int = 12
    ffn_hidden: int = 3072
    activation: str = "relu"
    moe: MoEConfig = field(default_factory=_switch_base_moe)
    encoder_moe_layers: tuple[int, ...] = (1, 3, 5, 7, 9, 11)
    decoder_moe_layers: tuple[int, ...] = (1, 3, 5, 7, 9, 11)
    encoder_attention_moe_layers: tuple[int, ...] = ()
    decoder_attention_moe_layers: tuple[int, ...] = ()
    attention_moe_float32: bool = True
    positions: str = "sinusoidal"
    max_positions: int = 1024
    tie_embeddings: bool = True
    dropout: float = 0.1
    attention_dropout: float = 0.0
    label_smoothing: float = 0.0
    allow_noncausal_routing: bool = False

    def __post_init__(self) -> None:
        _check_common(self)
        for name in ("encoder_layers", "decoder_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        _check_layers("encoder_moe_layers", self.encoder_moe_layers, self.encoder_layers)
        _check_layers("decoder_moe_layers", self.decoder_moe_layers, self.decoder_layers)
        _check_layers(
            "encoder_attention_moe_layers", self.encoder_attention_moe_layers, self.encoder_layers
        )
        _check_layers(
            "decoder_attention_moe_layers", self.decoder_attention_moe_layers, self.decoder_layers
        )
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        check_causal_routing(
            self.moe,
            "the causal decoder"
            if self.decoder_moe_layers or self.decoder_attention_moe_layers
            else None,
            self.allow_noncausal_routing,
            "use it in the encoder only (--decoder_moe_layers= and "
            "--decoder_attention_moe_layers= with no value) or ",
        )


__all__ = ["ACTIVATIONS", "POSITION_KINDS", "TransformerLMConfig", "TransformerNMTConfig"]
