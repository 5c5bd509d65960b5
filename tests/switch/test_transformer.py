"""The Transformer backbones (switch/transformer.py) as models: causal masking, incremental
decoding against full recomputation, padding that never routes, tied embeddings, and the
FLOP matching of the presets."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lstm_moe.moe import MoEConfig
from switch.config import TransformerLMConfig, TransformerNMTConfig
from switch.presets import TRANSFORMER_LM_PRESETS, TRANSFORMER_NMT_PRESETS
from switch.transformer import TransformerLM, TransformerTranslationModel, sinusoidal_positions

VOCAB, D = 30, 16
# Each router's options on 4 experts. Dropless, so that no token's output depends on which
# other tokens claimed an expert's capacity first.
ROUTERS = {
    "noisy_topk": dict(k=2),
    "hierarchical": dict(n_groups=2, k_groups=2, k=1),
    "batchwise": dict(k=2),
    "switch": dict(k=1),
}
# Expert choice ranks the whole batch, so it is not causal (tested apart, below).
OPTIONS = {**ROUTERS, "expert_choice": dict(k=1, capacity_factor=1.5)}


def moe(router: str = "switch", **options) -> MoEConfig:
    return MoEConfig(
        d_model=D, n_experts=4, expert_hidden=32, router=router, **{**OPTIONS[router], **options}
    )


def lm(router: str = "switch", **fields) -> TransformerLM:
    config = TransformerLMConfig(
        vocab_size=VOCAB, d_model=D, n_layers=2, n_heads=2, ffn_hidden=32, moe=moe(router),
        moe_layers=(1,), dropout=0.0, **fields,
    )  # fmt: skip
    return TransformerLM(config)


def nmt(router: str = "switch", **fields) -> TransformerTranslationModel:
    config = TransformerNMTConfig(
        vocab_size=VOCAB, d_model=D, encoder_layers=2, decoder_layers=2, n_heads=2,
        ffn_hidden=32, moe=moe(router), encoder_moe_layers=(1,), decoder_moe_layers=(0,),
        dropout=0.0, **fields,
    )  # fmt: skip
    return TransformerTranslationModel(config)


@pytest.mark.parametrize("router", list(ROUTERS))
def test_the_lm_output_at_t_ignores_the_tokens_after_t(router):
    torch.manual_seed(0)
    model = lm(router).eval()
    ids = torch.randint(VOCAB, (12, 3))  # [T, B]
    changed = ids.clone()
    changed[7:] = (changed[7:] + 1 + torch.randint(VOCAB - 1, changed[7:].shape)) % VOCAB
    with torch.no_grad():
        before, after = model(ids).hidden, model(changed).hidden
    torch.testing.assert_close(after[:7], before[:7], rtol=0, atol=0)
    assert (after[7:] - before[7:]).abs().amax() > 1e-3  # the later ones do see them


@pytest.mark.parametrize("router", list(ROUTERS))
@pytest.mark.parametrize("variant", ["base", "geglu", "learned", "untied"])
def test_incremental_decoding_equals_full_recomputation(router, variant):
    fields = {
        "base": {},
        "geglu": {"activation": "geglu"},
        "learned": {"positions": "learned", "max_positions": 16},
        "untied": {"tie_embeddings": False},
    }[variant]
    torch.manual_seed(1)
    model = nmt(router, **fields).eval()
    src = torch.randint(3, VOCAB, (9, 3))  # [S, B]
    src_mask = torch.ones(9, 3, dtype=torch.bool)
    src_mask[6:, 1] = False  # a shorter sentence
    tgt = torch.randint(3, VOCAB, (7, 3))  # [T, B]
    with torch.no_grad():
        out = model(src, src_mask, tgt, torch.ones(7, 3, dtype=torch.bool))
        full = torch.log_softmax(model.softmax.logits(out.hidden.reshape(-1, D)), -1)
        full = full.view(7, 3, VOCAB)
        state = model.start_decoding(src.t(), src_mask.t())
        for t in range(7):
            step = model.decode_step(tgt[t], state)
            torch.testing.assert_close(step.log_probs, full[t], rtol=1e-5, atol=1e-5)
            assert step.attention.shape == (3, 9)
            torch.testing.assert_close(step.attention.sum(-1), torch.ones(3))
            assert (step.attention[1, 6:] == 0).all()  # never on padding
            state = step.state


def test_expert_choice_in_a_causal_lm_needs_its_flag_because_it_sees_later_tokens():
    with pytest.raises(ValueError, match="allow_noncausal_routing"):
        lm("expert_choice")
    torch.manual_seed(0)
    model = lm("expert_choice", allow_noncausal_routing=True).eval()
    ids = torch.randint(VOCAB, (12, 3))  # [T, B]
    changed = ids.clone()
    changed[7:] = (changed[7:] + 1 + torch.randint(VOCAB - 1, changed[7:].shape)) % VOCAB
    with torch.no_grad():
        before, after = model(ids).hidden, model(changed).hidden
    # The earlier positions' experts were chosen against the later tokens too.
    assert (after[:7] - before[:7]).abs().amax() > 1e-4


def test_expert_choice_in_the_encoder_decodes_as_it_recomputes():
    torch.manual_seed(1)
    config = TransformerNMTConfig(
        vocab_size=VOCAB, d_model=D, encoder_layers=2, decoder_layers=2, n_heads=2,
        ffn_hidden=32, moe=moe("expert_choice"), encoder_moe_layers=(0, 1),
        decoder_moe_layers=(), dropout=0.0,
    )  # fmt: skip
    model = TransformerTranslationModel(config).eval()
    src = torch.randint(3, VOCAB, (9, 3))  # [S, B]
    src_mask = torch.ones(9, 3, dtype=torch.bool)
    src_mask[5:, 2] = False
    tgt = torch.randint(3, VOCAB, (6, 3))  # [T, B]
    with torch.no_grad():
        out = model(src, src_mask, tgt, torch.ones(6, 3, dtype=torch.bool))
        full = torch.log_softmax(model.softmax.logits(out.hidden.reshape(-1, D)), -1)
        state = model.start_decoding(src.t(), src_mask.t())
        for t, want in enumerate(full.view(6, 3, VOCAB)):
            step = model.decode_step(tgt[t], state)
            torch.testing.assert_close(step.log_probs, want, rtol=1e-5, atol=1e-5)
            state = step.state


def test_a_capacity_never_drops_decoding_rows():
    """A tight capacity (0.25 of a row per expert) would drop most of a step's rows; decoding
    runs the experts dropless, so every hypothesis gets what it gets decoded alone, and what
    the model computes over the whole target with no capacity."""
    torch.manual_seed(4)
    config = TransformerNMTConfig(
        vocab_size=VOCAB, d_model=D, encoder_layers=1, decoder_layers=2, n_heads=2,
        ffn_hidden=32, moe=moe("switch", capacity_factor=0.25), encoder_moe_layers=(0,),
        decoder_moe_layers=(0, 1), dropout=0.0,
    )  # fmt: skip
    model = TransformerTranslationModel(config).eval()
    dropless = TransformerTranslationModel(dataclasses.replace(config, moe=moe("switch"))).eval()
    dropless.load_state_dict(model.state_dict())
    src = torch.randint(3, VOCAB, (6, 4))  # [S, B]
    src_mask = torch.ones(6, 4, dtype=torch.bool)
    tgt = torch.randint(3, VOCAB, (5, 4))  # [T, B]
    with torch.no_grad():
        out = dropless(src, src_mask, tgt, torch.ones(5, 4, dtype=torch.bool))
        full = torch.log_softmax(dropless.softmax.logits(out.hidden), -1)  # [T, B, V]
        state = model.start_decoding(src.t(), src_mask.t())
        alone = model.start_decoding(src.t()[2:3], src_mask.t()[2:3])
        for t in range(5):
            step = model.decode_step(tgt[t], state)
            single = model.decode_step(tgt[t, 2:3], alone)
            torch.testing.assert_close(step.log_probs, full[t], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(single.log_probs[0], step.log_probs[2], rtol=1e-5, atol=1e-5)
            state, alone = step.state, single.state


def test_decoding_rows_can_be_selected_repeated_and_dropped():
    torch.manual_seed(2)
    model = nmt().eval()
    src = torch.randint(3, VOCAB, (2, 5))  # [B, S]
    mask = torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        state = model.start_decoding(src, mask)
        state = model.decode_step(torch.tensor([1, 1]), state).state
        picked = model.select_rows(state, torch.tensor([1, 1, 0]))
        both = model.decode_step(torch.tensor([4, 5, 6]), picked).log_probs
        alone = model.decode_step(torch.tensor([5]), model.select_rows(state, torch.tensor([1])))
        none = model.decode_step(torch.zeros(0, dtype=torch.long), model.select_rows(state, []))
    torch.testing.assert_close(both[1], alone.log_probs[0], rtol=1e-5, atol=1e-5)
    assert none.log_probs.shape == (0, VOCAB)


def test_padding_never_routes_and_changes_no_real_output():
    torch.manual_seed(3)
    model = nmt().eval()
    src = torch.randint(3, VOCAB, (6, 1))
    tgt = torch.randint(3, VOCAB, (4, 1))
    ones = torch.ones(4, 1, dtype=torch.bool)
    padded_src = torch.cat([src, torch.full((3, 1), 2)])  # [9, 1], 3 padded positions
    padded_mask = torch.arange(9)[:, None] < 6
    with torch.no_grad():
        alone = model(src, torch.ones(6, 1, dtype=torch.bool), tgt, ones)
        padded = model(padded_src, padded_mask, tgt, ones)
    torch.testing.assert_close(padded.hidden, alone.hidden, rtol=1e-5, atol=1e-5)
    encoder_routed = padded.moe[0].stats.tokens_per_expert.sum()
    assert int(encoder_routed) == 6  # k = 1: one row per real source position


def test_lm_padding_is_routed_nowhere():
    torch.manual_seed(4)
    model = lm("noisy_topk")
    ids = torch.randint(VOCAB, (10, 2))
    mask = torch.ones(10, 2, dtype=torch.bool)
    mask[6:, 1] = False
    out = model(ids, mask=mask)
    assert int(out.moe[0].stats.tokens_per_expert.sum()) == 2 * int(mask.sum())  # k = 2


def test_tied_embeddings_are_one_matrix():
    tied, untied = nmt(), nmt(tie_embeddings=False)
    weight = tied.src_embed.tokens.weight
    assert tied.tgt_embed.tokens.weight is weight and tied.softmax.weight is weight
    assert untied.softmax.weight is not untied.src_embed.tokens.weight
    n_table = VOCAB * D
    assert untied.total_params() - tied.total_params() == 2 * n_table
    model = lm()
    assert model.softmax.weight is model.embed.tokens.weight


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(5)
    model = nmt("noisy_topk", activation="geglu", positions="learned", max_positions=16)
    model.train()
    src, tgt = torch.randint(3, VOCAB, (5, 4)), torch.randint(3, VOCAB, (6, 4))
    out = model(src, torch.ones(5, 4, dtype=torch.bool), tgt, torch.ones(6, 4, dtype=torch.bool))
    (model.nll(out.hidden, tgt).mean() + out.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_learned_positions_refuse_a_window_past_their_table():
    model = lm(positions="learned", max_positions=8)
    model(torch.randint(VOCAB, (8, 1)))
    with pytest.raises(ValueError, match="max_positions"):
        model(torch.randint(VOCAB, (9, 1)))


def test_sinusoidal_positions_by_hand():
    table = sinusoidal_positions(torch.tensor([0, 1, 3]), 4)
    # PE(p, 0) = sin(p), PE(p, 1) = cos(p), PE(p, 2) = sin(p / 100), PE(p, 3) = cos(p / 100)
    p = torch.tensor([0.0, 1.0, 3.0])
    want = torch.stack([p.sin(), p.cos(), (p / 100).sin(), (p / 100).cos()], -1)
    torch.testing.assert_close(table, want)


def test_moe_layers_are_listed_explicitly_and_checked():
    with pytest.raises(ValueError, match="moe_layers"):
        TransformerLMConfig(n_layers=4, moe_layers=(1, 5))
    with pytest.raises(ValueError, match="n_heads"):
        TransformerLMConfig(d_model=100, n_heads=3, moe_layers=())
    layers = lm().layers
    assert [type(layer.ffn).__name__ for layer in layers] == ["FeedForward", "MoEFeedForward"]


def test_the_model_activation_reaches_the_experts():
    config = dataclasses.replace(lm().config, activation="geglu")
    assert config.moe.expert_activation == "geglu"


@pytest.mark.parametrize("presets", [TRANSFORMER_LM_PRESETS, TRANSFORMER_NMT_PRESETS])
def test_sparse_presets_spend_the_dense_preset_active_ops_plus_their_gating(presets):
    """ops per token: each MoE layer spends the dense layer's 2·256·1024 on its experts (k
    experts of width 1024 / k) plus its gating matrices: 256·E (Switch, top-2) or 2·256·E
    (the 2017 noisy gate, W_g and W_noise); attention experts (top-1) the dense Q/K/V
    projection's 256·768 plus 256·E."""
    sizes = {}
    for name, config in presets.items():
        with torch.device("meta"):
            model = (TransformerLM if "NMT" not in name else TransformerTranslationModel)(config)
        ops = model.ops_per_timestep()
        sizes[name.removeprefix("NMT-")] = ops if isinstance(ops, int) else ops["total"]
    n_moe = 2  # MoE layers per model: LM layers 1 and 3; NMT layer 1 of each stack
    dense = sizes["transformer-dense"]
    assert sizes["switch-8"] - dense == n_moe * 256 * 8
    assert sizes["switch-32"] - dense == n_moe * 256 * 32
    assert sizes["moe-top2-32"] - dense == n_moe * 256 * 32
    assert sizes["moe-top4-32"] - dense == n_moe * 2 * 256 * 32
    if presets is TRANSFORMER_LM_PRESETS:
        # Attention experts in the same 2 layers: top-1 of [256, 768], the dense Q/K/V's
        # multiply-adds, and a second router's 256·32.
        assert sizes["switch-32-attn"] - dense == 2 * n_moe * 256 * 32
    else:
        # Expert choice in the encoder only: c = 2 experts of width 512 per token on average,
        # one W_g of 256·32.
        assert sizes["ec-32"] - dense == 256 * 32
