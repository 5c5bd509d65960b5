"""The language model's pieces: lanes cover the stream exactly once, the sampled softmax
estimates the exact one, and the MoE applied to [T, B, D] at once equals step by step."""

import itertools
import math

import numpy as np
import pytest
import torch

from lstm_moe.config import LMConfig
from lstm_moe.data import LaneBatches
from lstm_moe.fields import apply_overrides
from lstm_moe.lm import LanguageModel
from lstm_moe.moe.experts import BatchedExperts
from lstm_moe.softmax import Softmax, log_uniform_log_prob, sample_log_uniform


@pytest.mark.parametrize("n_tokens,batch,bptt", [(23, 4, 3), (24, 4, 6), (5, 5, 2), (7, 2, 10)])
def test_eval_lanes_predict_every_token_once(n_tokens, batch, bptt):
    ids = np.arange(10, 10 + n_tokens, dtype=np.uint16)
    batches = LaneBatches(ids, batch, bptt, eos_id=1, keep_remainder=True)
    pairs = []
    for window in batches:
        m = window.mask
        pairs += list(zip(window.inputs[m].tolist(), window.targets[m].tolist(), strict=True))
    stream = [1, *ids.tolist()]  # </S> starts the stream
    assert sorted(pairs) == sorted(itertools.pairwise(stream))


def test_train_lanes_drop_only_the_remainder_and_continue_across_windows():
    ids = np.arange(100, 123, dtype=np.uint16)  # 23 tokens, 4 lanes of 5
    batches = LaneBatches(ids, 4, 2, eos_id=1, keep_remainder=False)
    assert batches.n_targets == 20 and len(batches) == 3
    lane0 = torch.cat([w.targets[:, 0] for w in batches]).tolist()
    assert lane0 == [100, 101, 102, 103, 104]
    lane1_inputs = torch.cat([w.inputs[:, 1] for w in batches]).tolist()
    assert lane1_inputs == [104, 105, 106, 107, 108]  # lane 1 starts where lane 0 ends


def test_log_uniform_sampler_matches_its_probabilities():
    vocab = 50
    q = log_uniform_log_prob(torch.arange(vocab), vocab).exp()
    assert math.isclose(float(q.sum()), 1.0, rel_tol=1e-6)
    g = torch.Generator().manual_seed(0)
    n = 200_000
    freq = torch.bincount(sample_log_uniform(n, vocab, g), minlength=vocab).float() / n
    # Binomial standard error is at most sqrt(0.25 / n) ≈ 0.0011; allow 5 of them.
    assert torch.allclose(freq, q, atol=5 * math.sqrt(0.25 / n))


@pytest.mark.parametrize("n_samples", [2_000, 40_000])
def test_sampled_softmax_converges_to_the_exact_loss(n_samples):
    """With many samples (drawn with repeats, more than the 50 words) the importance-sampled
    partition function approaches the exact one (accidental hits removed, the target counted
    once, exactly), and the closer the more samples."""
    torch.manual_seed(0)
    softmax = Softmax(8, 50)
    hidden, targets = torch.randn(6, 8), torch.randint(0, 50, (6,))
    exact = softmax.nll(hidden, targets)
    g = torch.Generator().manual_seed(1)
    estimate = softmax._sampled_nll(hidden, targets, sample_log_uniform(n_samples, 50, g))
    tolerance = 10.0 / math.sqrt(n_samples)  # the estimate's spread falls as 1/√S
    torch.testing.assert_close(estimate, exact, atol=tolerance, rtol=0)
    small = softmax._sampled_nll(hidden, targets, sample_log_uniform(16, 50, g))
    assert not torch.allclose(small, exact, atol=1e-3)  # a small sample is noisy


def test_sampled_softmax_hand_computed():
    """Four words, logits set by hand; samples [1, 3, 3, 0] for targets 3 and 2: the target's
    logit enters as it is, each sample's as l_s - log(S·Q(s)), and a sample equal to the target
    is dropped."""
    softmax = Softmax(1, 4, n_samples=4)
    logits = torch.tensor([0.5, -1.0, 2.0, 1.0])
    with torch.no_grad():
        softmax.weight.copy_(logits[:, None])
        softmax.bias.zero_()
    hidden, targets = torch.ones(2, 1), torch.tensor([3, 2])
    samples = torch.tensor([1, 3, 3, 0])
    q = [math.log((c + 2) / (c + 1)) / math.log(5) for c in range(4)]

    def weight(c):
        return math.exp(float(logits[c])) / (4 * q[c])

    # Target 3: the two samples equal to 3 are accidental hits.
    want_3 = math.log(math.exp(1.0) + weight(1) + weight(0)) - 1.0
    want_2 = math.log(math.exp(2.0) + weight(1) + 2 * weight(3) + weight(0)) - 2.0
    got = softmax._sampled_nll(hidden, targets, samples)
    torch.testing.assert_close(got, torch.tensor([want_3, want_2]), atol=1e-5, rtol=1e-5)


def test_exact_softmax_in_chunks_equals_one_shot(monkeypatch):
    import lstm_moe.softmax as softmax_module

    torch.manual_seed(0)
    softmax = Softmax(8, 30)
    hidden, targets = torch.randn(11, 8), torch.randint(0, 30, (11,))
    want = torch.nn.functional.cross_entropy(softmax.logits(hidden), targets, reduction="none")
    monkeypatch.setattr(softmax_module, "_LOGITS_PER_CHUNK", 90)  # 3 rows at a time
    torch.testing.assert_close(softmax.nll(hidden, targets), want)


