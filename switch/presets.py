"""Transformer presets scaled to a workstation: width 256, 4 heads, a 1024-wide feed-forward
layer, MoE layers in every other layer, each sparse model at the dense one's active FLOPs per
token (expert width × experts per token = 1024; the routers' small gating product aside):

    transformer-dense   every feed-forward layer dense
    switch-8, switch-32 top-1 of 8 / 32 experts of width 1024 (Switch, capacity factor 1.25;
                        2.0 in evaluation)
    moe-top2-32         top-2 of 32 experts of width 512 (GShard's gate: renormalised
                        probabilities, second choices after every first, capacity factor 1.25)
    moe-top4-32         the 2017 noisy top-4 of 32 experts of width 256, dropless, with the
                        importance and load losses (App. A)
    switch-32-attn      switch-32 with attention experts in the same layers (Switch App. A,
                        Table 10: experts in both the feed-forward and the attention layers):
                        the Q/K/V projection routed top-1 to 32 experts of [256, 768] by a
                        router of its own, in float32 under autocast; the same active FLOPs
                        per token again, plus a gating product (a language model only)
    NMT-ec-32           expert choice (Zhou et al. 2022) in the encoder: each of 32 experts of
                        width 512 takes its top 2·T/32 of the batch's T source tokens (c = 2,
                        two experts per token on average); the decoder, causal, keeps its
                        dense layer (expert choice would see later target tokens there); a
                        translation model only

The language models are 4 layers deep (MoE in layers 1 and 3); the translation models
(prefixed "NMT-") 3 + 3 (MoE in layer 1 of each), with label smoothing 0.1 and one embedding
matrix shared by source, target and softmax. `python -m lstm_moe.presets` prints their sizes.
"""

from __future__ import annotations

import dataclasses

from lstm_moe.moe import MoEConfig

from .config import TransformerLMConfig, TransformerNMTConfig

D_MODEL, FFN_HIDDEN = 256, 1024


def _switch(n_experts: int) -> MoEConfig:
    return MoEConfig(
        d_model=D_MODEL,
        n_experts=n_experts,
        expert_hidden=FFN_HIDDEN,
        k=1,
        router="switch",
        capacity_factor=1.25,
        eval_capacity_factor=2.0,
    )


def _sparse_layers() -> dict[str, MoEConfig]:
    return {
        "switch-8": _switch(8),
        "switch-32": _switch(32),
        "moe-top2-32": dataclasses.replace(_switch(32), k=2, expert_hidden=FFN_HIDDEN // 2),
        "moe-top4-32": MoEConfig(
            d_model=D_MODEL, n_experts=32, expert_hidden=FFN_HIDDEN // 4, k=4, router="noisy_topk"
        ),
    }


_LM = TransformerLMConfig(
    d_model=D_MODEL,
    n_layers=4,
    n_heads=4,
    ffn_hidden=FFN_HIDDEN,
    moe=_switch(8),
    moe_layers=(),
    softmax="sampled",
    max_positions=512,
)
_NMT = TransformerNMTConfig(
    d_model=D_MODEL,
    encoder_layers=3,
    decoder_layers=3,
    n_heads=4,
    ffn_hidden=FFN_HIDDEN,
    moe=_switch(8),
    encoder_moe_layers=(),
    decoder_moe_layers=(),
    label_smoothing=0.1,
    max_positions=512,
)

TRANSFORMER_LM_PRESETS: dict[str, TransformerLMConfig] = {
    "transformer-dense": _LM,
    **{
        name: dataclasses.replace(_LM, moe=moe, moe_layers=(1, 3))
        for name, moe in _sparse_layers().items()
    },
    "switch-32-attn": dataclasses.replace(
        _LM, moe=_switch(32), moe_layers=(1, 3), attention_moe_layers=(1, 3)
    ),
}

TRANSFORMER_NMT_PRESETS: dict[str, TransformerNMTConfig] = {
    "NMT-transformer-dense": _NMT,
    **{
        f"NMT-{name}": dataclasses.replace(
            _NMT, moe=moe, encoder_moe_layers=(1,), decoder_moe_layers=(1,)
        )
        for name, moe in _sparse_layers().items()
    },
    "NMT-ec-32": dataclasses.replace(
        _NMT,
        moe=MoEConfig(
            d_model=D_MODEL,
            n_experts=32,
            expert_hidden=FFN_HIDDEN // 2,
            router="expert_choice",
            capacity_factor=2.0,
        ),
        encoder_moe_layers=(1,),
    ),
}

__all__ = ["TRANSFORMER_LM_PRESETS", "TRANSFORMER_NMT_PRESETS"]
