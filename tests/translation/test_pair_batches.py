"""Translation batches (lstm_moe.pair_batches): the schedule is a function of (seed, step),
each epoch reads every pair at most once, shares partition a step's batch, and batches are
padded with BOS-led decoder inputs and EOS-ended targets."""

from __future__ import annotations

import numpy as np
import pytest

from lstm_moe.files import BOS_ID, EOS_ID
from lstm_moe.pair_batches import PairBatches, collate_pairs, share, sorted_batches
from lstm_moe.pairs import PairSplit


def make_split(n: int, seed: int = 0) -> PairSplit:
    """n pairs: source i is [i + 3] * len + EOS, target the same plus one word."""
    rng = np.random.default_rng(seed)
    src, tgt, offsets = [], [], [[0, 0]]
    for i in range(n):
        length = int(rng.integers(1, 9))
        src += [i % 50 + 3] * length + [EOS_ID]
        tgt += [i % 50 + 3] * (length + 1) + [EOS_ID]
        offsets.append([len(src), len(tgt)])
    return PairSplit(np.asarray(src), np.asarray(tgt), np.asarray(offsets, dtype=np.int64))


def test_the_schedule_is_a_function_of_seed_and_step():
    split = make_split(203)
    a, b = PairBatches(split, 8, seed=5), PairBatches(split, 8, seed=5)
    assert len(a) == 203 // 8
    steps = [0, 3, 30, 1, 77, 26, 25]  # across epochs and back
    for step in steps:
        np.testing.assert_array_equal(a.step_indices(step), b.step_indices(step))
    other = PairBatches(split, 8, seed=6)
    assert any((a.step_indices(s) != other.step_indices(s)).any() for s in range(5))
    # Each epoch reads every pair at most once, and all but the < 8 left over.
    for epoch in range(3):
        seen = np.concatenate([a.step_indices(epoch * len(a) + i) for i in range(len(a))])
        assert len(seen) == len(np.unique(seen)) == len(a) * 8
    # Epochs are shuffled differently.
    assert (a.step_indices(0) != a.step_indices(len(a))).any()


def test_batches_are_length_sorted_within_pools():
    split = make_split(64 * 8 * 2)
    schedule = PairBatches(split, 8, seed=1)
    spreads = [np.ptp(split.src_lengths[schedule.step_indices(s)]) for s in range(len(schedule))]
    # Pools of 64 batches sorted by length: most batches hold one source length.
    assert np.median(spreads) == 0


def test_shares_partition_a_step_in_micro_batch_then_rank_order():
    parts = [share(16, m, 2, r, 2) for m in range(2) for r in range(2)]
    covered = np.concatenate([np.arange(16)[p] for p in parts])
    np.testing.assert_array_equal(covered, np.arange(16))
    assert parts[1] == slice(4, 8)  # micro-batch 0, rank 1


def test_collate_pads_with_masks_and_shifts_the_target():
    split = make_split(5)
    batch = collate_pairs(split, np.array([2, 0]))
    src2, tgt2 = split.pair(2)
    S, T = max(len(split.pair(i)[0]) for i in (0, 2)), max(len(split.pair(i)[1]) for i in (0, 2))
    assert batch.src.shape == batch.src_mask.shape == (S, 2)
    assert batch.targets.shape == batch.tgt_in.shape == batch.tgt_mask.shape == (T, 2)
    np.testing.assert_array_equal(batch.src[: len(src2), 0].numpy(), src2)
    np.testing.assert_array_equal(batch.targets[: len(tgt2), 0].numpy(), tgt2)
    assert (batch.tgt_in[0] == BOS_ID).all()
    np.testing.assert_array_equal(batch.tgt_in[1 : len(tgt2), 0].numpy(), tgt2[:-1])
    assert batch.n_targets == sum(len(split.pair(i)[1]) for i in (0, 2))
    assert int(batch.src_mask[:, 1].sum()) == len(split.pair(0)[0])


def test_evaluation_batches_keep_every_position_once():
    lengths = np.array([5, 1, 3, 3, 9, 2, 7])
    batches = sorted_batches(lengths, 3, min_size=2)
    flat = np.concatenate(batches)
    np.testing.assert_array_equal(np.sort(flat), np.arange(7))
    assert [len(b) for b in batches] == [3, 4]  # the last single pair joined the one before
    assert list(lengths[flat]) == sorted(lengths)


def test_too_few_pairs_for_a_batch_is_an_error():
    with pytest.raises(ValueError, match="fewer than batch_size"):
        PairBatches(make_split(3), 8, seed=1)
