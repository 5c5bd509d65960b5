"""Language-model batches from a binarized split (data_prep.binarize): B parallel lanes of one
token stream, served as [T, B] windows for truncated backpropagation through time.

The stream a model reads is `</S>` followed by the split's ids (each sentence already ends with
`</S>`): position i's input is stream[i] and its target stream[i + 1], so every word and every
`</S>` of the split is a target exactly once. The stream is cut into B equal lanes, lane b
holding positions [b·L, (b+1)·L); window w holds steps [w·T, (w+1)·T) of every lane, and the
LSTM state carries from one window to the next within a lane.

Training drops the < B tokens that do not fill a lane. Evaluation keeps every token: lanes are
padded to equal length and a mask marks the real ones, so a perplexity counts each target once.
Windows are read straight from the memmap, so a 3 GB split costs no memory.

`lanes=(first, last)` serves only lanes [first, last) of that same layout: the share of one rank
under data parallelism, so that W ranks together read exactly the tokens one process reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass
class Window:
    """inputs, targets: [T, B] int64; mask: [T, B] bool (False on padding); first: whether
    this window starts the lanes (the LSTM state must be reset)."""

    inputs: Tensor
    targets: Tensor
    mask: Tensor
    first: bool


class LaneBatches:
    def __init__(
        self,
        ids: np.ndarray,
        batch_size: int,
        bptt: int,
        eos_id: int,
        keep_remainder: bool,
        lanes: tuple[int, int] | None = None,
    ):
        if batch_size < 1 or bptt < 1:
            raise ValueError(f"batch_size and bptt must be >= 1, got {batch_size} and {bptt}")
        self.lanes = (0, batch_size) if lanes is None else tuple(lanes)
        if not 0 <= self.lanes[0] < self.lanes[1] <= batch_size:
            raise ValueError(f"lanes {self.lanes} are not a range of [0, {batch_size})")
        self.ids, self.eos_id = ids, eos_id
        self.batch_size, self.bptt = batch_size, bptt
        n_targets = len(ids)
        if keep_remainder:
            self.lane_length = math.ceil(n_targets / batch_size)
        else:
            self.lane_length = n_targets // batch_size
        if self.lane_length == 0:
            raise ValueError(
                f"a split of {n_targets} tokens cannot fill {batch_size} lanes; use a smaller "
                "batch_size"
            )
        self.n_targets = n_targets if keep_remainder else self.lane_length * batch_size
        self.n_windows = math.ceil(self.lane_length / bptt)

    def __len__(self) -> int:
        return self.n_windows

    def _stream(self, positions: np.ndarray) -> np.ndarray:
        """stream[p] = </S> for p = 0, else ids[p - 1]; positions past the end give </S>."""
        inside = (positions >= 1) & (positions <= len(self.ids))
        values = np.full(positions.shape, self.eos_id, dtype=np.int64)
        values[inside] = self.ids[positions[inside] - 1]
        return values

    def window(self, index: int) -> Window:
        if not 0 <= index < self.n_windows:
            raise IndexError(f"window {index} out of range [0, {self.n_windows})")
        start = index * self.bptt
        steps = min(self.bptt, self.lane_length - start)
        lane_start = np.arange(*self.lanes, dtype=np.int64) * self.lane_length  # [lanes]
        positions = (
            lane_start[None, :] + start + np.arange(steps, dtype=np.int64)[:, None]
        )  # [T, B]
        mask = positions < self.n_targets
        inputs = self._stream(positions)
        targets = self._stream(positions + 1)
        return Window(
            torch.from_numpy(inputs),
            torch.from_numpy(targets),
            torch.from_numpy(mask),
            first=index == 0,
        )

    def has_padding(self, index: int) -> bool:
        """Whether window `index` holds padding in any lane of the whole layout (not only
        this rank's lanes): the same answer on every rank. Padding is the end of the stream,
        so the window's last step of the last lane is the latest position it holds."""
        start = index * self.bptt
        steps = min(self.bptt, self.lane_length - start)
        return (self.batch_size - 1) * self.lane_length + start + steps - 1 >= self.n_targets

    def __iter__(self):
        for index in range(self.n_windows):
            yield self.window(index)
