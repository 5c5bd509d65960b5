"""The paper's translation model (Shazeer et al. 2017, §5.3, App. E and G): a GNMT-style
encoder-decoder of LSTMs with a sparsely-gated MoE layer in each half.

"We decreased the number of LSTM layers in the encoder and decoder from 9 and 8 to 3 and 2
... inserted MoE layers in both the encoder (between layers 2 and 3) and the decoder (between
layers 1 and 2) ... with the first decoder LSTM receiving output from and providing input for
the attention ... residual connections around all LSTM and MoE layers" (App. E). Every layer
is `h + Dropout(f(h))`; the MoE output passes through a sigmoid first (as in the LM, App. C.1).
Each MoE runs on all positions of the batch in one call, padding masked out: the paper's
"convolutional" application, in the encoder over every source position and in the decoder
(in training) over every target position.

Wiring (the choices the paper leaves open are NMTConfig's, documented there):
  encoder  embed → [bidirectional] LSTM → LSTM → MoE → LSTM                 memory x_1..x_S
  decoder  embed(y_{j-1}) ⊕ a_{j-1} → LSTM_1 → h1_j → attention → a_j
           h1_j → MoE → m_j;  m_j ⊕ a_j → LSTM_2 → softmax
The attention context a_j feeds every decoder LSTM above the first (GNMT §3) and, with input
feeding, the first one at the next step. Its score is App. G's factored function, or GNMT's
additive one; the context is the softmax-weighted sum of the encoder's outputs over the real
source positions.

Index letters: S source positions, T target positions, B sentences, D model width, n the
attention's hidden width, V the vocabulary, N decoder rows while decoding.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lstm_moe.config import NMTConfig
from lstm_moe.decoding import DecodeStep
from lstm_moe.lm import FFNBlock, LSTMBlock, LSTMState, MoEBlock, trained_params
from lstm_moe.moe import MoEOutput
from lstm_moe.softmax import Softmax

__all__ = ["DecoderState", "NMTOutput", "TranslationModel"]


class BiLSTMBlock(nn.Module):
    """The first encoder layer read both ways (GNMT §3.1): each direction has half the cells,
    projected to half the width, and their outputs are concatenated to d_model. Padded
    sentences are packed, so each backward pass starts at its sentence's last real word and a
    sentence's encoding does not depend on the others of its batch."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.d_model, self.hidden = d_model, hidden
        half, cells = d_model // 2, hidden // 2
        self.lstm = nn.LSTM(
            d_model, cells, proj_size=half if cells != half else 0, bidirectional=True
        )
        # One bias per gate, as in LSTMBlock (PyTorch's second bias is held at zero).
        for name in ("bias_hh_l0", "bias_hh_l0_reverse"):
            bias = getattr(self.lstm, name)
            with torch.no_grad():
                bias.zero_()
            bias.requires_grad_(False)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        """x: [S, B, D]; lengths: [B] real positions per sentence -> [S, B, D], zero at
        padding."""
        if x.shape[1] == 0:  # no sentence (a rank with none left still runs the MoE layers)
            return x.new_zeros(x.shape)
        with torch.autocast(x.device.type, enabled=False):
            packed = pack_padded_sequence(
                x.to(self.lstm.weight_ih_l0.dtype), lengths.cpu().clamp(min=1), enforce_sorted=False
            )
            out, _ = self.lstm(packed)
            out, _ = pad_packed_sequence(out, total_length=x.shape[0])
        return out

    def ops_per_timestep(self) -> int:
        half, cells = self.d_model // 2, self.hidden // 2
        recurrent = half if cells != half else cells
        projection = cells * half if cells != half else 0
        return 2 * (4 * cells * (self.d_model + recurrent) + projection)


