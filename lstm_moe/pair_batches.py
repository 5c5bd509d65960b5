"""Translation batches from a binarized parallel split (lstm_moe.pairs): sentence pairs of
similar lengths, padded into [S, B] / [T, B] tensors with masks.

Training. Each epoch is a permutation of the pairs drawn from the seed and the epoch number;
it is cut into pools of `POOL_BATCHES` batches, each pool sorted by (source, target) length and
cut into batches of `batch_size` pairs (so little padding is computed), and the order of the
batches is shuffled. Step s reads batch s mod n of epoch s // n: the schedule is a function of
the step, so a resumed run reads what an uninterrupted one would, and the task carries no state.
The < batch_size pairs an epoch does not fill a batch with are left out of that epoch.

Shares. A step's batch of B pairs is cut in M micro-batches of B/M consecutive pairs, each cut
over the W ranks in rank order, exactly as the language model's lanes (lstm_moe.tasks.lm): the
MoE layers route, in each call, the pairs one process routes in that micro-batch, in the same
order; padding never routes.

Evaluation reads a split in its order, in batches of up to `batch_size` pairs sorted by length
(the positions are kept, so results map back to their sentences).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lstm_moe.files import BOS_ID
from lstm_moe.pairs import PairSplit

__all__ = ["PairBatch", "PairBatches", "collate_pairs", "share", "sorted_batches"]

# Batches per pool sorted by length: larger pools pad less and shuffle less.
POOL_BATCHES = 64


@dataclass
class PairBatch:
    """src: [S, B] int64 (each sentence's ids with its EOS); src_mask: [S, B] bool;
    tgt_in: [T, B] (BOS, then the target without its EOS); targets: [T, B] (the target with
    its EOS); tgt_mask: [T, B] bool. False marks padding. indices: the pairs' positions in
    their split."""

    src: Tensor
    src_mask: Tensor
    tgt_in: Tensor
    targets: Tensor
    tgt_mask: Tensor
    indices: np.ndarray

    @property
    def n_targets(self) -> int:
        return int(self.tgt_mask.sum())


def _pad(sentences: list[np.ndarray]) -> tuple[Tensor, Tensor]:
    """Sentences of ids -> ([L, B] int64, 0 at padding; [L, B] bool mask, False there)."""
    length = max((len(s) for s in sentences), default=0)
    ids = np.zeros((length, len(sentences)), dtype=np.int64)
    mask = np.zeros((length, len(sentences)), dtype=bool)
    for b, sentence in enumerate(sentences):
        ids[: len(sentence), b] = sentence
        mask[: len(sentence), b] = True
    return torch.from_numpy(ids), torch.from_numpy(mask)


def collate_pairs(split: PairSplit, indices: np.ndarray) -> PairBatch:
    """The pairs `indices` of a split as one padded batch."""
    sources, targets = [], []
    for i in indices:
        src, tgt = split.pair(int(i))
        sources.append(np.asarray(src, dtype=np.int64))
        targets.append(np.asarray(tgt, dtype=np.int64))
    src, src_mask = _pad(sources)
    tgt, tgt_mask = _pad(targets)
    tgt_in = torch.cat([torch.full((1, tgt.shape[1]), BOS_ID), tgt[:-1]])  # [T, B]
    return PairBatch(src, src_mask, tgt_in, tgt, tgt_mask, np.asarray(indices))


def share(batch_size: int, micro: int, micro_batches: int, rank: int, world: int) -> slice:
    """The positions, within a step's batch of batch_size pairs, of micro-batch `micro` on
    rank `rank` (micro-batch-major, then rank order: see the module docstring)."""
    size = batch_size // (micro_batches * world)
    first = (micro * world + rank) * size
    return slice(first, first + size)


def sorted_batches(lengths: np.ndarray, batch_size: int, min_size: int = 1) -> list[np.ndarray]:
    """Evaluation batches: positions 0..n-1 sorted by length (stably), cut into batches of
    batch_size; a last batch smaller than min_size joins the one before it (so that each of
    min_size ranks gets at least one pair of every batch)."""
    order = np.argsort(lengths, kind="stable")
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < min_size:
        last = batches.pop()
        batches[-1] = np.concatenate([batches[-1], last])
    return batches


class PairBatches:
    """The training schedule of a split: batch_size pairs per step, as in the module docstring."""

    def __init__(self, split: PairSplit, batch_size: int, seed: int):
        if len(split) < batch_size:
            raise ValueError(
                f"the training split has {len(split)} pairs, fewer than batch_size {batch_size}"
            )
        self.split, self.batch_size, self.seed = split, batch_size, seed
        self.batches_per_epoch = len(split) // batch_size
        # Sort keys: source length first, target length to break ties.
        self._lengths = split.src_lengths * (int(split.tgt_lengths.max()) + 1) + split.tgt_lengths
        self._epoch: int | None = None
        self._batches: list[np.ndarray] = []

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.split))
        pool = self.batch_size * POOL_BATCHES
        batches: list[np.ndarray] = []
        for start in range(0, len(order), pool):
            members = order[start : start + pool]
            members = members[np.argsort(self._lengths[members], kind="stable")]
            full = len(members) // self.batch_size * self.batch_size
            batches.extend(members[:full].reshape(-1, self.batch_size))
        batches = batches[: self.batches_per_epoch]
        return [batches[i] for i in rng.permutation(len(batches))]

    def step_indices(self, step: int) -> np.ndarray:
        """The pairs (split positions) of step `step`'s whole batch, in batch order."""
        epoch, index = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch:
            self._batches, self._epoch = self._epoch_batches(epoch), epoch
        return self._batches[index]

    def batch(self, step: int, part: slice) -> PairBatch:
        return collate_pairs(self.split, self.step_indices(step)[part])
