"""The translation model (lstm_moe.nmt): decoding step by step is the teacher-forced forward
pass, a sentence's result does not depend on its batch, padding reaches no expert, the MoE
applied to all positions at once is the MoE applied position by position, and the presets'
sizes are the paper's."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lstm_moe.config import NMTConfig
from lstm_moe.lm import MoEBlock
from lstm_moe.moe import MoEConfig
from lstm_moe.nmt import TranslationModel
from lstm_moe.presets import TRANSLATION_PRESETS, translation_model_size

V = 37


def tiny_config(**overrides) -> NMTConfig:
    moe = MoEConfig(
        d_model=16,
        n_experts=4,
        expert_hidden=12,
        k=2,
        router=overrides.pop("router", "noisy_topk"),
        w_importance=0.01,
        w_load=0.01,
    )
    fields = dict(
        vocab_size=V, d_model=16, lstm_hidden=24, attention_hidden=8, moe=moe, dropout=0.0
    )
    fields.update(overrides)
    return NMTConfig(**fields)


def batch(lengths_src, lengths_tgt, seed=0):
    """Random src [S, B] / tgt_in [T, B] ids with masks for the given real lengths."""
    g = torch.Generator().manual_seed(seed)
    S, T, B = max(lengths_src), max(lengths_tgt), len(lengths_src)
    src = torch.randint(3, V, (S, B), generator=g)
    tgt = torch.randint(3, V, (T, B), generator=g)
    src_mask = torch.arange(S)[:, None] < torch.tensor(lengths_src)
    tgt_mask = torch.arange(T)[:, None] < torch.tensor(lengths_tgt)
    return src, src_mask, tgt, tgt_mask


@pytest.mark.parametrize("input_feeding", [True, False])
@pytest.mark.parametrize("attention", ["factored", "additive"])
@pytest.mark.parametrize("router", ["noisy_topk", "batchwise"])
def test_decoding_step_by_step_is_the_teacher_forced_forward(input_feeding, attention, router):
    torch.manual_seed(0)
    config = tiny_config(input_feeding=input_feeding, attention=attention, router=router)
    model = TranslationModel(config).double().eval()
    src, src_mask, tgt, tgt_mask = batch([7, 4, 2], [5, 5, 5])
    with torch.no_grad():
        out = model(src, src_mask, tgt, tgt_mask)
        expected = torch.log_softmax(model.softmax.logits(out.hidden), -1)  # [T, B, V]
        state = model.start_decoding(src.t(), src_mask.t())
        for t in range(tgt.shape[0]):
            step = model.decode_step(tgt[t], state)
            state = step.state
            torch.testing.assert_close(step.log_probs, expected[t], rtol=0, atol=1e-10)
            # The attention is over the real source positions only, and sums to one there.
            assert step.attention.shape == (3, 7)
            assert float(step.attention[~src_mask.t()].abs().sum()) == 0.0
            torch.testing.assert_close(step.attention.sum(-1), torch.ones(3, dtype=torch.double))


def test_a_sentence_does_not_depend_on_its_batch():
    torch.manual_seed(1)
    model = TranslationModel(tiny_config()).double().eval()
    src, src_mask, tgt, tgt_mask = batch([6, 3, 5], [4, 2, 4])
    with torch.no_grad():
        together = model(src, src_mask, tgt, tgt_mask).hidden
        for b, (s_len, t_len) in enumerate([(6, 4), (3, 2), (5, 4)]):
            alone = model(
                src[:s_len, b : b + 1],
                src_mask[:s_len, b : b + 1],
                tgt[:t_len, b : b + 1],
                tgt_mask[:t_len, b : b + 1],
            ).hidden
            torch.testing.assert_close(alone[:, 0], together[:t_len, b], rtol=0, atol=1e-12)


def test_padding_reaches_no_expert_and_changes_nothing():
    torch.manual_seed(2)
    model = TranslationModel(tiny_config()).double().eval()
    src, src_mask, tgt, tgt_mask = batch([6, 3, 5], [4, 2, 4])
    rows: list[int] = []
    hooks = [
        m.moe.experts.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
        for m in model.modules()
        if isinstance(m, MoEBlock)
    ]
    with torch.no_grad():
        out = model(src, src_mask, tgt, tgt_mask)
        # Other ids at the padded positions: the real positions' results are unchanged.
        other_src = src.masked_fill(~src_mask, 5)
        other_tgt = tgt.masked_fill(~tgt_mask, 7)
        again = model(other_src, src_mask, other_tgt, tgt_mask)
    for h in hooks:
        h.remove()
    k = model.config.moe.k
    # Encoder first, then decoder; then the second forward pass.
    assert rows == [int(src_mask.sum()) * k, int(tgt_mask.sum()) * k] * 2
    for layer, result in enumerate(out.moe):
        assert float(result.stats.tokens_per_expert.sum()) == rows[layer]
    torch.testing.assert_close(again.hidden[tgt_mask], out.hidden[tgt_mask], rtol=0, atol=0)


def test_the_moe_on_all_positions_at_once_is_the_moe_position_by_position():
    torch.manual_seed(3)
    model = TranslationModel(tiny_config()).double().eval()
    encoder_moe = next(b for b in model.encoder if isinstance(b, MoEBlock))
    h = torch.randn(5, 3, 16, dtype=torch.double)  # [S, B, D]
    with torch.no_grad():
        at_once, _ = encoder_moe(h)
        for s in range(5):
            alone, _ = encoder_moe(h[s : s + 1])
            torch.testing.assert_close(alone[0], at_once[s], rtol=0, atol=1e-12)


def test_gradients_reach_every_trained_parameter():
    torch.manual_seed(4)
    model = TranslationModel(tiny_config(router="noisy_topk", dropout=0.1)).train()
    src, src_mask, tgt, tgt_mask = batch([6, 3, 5], [4, 2, 4])
    out = model(src, src_mask, tgt, tgt_mask)
    nll = model.nll(out.hidden, tgt, label_smoothing=0.1)
    (nll[tgt_mask.reshape(-1)].mean() + out.aux_loss).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name


def test_a_capacity_never_drops_decoding_rows():
    """With a capacity of a quarter row per expert, the steps of one hypothesis do not depend
    on the others decoded beside it: decoding runs the MoE dropless."""
    torch.manual_seed(5)
    config = tiny_config(router="switch")
    config = dataclasses.replace(
        config, moe=dataclasses.replace(config.moe, k=1, capacity_factor=0.25)
    )
    model = TranslationModel(config).eval()
    src, src_mask, tgt, _ = batch([6, 6, 6, 6], [4, 4, 4, 4])
    with torch.no_grad():
        state = model.start_decoding(src.t(), src_mask.t())
        alone = model.start_decoding(src.t()[1:2], src_mask.t()[1:2])
        for t in range(tgt.shape[0]):
            step, single = model.decode_step(tgt[t], state), model.decode_step(tgt[t, 1:2], alone)
            torch.testing.assert_close(single.log_probs[0], step.log_probs[1], rtol=1e-5, atol=1e-6)
            state, alone = step.state, single.state


def test_a_decoding_step_with_no_rows():
    """A rank whose sentences are done still runs every MoE layer, with no rows."""
    model = TranslationModel(tiny_config()).eval()
    src, src_mask, _, _ = batch([4, 2], [1, 1])
    with torch.no_grad():
        nobody = model.start_decoding(src.t()[:0], src_mask.t()[:0])
        assert nobody.memory.shape == (0, 4, 16)
        state = model.start_decoding(src.t(), src_mask.t())
        empty = model.select_rows(state, torch.zeros(0, dtype=torch.long))
        step = model.decode_step(torch.zeros(0, dtype=torch.long), empty)
    assert step.log_probs.shape == (0, V)


def test_the_presets_have_the_papers_sizes():
    """§5.3: the 2048-expert model has ~8.7B parameters and 85M ops/timestep; the dense
    baseline spends what MoE-32 spends per position."""
    big = translation_model_size(TRANSLATION_PRESETS["NMT-MoE-2048-h"])
    assert round(big["total_params"] / 1e9, 1) == 8.7
    assert math.isclose(big["ops_per_timestep"]["total"], 85e6, rel_tol=0.03)
    dense = translation_model_size(TRANSLATION_PRESETS["NMT-dense"])["ops_per_timestep"]
    moe32 = translation_model_size(TRANSLATION_PRESETS["NMT-MoE-32"])["ops_per_timestep"]
    assert math.isclose(dense["total"], moe32["total"], rel_tol=0.005)
    # 512 → 2048 → 512 experts: 2M parameters each, 32 of them in each of the two layers.
    assert TRANSLATION_PRESETS["NMT-MoE-32"].moe.expert_hidden == 2048