class Attention(nn.Module):
    """score(x_i, y) over source positions i, softmax over the real ones, context Σ_i p_i x_i.

    "factored" (App. G): A(x_i, y) = Σ_d V_d tanh((x_i U)_d) tanh((y W)_d): the source side
    tanh(x U)·V is computed once per sentence and every query costs one product with it.
    "additive" (GNMT): A(x_i, y) = Σ_d V_d tanh((x_i U)_d + (y W)_d): a tanh per (i, query).
    """

    def __init__(self, d_model: int, hidden: int, kind: str):
        super().__init__()
        self.kind = kind
        self.source = nn.Linear(d_model, hidden, bias=False)  # U
        self.query = nn.Linear(d_model, hidden, bias=False)  # W
        self.v = nn.Parameter(torch.empty(hidden))  # V
        nn.init.normal_(self.v, std=hidden**-0.5)

    def keys(self, memory: Tensor) -> Tensor:
        """memory: [B, S, D] -> the source side of the score, [B, S, n]."""
        projected = self.source(memory)
        return torch.tanh(projected) * self.v if self.kind == "factored" else projected

    def forward(
        self, keys: Tensor, memory: Tensor, src_mask: Tensor, queries: Tensor
    ) -> tuple[Tensor, Tensor]:
        """keys: [B, S, n]; memory: [B, S, D]; src_mask: [B, S] bool; queries: [B, T, D].
        Returns the contexts [B, T, D] and the attention probabilities [B, T, S]."""
        q = self.query(queries)  # [B, T, n]
        if self.kind == "factored":
            scores = torch.tanh(q) @ keys.transpose(1, 2)  # [B, T, S]
        else:
            scores = torch.tanh(keys[:, None] + q[:, :, None]) @ self.v  # [B, T, S]
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
        scores = scores.masked_fill(~src_mask[:, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        # A sentence with no real position (only zero-row decoding steps reach here with none)
        # would give NaN: such rows attend to nothing.
        probs = torch.nan_to_num(probs, nan=0.0)
        return (probs.to(memory.dtype) @ memory), probs  # [B, T, D], [B, T, S]

    def ops_per_timestep(self) -> int:
        """Multiply-adds per target position, excluding the per-source-position terms (which
        scale with the sentence length): the query projection."""
        return self.query.weight.numel()


@dataclass
class NMTOutput:
    """hidden: [T, B, D] the decoder's top layer (the softmax input); aux_loss: the sum of the
    MoE layers' weighted balancing losses; moe: their results, encoder's first."""

    hidden: Tensor
    aux_loss: Tensor
    moe: list[MoEOutput]


@dataclass
class DecoderState:
    """What decoding carries from step to step, one row per hypothesis: the encoder's output
    (memory [N, S, D], the attention's source side keys [N, S, n], src_mask [N, S]), each
    decoder LSTM's (h, c) ([1, N, ·]), and the last attention context [N, D]."""

    memory: Tensor
    keys: Tensor
    src_mask: Tensor
    lstm: list[LSTMState | None]
    context: Tensor


class TranslationModel(nn.Module):
    """process_group: expert parallelism over its ranks (§3.1): each rank holds its share of
    each MoE layer's experts and a replica of everything else; None is one process.

    Training: forward(src, src_mask, tgt_in, tgt_mask) with teacher forcing, then nll().
    Decoding: the lstm_moe.decoding.IncrementalDecoder interface."""

    def __init__(self, config: NMTConfig, process_group: dist.ProcessGroup | None = None):
        super().__init__()
        self.config = config
        d = config.d_model
        self.src_embedding = nn.Embedding(config.vocab_size, d)
        self.tgt_embedding = nn.Embedding(config.vocab_size, d)
        for embedding in (self.src_embedding, self.tgt_embedding):
            nn.init.normal_(embedding.weight, std=1.0)

        def block(kind: str, reads_context: bool = False, bidirectional: bool = False):
            if kind == "moe":
                return MoEBlock(config.moe, process_group)
            if kind == "ffn":
                return FFNBlock(d, config.ffn_hidden)
            if bidirectional:
                return BiLSTMBlock(d, config.lstm_hidden)
            return LSTMBlock(d, config.lstm_hidden, 2 * d if reads_context else d)

        self.encoder = nn.ModuleList(
            block(kind, bidirectional=i == 0 and config.bidirectional_first)
            for i, kind in enumerate(config.encoder_layers)
        )
        # Decoder LSTMs read the attention context beside their input: the first one only
        # with input feeding (its context is the previous step's).
        self.decoder = nn.ModuleList(
            block(kind, reads_context=i > 0 or config.input_feeding)
            for i, kind in enumerate(config.decoder_layers)
        )
        self.attention = Attention(d, config.attention_hidden, config.attention)
        self.dropout = nn.Dropout(config.dropout)
        self.softmax = Softmax(d, config.vocab_size)

    # ------------------------------------------------------------------ encoder

    def encode(
        self, src: Tensor, src_mask: Tensor, dropless: bool = False
    ) -> tuple[Tensor, Tensor, list[MoEOutput]]:
        """src: [S, B] int64; src_mask: [S, B] bool -> memory [S, B, D], aux loss, MoE results.
        dropless: the MoE layers apply no capacity (decoding)."""
        h = self.dropout(self.src_embedding(src))  # [S, B, D]
        lengths = src_mask.sum(0)  # [B]
        aux = h.new_zeros((), dtype=torch.float32)
        results: list[MoEOutput] = []
        for block in self.encoder:
            if isinstance(block, BiLSTMBlock):
                out = block(h, lengths)
            elif isinstance(block, LSTMBlock):
                out, _ = block(h, None)
            elif isinstance(block, MoEBlock):
                out, result = block(h, src_mask, dropless)
                results.append(result)
                aux = aux + result.aux_loss
            else:
                out = block(h)
            h = h + self.dropout(out)
        return h, aux, results

    # ------------------------------------------------------------------ training

    def forward(self, src: Tensor, src_mask: Tensor, tgt_in: Tensor, tgt_mask: Tensor) -> NMTOutput:
        """src: [S, B], tgt_in: [T, B] int64 (BOS, then the target without its EOS); masks
        [S, B] / [T, B] bool, False on padding (no MoE routes a padded position)."""
        memory, aux, results = self.encode(src, src_mask)
        memory = memory.transpose(0, 1)  # [B, S, D]
        keys = self.attention.keys(memory)
        batch_mask = src_mask.t()  # [B, S]
        e = self.dropout(self.tgt_embedding(tgt_in))  # [T, B, D]
        first = self.decoder[0]
        if self.config.input_feeding:
            # Step by step: the first layer reads the context its previous output produced.
            context = e.new_zeros(e.shape[1:])  # [B, D]
            state = None
            h1_steps, context_steps = [], []
            for t in range(e.shape[0]):
                out, state = first(torch.cat([e[t], context], -1)[None], state)
                h1_t = e[t] + self.dropout(out[0])  # [B, D]
                context = self.attention(keys, memory, batch_mask, h1_t[:, None])[0][:, 0]
                h1_steps.append(h1_t)
                context_steps.append(context)
            h = torch.stack(h1_steps)  # [T, B, D]
            contexts = torch.stack(context_steps)  # [T, B, D]
        else:
            out, _ = first(e, None)
            h = e + self.dropout(out)  # [T, B, D]
            contexts = self.attention(keys, memory, batch_mask, h.transpose(0, 1))[0]
            contexts = contexts.transpose(0, 1)  # [T, B, D]
        for block in self.decoder[1:]:
            if isinstance(block, LSTMBlock):
                out, _ = block(torch.cat([h, contexts], -1), None)
            elif isinstance(block, MoEBlock):
                out, result = block(h, tgt_mask)
                results.append(result)
                aux = aux + result.aux_loss
            else:
                out = block(h)
            h = h + self.dropout(out)
        return NMTOutput(h, aux, results)

    def nll(self, hidden: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
        """Per-token negative log-likelihood [T·B] (exact softmax) of targets [T, B] given
        hidden [T, B, D]; label_smoothing for the training loss."""
        return self.softmax.nll(
            hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1), label_smoothing
        )

    # ------------------------------------------------------------------ decoding

    def start_decoding(self, src: Tensor, src_mask: Tensor) -> DecoderState:
        """src: [B, S] int64, src_mask: [B, S] bool -> the state of B rows (IncrementalDecoder).
        Decoding runs every MoE layer dropless, the encoder's too, so that a sentence's
        translation does not depend on the sentences decoded beside it."""
        memory, _, _ = self.encode(src.t(), src_mask.t(), dropless=True)
        memory = memory.transpose(0, 1)  # [B, S, D]
        n_lstm = sum(isinstance(b, LSTMBlock) for b in self.decoder)
        return DecoderState(
            memory=memory,
            keys=self.attention.keys(memory),
            src_mask=src_mask,
            lstm=[None] * n_lstm,
            context=memory.new_zeros(memory.shape[0], memory.shape[2]),
        )

    def decode_step(self, tokens: Tensor, state: DecoderState) -> DecodeStep:
        """tokens: [N] int64 -> the next token's log-probabilities [N, V] float32. Every MoE
        layer is called even with N = 0, so that ranks with no rows left keep exchanging
        tokens with those that have some (lstm_moe.moe.parallel), and without a capacity: a
        step's N rows are one per hypothesis, and a capacity sized for so few would drop
        rows by collision and tie each hypothesis's result to the others' (MoELayer.forward,
        dropless)."""
        e = self.tgt_embedding(tokens)  # [N, D]
        lstm_states: list[LSTMState | None] = []
        first = self.decoder[0]
        x = torch.cat([e, state.context], -1) if self.config.input_feeding else e
        out, layer_state = first(x[None], state.lstm[0])
        lstm_states.append(layer_state)
        h = e + out[0]  # [N, D]
        context, probs = self.attention(state.keys, state.memory, state.src_mask, h[:, None])
        context, probs = context[:, 0], probs[:, 0]  # [N, D], [N, S]
        for block in self.decoder[1:]:
            if isinstance(block, LSTMBlock):
                out, layer_state = block(
                    torch.cat([h, context], -1)[None], state.lstm[len(lstm_states)]
                )
                lstm_states.append(layer_state)
                out = out[0]
            elif isinstance(block, MoEBlock):
                out, _ = block(h[None], dropless=True)
                out = out[0]
            else:
                out = block(h)
            h = h + out
        log_probs = torch.log_softmax(self.softmax.logits(h), dim=-1)  # [N, V]
        new_state = DecoderState(state.memory, state.keys, state.src_mask, lstm_states, context)
        return DecodeStep(log_probs, probs, new_state)

    def select_rows(self, state: DecoderState, index: Tensor) -> DecoderState:
        """Rows `index` [N'] of a decoding state (IncrementalDecoder)."""
        return DecoderState(
            memory=state.memory[index],
            keys=state.keys[index],
            src_mask=state.src_mask[index],
            lstm=[None if s is None else (s[0][:, index], s[1][:, index]) for s in state.lstm],
            context=state.context[index],
        )

    # ------------------------------------------------------------------ size

    def ops_per_timestep(self) -> dict[str, int]:
        """Multiply-adds per source position (encoder) and per target position (decoder,
        with the softmax), excluding the attention's terms that grow with the source length.
        The paper's 85M ops/timestep for its 2048-expert model counts both halves."""
        encoder = sum(block.ops_per_timestep() for block in self.encoder)
        decoder = sum(block.ops_per_timestep() for block in self.decoder)
        attention = self.attention.ops_per_timestep()
        softmax = self.softmax.weight.numel()
        return {
            "encoder": encoder,
            "decoder": decoder + attention,
            "softmax": softmax,
            "total": encoder + decoder + attention + softmax,
        }

    def total_params(self) -> int:
        return trained_params(self)

    def params_excluding_embedding_softmax(self) -> int:
        return trained_params(self) - sum(
            p.numel()
            for p in itertools.chain(
                self.src_embedding.parameters(),
                self.tgt_embedding.parameters(),
                self.softmax.parameters(),
            )
        )
