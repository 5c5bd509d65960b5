"""Which experts each token of an evaluation is routed to, read from a trained model without
changing what it computes: a forward hook on the router of every MoE layer (the core's
MoELayer, and the attention experts' MoEProjection) keeps the (token, expert) pairs of the
Routing it returns (Routing.pairs: every pair the router chose, before any capacity), and the
caller maps each routed row back to the token of the input that sits there.

The row order. A layer flattens its input x[..., D] to rows [N, D] (moe/layer.py); every model
of this project hands its MoE layers [B, T, D] (lanes or sentences, then time), whatever layout
it computes in: the LSTM models move time after the batch (lstm_moe.lm.MoEBlock), the
Transformers are batch-first. So row r of a layer fed from [T, B] ids is ids[r % T, r // T]:
the ids transposed to [B, T] and flattened (rows_of). tests/eval/test_experts.py checks this
on each model family with a router whose choice is a known function of the token.

Padding: a masked row is routed nowhere (Router.forward), and rows_of's mask drops any pair of
a padded row as well, so only real tokens are counted.

Index letters: T time steps, B lanes (or sentences), N = B·T rows, P routed pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from torch import Tensor, nn

from lstm_moe.data import LaneBatches
from lstm_moe.files import BOS_ID, EOS_ID
from lstm_moe.moe import MoELayer, MoEProjection
from lstm_moe.pair_batches import collate_pairs, sorted_batches
from lstm_moe.pairs import PairSplit


def rows_of(ids: Tensor) -> Tensor:
    """[T, B] (ids, positions or a mask) -> [B·T] in the order an MoE layer routes its rows."""
    return ids.t().reshape(-1)


@dataclass
class RoutedCall:
    """One router call: its layer's name, the rows it was given, and its routed pairs."""

    name: str
    n_rows: int
    token: Tensor  # [P] int64, row of each pair
    expert: Tensor  # [P] int64