def small_config(**changes) -> LMConfig:
    small = dict(vocab_size=30, d_model=8, lstm_hidden=8, n_experts=4, k=2, expert_hidden=8)
    return apply_overrides(LMConfig(), {**small, "softmax": "full", **changes})


def test_moe_runs_on_all_time_steps_at_once():
    """In eval mode the LM's MoE over [T, B, D] equals calling it one time step at a time."""
    torch.manual_seed(0)
    model = LanguageModel(small_config(dropout=0.0)).eval()
    with torch.no_grad():
        for p in model.blocks[1].moe.router.parameters():
            p.normal_()
    x = torch.randn(5, 3, 8)
    block = model.blocks[1]
    at_once = block(x)[0]
    step_by_step = torch.stack([block(x[t])[0] for t in range(5)])
    torch.testing.assert_close(at_once, step_by_step)


def test_residual_dropout_and_sigmoid_structure():
    """With dropout off, each block's contribution is added to its input: h + f(h), and the
    MoE's f is a sigmoid (values in (0, 1))."""
    torch.manual_seed(0)
    model = LanguageModel(small_config(dropout=0.0)).eval()
    inputs = torch.randint(0, 30, (4, 2))
    h = model.embedding(inputs)
    lstm_out, _ = model.blocks[0](h, None)
    h1 = h + lstm_out
    moe_out, _ = model.blocks[1](h1)
    assert moe_out.min() > 0 and moe_out.max() < 1
    h2 = h1 + moe_out
    h3 = h2 + model.blocks[2](h2, None)[0]
    torch.testing.assert_close(model(inputs).hidden, h3)


def test_lstmp_projects_to_d_model():
    model = LanguageModel(small_config(layers=("lstm",), lstm_hidden=32))
    out = model(torch.randint(0, 30, (3, 2)))
    assert out.hidden.shape == (3, 2, 8)
    lstm = model.blocks[0]
    assert lstm.ops_per_timestep() == 4 * 32 * (8 + 8) + 32 * 8
    assert not lstm.lstm.bias_hh_l0.requires_grad and lstm.lstm.bias_hh_l0.abs().sum() == 0


def test_parameter_counts_are_the_whole_models_on_any_number_of_ranks():
    """A rank of 2 holds half the experts; the counts it reports are still the model's."""
    whole = LanguageModel(small_config())
    sharded = LanguageModel(small_config())
    moe = sharded.blocks[1].moe
    cfg = moe.config
    moe.experts = BatchedExperts(
        cfg.n_experts, cfg.d_model, cfg.expert_hidden, cfg.expert_bias, (0, cfg.n_experts // 2)
    )
    moe.group.world_size = 2  # what a ParallelGroup of 2 ranks reports
    held = sum(p.numel() for p in sharded.parameters())
    assert held < sum(p.numel() for p in whole.parameters())
    for count in ("params_excluding_embedding_softmax", "total_params"):
        assert getattr(sharded, count)() == getattr(whole, count)(), count


def test_moe_ops_count_each_routers_gating_matrices():
    """Per token: k experts of 2·D·H multiply-adds, plus W_g and W_noise for the noisy gate,
    W_g alone for batchwise, W_r alone for switch."""
    expert, gate = 2 * 8 * 8, 8 * 4
    for router, k, gates in (
        ("noisy_topk", 2, 2 * gate),
        ("batchwise", 2, gate),
        ("switch", 1, gate),
    ):
        block = LanguageModel(small_config(router=router, k=k)).blocks[1]
        assert block.ops_per_timestep() == k * expert + gates, router


def test_moe_ops_count_a_geglu_experts_three_matrices():
    """GEGLU experts multiply by W_in, W_gate and W_out: 3·D·H per expert a token uses."""
    block = LanguageModel(small_config(expert_activation="geglu")).blocks[1]
    assert block.moe.config.expert_ops_per_token() == 3 * 8 * 8
    assert block.ops_per_timestep() == 2 * 3 * 8 * 8 + 2 * 8 * 4  # k = 2, noisy gate


@pytest.mark.parametrize("n_tokens,batch,bptt", [(23, 4, 3), (24, 4, 6), (61, 4, 5), (7, 2, 10)])
def test_a_window_has_padding_exactly_when_a_lane_of_the_layout_is_padded(n_tokens, batch, bptt):
    ids = np.arange(10, 10 + n_tokens, dtype=np.uint16)
    full = LaneBatches(ids, batch, bptt, eos_id=1, keep_remainder=True)
    last_lane = LaneBatches(ids, batch, bptt, eos_id=1, keep_remainder=True,
                            lanes=(batch - 1, batch))  # fmt: skip
    first_lane = LaneBatches(ids, batch, bptt, eos_id=1, keep_remainder=True, lanes=(0, 1))
    for index in range(len(full)):
        padded = not bool(full.window(index).mask.all())
        assert full.has_padding(index) == padded
        # A rank holding only unpadded lanes gets the same answer.
        assert first_lane.has_padding(index) == last_lane.has_padding(index) == padded
    assert any(full.has_padding(i) for i in range(len(full))) == (n_tokens % batch != 0)