class RoutingRecorder:
    """Hooks the router of every MoE layer of `model` while in a `with` block.

    layers: name -> the MoE module (MoELayer or MoEProjection), in the order the model first
    called them, which is the order of the model's MoE results (moe0, moe1, ...). take(): the
    calls since the last take, in call order."""

    def __init__(self, model: nn.Module):
        self.modules = {
            name: module
            for name, module in model.named_modules()
            if isinstance(module, (MoELayer, MoEProjection))
        }
        self.layers: dict[str, nn.Module] = {}
        self.calls: list[RoutedCall] = []
        self.handles: list = []

    def __enter__(self) -> RoutingRecorder:
        for name, module in self.modules.items():
            hook = partial(self._record, name)
            self.handles.append(module.router.register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _record(self, name: str, router: nn.Module, args: tuple, routing) -> None:
        # args[0]: the router's input x [N, D]; routing: the Routing it returned.
        self.layers.setdefault(name, self.modules[name])
        token, expert, _ = routing.pairs()  # [P] each
        self.calls.append(RoutedCall(name, args[0].shape[0], token.cpu(), expert.cpu()))

    def take(self) -> list[RoutedCall]:
        calls, self.calls = self.calls, []
        return calls


@dataclass
class TokenTable:
    """The tokens one side of an evaluation routes, each once: ids [N] int64; topic [N] int64
    or None (no topics known); left, right [N] int64: the neighbouring tokens of the same
    sentence (-1 at its edges), for contexts."""

    ids: np.ndarray
    topic: np.ndarray | None
    left: np.ndarray
    right: np.ndarray


@dataclass
class LayerRouting:
    """Every routed pair of one MoE layer over an evaluation: token [P] (an index into the
    side's TokenTable), expert [P]; side: "lm", "encoder" or "decoder"."""

    name: str
    side: str
    n_experts: int
    experts_per_token: int
    token: list[np.ndarray] = field(default_factory=list)
    expert: list[np.ndarray] = field(default_factory=list)

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(token [P], expert [P]) over every batch."""
        empty = np.zeros(0, dtype=np.int64)
        token = np.concatenate(self.token) if self.token else empty
        expert = np.concatenate(self.expert) if self.expert else empty
        return token, expert


def _neighbours(starts: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the left and right neighbour of each of n tokens (-1 across a sentence
    boundary), sentences beginning at `starts` (sorted, starts[0] = 0)."""
    index = np.arange(n)
    left, right = index - 1, index + 1
    if n == 0:
        return left, right
    first = np.zeros(n, dtype=bool)
    first[starts[starts < n]] = True
    left[first] = -1
    last = np.roll(first, -1)  # the token before a sentence's first, and the very last
    last[-1] = True
    right[last] = -1
    return left, right


def _context_ids(ids: np.ndarray, neighbour: np.ndarray) -> np.ndarray:
    return np.where(neighbour >= 0, ids[np.maximum(neighbour, 0)], -1)


def _accumulate(
    recorder: RoutingRecorder,
    found: dict[str, LayerRouting],
    side_of: dict[str, tuple[Tensor, Tensor]],
) -> None:
    """Map this forward's router calls to token indices. side_of: side -> (table index [N]
    of each row, mask [N] of real rows), rows in the order the layers route them."""
    for call in recorder.take():
        module = recorder.layers[call.name]
        side = _side(call.name, side_of)
        index, real = side_of[side]
        if call.n_rows != index.numel():
            raise RuntimeError(
                f"{call.name} routed {call.n_rows} rows where the batch has {index.numel()}: "
                "the model's layout is not the one this evaluation assumes"
            )
        keep = real[call.token]  # [P] a pair of a padded row is never counted
        layer = found.setdefault(
            call.name,
            LayerRouting(call.name, side, module.config.n_experts, module.config.experts_per_token),
        )
        layer.token.append(index[call.token[keep]].numpy())
        layer.expert.append(call.expert[keep].numpy())


def _side(name: str, side_of: dict) -> str:
    """A translation model's layers live under `encoder` or `decoder`; an LM's are all "lm"."""
    if "lm" in side_of:
        return "lm"
    side = name.split(".")[0]
    if side not in side_of:
        raise ValueError(f"MoE layer {name} is neither in the encoder nor in the decoder")
    return side


def _ordered(recorder: RoutingRecorder, found: dict[str, LayerRouting]) -> list[LayerRouting]:
    return [found[name] for name in recorder.layers if name in found]


# ----------------------------------------------------------------------------- language model


def lm_tokens(ids: np.ndarray, sentence_topic: np.ndarray | None) -> TokenTable:
    """The inputs of the stream a language model reads from a split's ids [N] (lstm_moe.data:
    `</S>` then the ids), one per target: position p holds `</S>` for p = 0, else ids[p - 1].
    A token's topic is its sentence's (the `</S>` ending sentence s is s's, the leading one
    sentence 0's). sentence_topic: [S] int64, one per `</S>` of the ids, or None."""
    ids = np.asarray(ids, dtype=np.int64)
    stream = np.concatenate([[EOS_ID], ids[:-1]])  # [N] input at each position
    topic = None
    if sentence_topic is not None:
        # The sentence each id belongs to: the number of </S> before it.
        sentence = np.concatenate([[0], np.cumsum(ids == EOS_ID)[:-1]])  # [N]
        n_sentences = int(sentence[-1]) + 1 if len(ids) else 0
        if len(sentence_topic) < n_sentences:
            raise ValueError(f"{len(sentence_topic)} sentence topics for {n_sentences} sentences")
        topic = np.asarray(sentence_topic, dtype=np.int64)[np.concatenate([[0], sentence[:-1]])]
    # A sentence of the stream starts after each </S> input.
    starts = np.concatenate([[0], np.flatnonzero(stream == EOS_ID) + 1])
    left, right = _neighbours(starts, len(stream))
    return TokenTable(stream, topic, _context_ids(stream, left), _context_ids(stream, right))


@torch.no_grad()
def lm_routing(
    model: nn.Module, ids: np.ndarray, device: torch.device, batch_size: int, bptt: int
) -> list[LayerRouting]:
    """Every MoE layer's routing over a split's ids [N] (N targets, the model's inputs being
    lm_tokens(ids).ids), read in the lanes and windows of evaluation (lstm_moe.tasks.lm
    .evaluate: the LSTM state carried from window to window, the last window's padding
    masked). Token indices are stream positions."""
    batch_size = max(1, min(batch_size, len(ids)))
    batches = LaneBatches(ids, batch_size, bptt, EOS_ID, keep_remainder=True)
    # The same layout over the positions 1..N: its inputs are each cell's stream position.
    where = LaneBatches(np.arange(1, len(ids) + 1), batch_size, bptt, 0, keep_remainder=True)
    model.eval()
    found: dict[str, LayerRouting] = {}
    state = None
    with RoutingRecorder(model) as recorder:
        for index in range(len(batches)):
            window = batches.window(index)
            if window.first:
                state = None
            mask = window.mask.to(device) if batches.has_padding(index) else None
            out = model(window.inputs.to(device), state, mask=mask)
            state = out.state
            position = where.window(index).inputs  # [T, B]
            side_of = {"lm": (rows_of(position), rows_of(window.mask))}
            _accumulate(recorder, found, side_of)
    return _ordered(recorder, found)


# ----------------------------------------------------------------------------- translation


def pair_tokens(
    split: PairSplit, n_pairs: int, pair_topic: np.ndarray | None
) -> dict[str, TokenTable]:
    """The tokens the encoder and the decoder route over the first n_pairs pairs: each
    source's ids with its EOS, and each decoder input (BOS, then the target without its EOS),
    flat in pair order; a token's topic is its pair's."""
    offsets = np.asarray(split.offsets[: n_pairs + 1], dtype=np.int64)  # [n+1, 2]
    tables = {}
    for side, column in (("encoder", 0), ("decoder", 1)):
        data = split.src if column == 0 else split.tgt
        flat = np.asarray(data[: offsets[-1, column]], dtype=np.int64)  # [N]
        starts = offsets[:-1, column]
        if side == "decoder":  # teacher forcing: position t reads target t - 1, BOS first
            flat = np.concatenate([[BOS_ID], flat[:-1]])
            flat[starts] = BOS_ID
        topic = None
        if pair_topic is not None:
            lengths = np.diff(offsets[:, column])  # [n]
            topic = np.repeat(np.asarray(pair_topic[:n_pairs], dtype=np.int64), lengths)
        left, right = _neighbours(starts, len(flat))
        tables[side] = TokenTable(flat, topic, _context_ids(flat, left), _context_ids(flat, right))
    return tables


def _flat_index(offsets: np.ndarray, indices: np.ndarray, mask: Tensor) -> Tensor:
    """[L, B] index into a side's flat tokens of each cell of a batch of pairs `indices`
    (starting at offsets [n+1] of that side), 0 at padding."""
    length = mask.shape[0]
    index = torch.from_numpy(offsets[indices])[None, :] + torch.arange(length)[:, None]
    return index.masked_fill(~mask, 0)


@torch.no_grad()
def pair_routing(
    model: nn.Module, split: PairSplit, n_pairs: int, device: torch.device, batch_size: int
) -> list[LayerRouting]:
    """Every MoE layer's routing over the first n_pairs pairs, teacher-forced in the
    length-sorted batches of evaluation (lstm_moe.tasks.translation.evaluate_pairs). Token
    indices are into pair_tokens' tables: the encoder's layers index the sources, the
    decoder's the decoder inputs."""
    offsets = np.asarray(split.offsets[: n_pairs + 1], dtype=np.int64)
    model.eval()
    found: dict[str, LayerRouting] = {}
    with RoutingRecorder(model) as recorder:
        for indices in sorted_batches(split.src_lengths[:n_pairs], batch_size):
            batch = collate_pairs(split, indices)
            model(
                batch.src.to(device),
                batch.src_mask.to(device),
                batch.tgt_in.to(device),
                batch.tgt_mask.to(device),
            )
            side_of = {
                "encoder": (
                    rows_of(_flat_index(offsets[:, 0], indices, batch.src_mask)),
                    rows_of(batch.src_mask),
                ),
                "decoder": (
                    rows_of(_flat_index(offsets[:, 1], indices, batch.tgt_mask)),
                    rows_of(batch.tgt_mask),
                ),
            }
            _accumulate(recorder, found, side_of)
    return _ordered(recorder, found)


__all__ = [
    "LayerRouting",
    "RoutedCall",
    "RoutingRecorder",
    "TokenTable",
    "lm_routing",
    "lm_tokens",
    "pair_routing",
    "pair_tokens",
    "rows_of",
]
