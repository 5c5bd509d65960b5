"""Transformer backbones with MoE feed-forward layers (Fedus et al. 2021, Switch Transformers;
Vaswani et al. 2017): a decoder-only language model and an encoder-decoder translation model.

Both are pre-norm (LN inside each residual branch, one final LN: Xiong et al. 2020, trains
without a learning-rate warmup being critical), bias-free in their projections (as T5 and
Switch), with sinusoidal or learned positions (switch/config.py says why sinusoidal is the
default). In the layers a config lists, the feed-forward layer is the core's MoELayer — any
router, the one dispatcher, batched experts, expert parallelism — applied to every position
of the batch in one call, padding masked out so that it never routes; elsewhere it is a dense
layer (the baseline's, of equal FLOPs per token when its width is the experts' active width).
In the layers a config lists as attention MoE layers, the self-attention's fused Q/K/V
projection is routed too (Switch App. A, Table 10): the core's MoEProjection, the same router
kind and dispatcher with linear experts [E, D, 3D], in float32 under autocast by default.
Routing is per token, so a causal decoder stays causal (dropless) and its key/value cache
holds what full recomputation computes; the output projection and the cross-attention stay
dense.

They speak the interfaces of the 2017 models, so the same tasks, engine and evaluation serve
them: TransformerLM returns lstm_moe.lm.LMOutput (its state is empty: each window is read
from position 0, the window being the model's context), and TransformerTranslationModel
returns lstm_moe.nmt.NMTOutput and is an lstm_moe.decoding.IncrementalDecoder (keys and
values cached per layer, the encoder's projected once per sentence).

Tokens enter the MoE layers sequence by sequence ([B, T] order), as the LSTM models' do, so
under a capacity W ranks that each hold a contiguous block of sequences keep exactly the
tokens one process keeps.

Index letters: B sequences, T positions (target), S source positions, D width, H heads,
d = D / H, F feed-forward width, V vocabulary, N decoder rows while decoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lstm_moe.decoding import DecodeStep
from lstm_moe.lm import LMOutput, token_nll, trained_params
from lstm_moe.moe import MoEConfig, MoELayer, MoEOutput, MoEProjection
from lstm_moe.nmt import NMTOutput
from lstm_moe.softmax import Softmax

from .config import TransformerLMConfig, TransformerNMTConfig

__all__ = [
    "FeedForward",
    "MoEFeedForward",
    "TransformerDecoderState",
    "TransformerLM",
    "TransformerLayer",
    "TransformerTranslationModel",
    "sinusoidal_positions",
]


# ----------------------------------------------------------------------------- positions


def sinusoidal_positions(positions: Tensor, d_model: int) -> Tensor:
    """PE(p, 2i) = sin(p / 10000^(2i/D)), PE(p, 2i+1) = cos(...) (Vaswani et al., §3.5).
    positions: [T] int64 -> [T, D] float32."""
    half = torch.arange(0, d_model, 2, device=positions.device, dtype=torch.float32)  # [D/2]
    angles = positions.float()[:, None] * torch.exp(half * (-math.log(10000.0) / d_model))
    table = torch.zeros(positions.shape[0], d_model, device=positions.device)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles[:, : d_model // 2])
    return table


class Positions(nn.Module):
    """The position signal added to the embeddings: sinusoidal (no parameters, any length)
    or a learned table of max_positions rows."""

    def __init__(self, kind: str, d_model: int, max_positions: int):
        super().__init__()
        self.kind, self.d_model, self.max_positions = kind, d_model, max_positions
        self.table = nn.Embedding(max_positions, d_model) if kind == "learned" else None
        if self.table is not None:
            nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, first: int, length: int, device: torch.device) -> Tensor:
        """Positions first .. first + length - 1 -> [length, D]."""
        if self.table is not None and first + length > self.max_positions:
            raise ValueError(
                f"position {first + length - 1} is past the learned table's {self.max_positions} "
                "(max_positions): shorten the window or the sentences, or use sinusoidal positions"
            )
        positions = torch.arange(first, first + length, device=device)
        if self.table is None:
            return sinusoidal_positions(positions, self.d_model)
        return self.table(positions)


# ----------------------------------------------------------------------------- attention


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    allowed: Tensor | None,
    causal: bool,
    dropout: float,
    need_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """softmax(q·kᵀ / √d) · v over the allowed keys (Vaswani et al., Eq. 1).

    q: [B, H, T, d]; k, v: [B, H, S, d]; allowed: [B, 1, T or 1, S] bool (True: may attend)
    or None; causal: query t sees keys 0..t only (T = S, or the last T of S keys). A query
    with no allowed key gets a zero output. Returns ([B, H, T, d], the probabilities
    [B, H, T, S] when need_weights, else None).
    """
    n_queries, n_keys = q.shape[-2], k.shape[-2]
    if causal and allowed is None and n_queries == n_keys and not need_weights:
        # The common training case: the fused kernel's own causal mask, no mask tensor.
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True), None
    if causal:
        # Query i is key n_keys - n_queries + i: the last queries of a cached sequence.
        rows = torch.arange(n_keys - n_queries, n_keys, device=q.device)[:, None]  # [T, 1]
        future = torch.arange(n_keys, device=q.device)[None, :] > rows  # [T, S]
        allowed = ~future if allowed is None else allowed & ~future
    if not need_weights:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)
        return (out if allowed is None else torch.nan_to_num(out, nan=0.0)), None
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [B, H, T, S]
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.nan_to_num(torch.softmax(scores.float(), dim=-1), nan=0.0).to(q.dtype)
    return F.dropout(probs, dropout) @ v, probs


def _heads(x: Tensor, n_heads: int) -> Tensor:
    """[B, T, D] -> [B, H, T, d]."""
    batch, length, width = x.shape
    return x.view(batch, length, n_heads, width // n_heads).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """[B, H, T, d] -> [B, T, D]."""
    batch, heads, length, width = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * width)


class SelfAttention(nn.Module):
    """Multi-head self-attention; causal in decoders. Q, K and V come from one [D, 3D]
    projection, dense or, given `experts` (an MoEProjection to 3D), routed token by token to
    experts that each hold their own [D, 3D] (Switch App. A, Figure 10, Table 10); the output
    projection is dense either way. A cache (keys and values of the positions before) serves
    incremental decoding."""

    def __init__(
        self, d_model: int, n_heads: int, dropout: float, experts: MoEProjection | None = None
    ):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        shape = None if experts is None else (experts.config.d_model, experts.d_out)
        if shape is not None and shape != (d_model, 3 * d_model):
            raise ValueError(
                f"the attention experts must map {d_model} to {3 * d_model}, got "
                f"{experts.config.d_model} to {experts.d_out}"
            )
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False) if experts is None else experts
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(
        self,
        x: Tensor,
        key_mask: Tensor | None,
        causal: bool,
        cache: tuple[Tensor, Tensor] | None = None,
        mask: Tensor | None = None,
        dropless: bool = False,
    ) -> tuple[Tensor, tuple[Tensor, Tensor], MoEOutput | None]:
        """x: [B, T, D]; key_mask: [B, T] bool (False: padding, never attended to) or None;
        cache: the keys and values [B, H, t, d] of the t positions before x (decoding);
        mask: [B, T] bool, False on padding, which the attention experts route nowhere (its
        query, key and value are 0), or None; dropless: the attention experts apply no
        capacity (a decoder's step). Returns ([B, T, D], the keys and values
        including x's, the attention experts' MoEOutput or None for a dense projection)."""
        result = None
        if isinstance(self.qkv, MoEProjection):
            result = self.qkv(x, mask, dropless)
            qkv = result.output  # [B, T, 3D]
        else:
            qkv = self.qkv(x)  # [B, T, 3D]
        q, k, v = (_heads(part, self.n_heads) for part in qkv.chunk(3, dim=-1))
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        allowed = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, S]
        dropout = self.dropout if self.training else 0.0
        out, _ = attend(q, k, v, allowed, causal, dropout)
        return self.out(_merge_heads(out)), (k, v), result

    def ops_per_token(self) -> int:
        """The projections' multiply-adds; with experts, those of the k experts a token uses
        (D·3D each) and the router's gating (MoEProjection.ops_per_token)."""
        if isinstance(self.qkv, MoEProjection):
            return self.qkv.ops_per_token() + self.out.weight.numel()
        return self.qkv.weight.numel() + self.out.weight.numel()


class CrossAttention(nn.Module):
    """The decoder's attention over the encoder's output: queries from the decoder, keys and
    values projected once per source sentence (memory_keys)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.query = nn.Linear(d_model, d_model, bias=False)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def memory_keys(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """memory: [B, S, D] -> keys and values [B, H, S, d]."""
        k, v = self.kv(memory).chunk(2, dim=-1)
        return _heads(k, self.n_heads), _heads(v, self.n_heads)

    def forward(
        self,
        x: Tensor,
        memory_kv: tuple[Tensor, Tensor],
        memory_mask: Tensor,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """x: [B, T, D]; memory_mask: [B, S] bool. Returns ([B, T, D], the attention over the
        source [B, T, S], averaged over heads, when need_weights)."""
        q = _heads(self.query(x), self.n_heads)
        dropout = self.dropout if self.training else 0.0
        out, probs = attend(
            q, *memory_kv, memory_mask[:, None, None, :], False, dropout, need_weights
        )
        return self.out(_merge_heads(out)), (None if probs is None else probs.mean(1))

    def ops_per_token(self) -> int:
        """Per target position: the query and output projections (the keys and values are
        per source position, memory_ops_per_source_token)."""
        return self.query.weight.numel() + self.out.weight.numel()

    def memory_ops_per_source_token(self) -> int:
        return self.kv.weight.numel()


# ----------------------------------------------------------------------------- feed-forward


class FeedForward(nn.Module):
    """The dense feed-forward layer: W_out·ReLU(W_in·x), or with GEGLU W_out·(GELU(W_gate·x) ⊙
    W_in·x) (Shazeer 2020). Bias-free, as the experts."""

    def __init__(self, d_model: int, hidden: int, activation: str):
        super().__init__()
        self.w_in = nn.Linear(d_model, hidden, bias=False)
        self.w_gate = nn.Linear(d_model, hidden, bias=False) if activation == "geglu" else None
        self.w_out = nn.Linear(hidden, d_model, bias=False)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, dropless: bool = False
    ) -> tuple[Tensor, None]:
        """x: [B, T, D] -> ([B, T, D], None): the MoE layer's signature, with no routing."""
        hidden = self.w_in(x)
        hidden = torch.relu(hidden) if self.w_gate is None else F.gelu(self.w_gate(x)) * hidden
        return self.w_out(hidden), None

    def ops_per_token(self) -> int:
        return sum(m.weight.numel() for m in (self.w_in, self.w_gate, self.w_out) if m is not None)


class MoEFeedForward(nn.Module):
    """The core's MoE layer in place of the feed-forward layer (Switch §2), on every position
    of the batch at once. process_group: expert parallelism over its ranks, or None."""

    def __init__(self, config: MoEConfig, process_group: dist.ProcessGroup | None = None):
        super().__init__()
        self.moe = MoELayer.from_config(config, process_group)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, dropless: bool = False
    ) -> tuple[Tensor, MoEOutput]:
        """x: [B, T, D], routed in [B, T] order; mask: [B, T] bool, False on padding (routed
        nowhere, output 0), or None. dropless: no capacity for this call (a decoder's step;
        MoELayer.forward)."""
        options = {} if mask is None else {"mask": mask}
        if dropless:
            options["dropless"] = True
        result = self.moe(x, **options)
        return result.output, result

    def ops_per_token(self) -> int:
        """The experts a token uses (Table 7's convention: their multiply-adds) and the
        router's gating product (expert choice: c experts per token on average)."""
        config = self.moe.config
        return round(config.mean_experts_per_token * config.expert_ops_per_token()) + (
            self.moe.router.gating_ops_per_token()
        )


# ----------------------------------------------------------------------------- layers


class TransformerLayer(nn.Module):
    """x + Dropout(SelfAttention(LN(x))), [x + Dropout(CrossAttention(LN(x), memory))],
    x + Dropout(FFN(LN(x))): pre-norm (Xiong et al. 2020). attention_experts: the
    self-attention's routed Q/K/V projection (an MoEProjection), None for a dense one."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        ffn: nn.Module,
        dropout: float,
        attention_dropout: float,
        cross_attention: bool = False,
        attention_experts: MoEProjection | None = None,
    ):
        super().__init__()
        self.attention_norm = nn.LayerNorm(d_model)
        self.attention = SelfAttention(d_model, n_heads, attention_dropout, attention_experts)
        self.cross_norm = self.cross = None
        if cross_attention:
            self.cross_norm = nn.LayerNorm(d_model)
            self.cross = CrossAttention(d_model, n_heads, attention_dropout)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.ffn = ffn
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None,
        causal: bool,
        cache: tuple[Tensor, Tensor] | None = None,
        memory_kv: tuple[Tensor, Tensor] | None = None,
        memory_mask: Tensor | None = None,
        need_weights: bool = False,
        dropless: bool = False,
    ) -> tuple[Tensor, list[MoEOutput], tuple[Tensor, Tensor], Tensor | None]:
        """x: [B, T, D]; mask: [B, T] bool, False on padding (keys never attended to in an
        encoder, positions never routed), or None. dropless: the MoE layers apply no capacity
        (a decoder's step). Returns the layer's output [B, T, D], its MoE results (the
        attention experts' first, then the MoE feed-forward's; empty for a dense layer), the
        self-attention's keys and values (for a decoding cache) and the cross-attention
        probabilities [B, T, S] when asked."""
        key_mask = None if causal else mask  # causal: padding is after every real position
        attended, keys_values, routed = self.attention(
            self.attention_norm(x), key_mask, causal, cache, mask, dropless
        )
        x = x + self.dropout(attended)
        weights = None
        if self.cross is not None:
            crossed, weights = self.cross(self.cross_norm(x), memory_kv, memory_mask, need_weights)
            x = x + self.dropout(crossed)
        out, result = self.ffn(self.ffn_norm(x), mask, dropless)
        results = [r for r in (routed, result) if r is not None]
        return x + self.dropout(out), results, keys_values, weights

    def ops_per_token(self) -> int:
        cross = 0 if self.cross is None else self.cross.ops_per_token()
        return self.attention.ops_per_token() + cross + self.ffn.ops_per_token()


def _build_stack(
    config,
    n_layers: int,
    moe_layers: tuple[int, ...],
    attention_moe_layers: tuple[int, ...],
    cross: bool,
    process_group,
) -> nn.ModuleList:
    layers = []
    for index in range(n_layers):
        if index in moe_layers:
            ffn: nn.Module = MoEFeedForward(config.moe, process_group)
        else:
            ffn = FeedForward(config.d_model, config.ffn_hidden, config.activation)
        experts = None
        if index in attention_moe_layers:
            # The model's MoE config (router, E, k, capacity), a [D, 3D] projection per expert.
            experts = MoEProjection(
                config.moe,
                3 * config.d_model,
                float32=config.attention_moe_float32,
                process_group=process_group,
            )
        layers.append(
            TransformerLayer(
                config.d_model,
                config.n_heads,
                ffn,
                config.dropout,
                config.attention_dropout,
                cross_attention=cross,
                attention_experts=experts,
            )
        )
    return nn.ModuleList(layers)


class _Embedder(nn.Module):
    """Token embedding · √D plus positions, then dropout (Vaswani et al., §3.4: the √D puts the
    tied embedding, drawn at scale 1/√D for the softmax, at the positions' scale)."""

    def __init__(self, vocab_size: int, d_model: int, positions: Positions, dropout: float):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.tokens.weight, std=d_model**-0.5)
        self.positions = positions
        self.scale = math.sqrt(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, ids: Tensor, first_position: int = 0) -> Tensor:
        """ids: [B, T] int64 -> [B, T, D]."""
        x = self.tokens(ids) * self.scale + self.positions(first_position, ids.shape[1], ids.device)
        return self.dropout(x)


def _sum_aux(results: list[MoEOutput], like: Tensor) -> Tensor:
    aux = like.new_zeros((), dtype=torch.float32)
    for result in results:
        aux = aux + result.aux_loss
    return aux


# ----------------------------------------------------------------------------- language model


class TransformerLM(nn.Module):
    """A causal Transformer language model with MoE layers where config.moe_layers says, and
    attention experts where config.attention_moe_layers says.

    forward(inputs [T, B], state=None, mask=None) -> LMOutput: the LSTM model's interface
    (time-major ids, the hidden states before the softmax, an empty state), so the LM task
    trains and evaluates both; its moe results are layer by layer, the attention experts'
    before the feed-forward's, and its aux_loss sums them all. process_group: expert
    parallelism over its ranks, or None.
    """

    def __init__(self, config: TransformerLMConfig, process_group: dist.ProcessGroup | None = None):
        super().__init__()
        self.config = config
        positions = Positions(config.positions, config.d_model, config.max_positions)
        self.embed = _Embedder(config.vocab_size, config.d_model, positions, config.dropout)
        self.layers = _build_stack(
            config,
            config.n_layers,
            config.moe_layers,
            config.attention_moe_layers,
            False,
            process_group,
        )
        self.final_norm = nn.LayerNorm(config.d_model)
        self.softmax = Softmax(config.d_model, config.vocab_size, config.n_samples)
        if config.tie_embeddings:
            self.softmax.weight = self.embed.tokens.weight

    def initial_state(self) -> list:
        return []

    def forward(self, inputs: Tensor, state: list | None = None, mask: Tensor | None = None):
        """inputs: [T, B] int64; state: ignored (each window starts at position 0); mask:
        [T, B] bool, False at padded positions (after the real ones: never seen by them, and
        never routed). Returns LMOutput with hidden [T, B, D]."""
        x = self.embed(inputs.t())  # [B, T, D]
        batch_mask = None if mask is None else mask.t()  # [B, T]
        results: list[MoEOutput] = []
        for layer in self.layers:
            x, layer_results, _, _ = layer(x, batch_mask, causal=True)
            results += layer_results
        hidden = self.final_norm(x).transpose(0, 1)  # [T, B, D]
        return LMOutput(hidden, [], _sum_aux(results, hidden), results)

    def nll(
        self,
        hidden: Tensor,
        targets: Tensor,
        sampled: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Per-token negative log-likelihood [T·B] (lstm_moe.lm.LanguageModel.nll)."""
        use_sampled = sampled and self.config.softmax == "sampled"
        return token_nll(self.softmax, hidden, targets, use_sampled, generator)

    def ops_per_timestep(self) -> int:
        """Multiply-adds per token between the embedding and the softmax: the projections and
        feed-forward layers (MoE layers and attention experts: the experts a token uses and
        the router), without the attention's q·k and p·v products, which grow with the
        window."""
        return sum(layer.ops_per_token() for layer in self.layers)

    def params_excluding_embedding_softmax(self) -> int:
        return trained_params(self.layers) + trained_params(self.final_norm)

    def total_params(self) -> int:
        return trained_params(self)


# ----------------------------------------------------------------------------- translation


@dataclass
class TransformerDecoderState:
    """What decoding carries from step to step, one row per hypothesis: per decoder layer the
    encoder output's keys and values [N, H, S, d] and the self-attention's cache [N, H, t, d];
    src_mask [N, S]; position: t, the next target position."""

    memory_kv: list[tuple[Tensor, Tensor]]
    self_kv: list[tuple[Tensor, Tensor] | None]
    src_mask: Tensor
    position: int


class TransformerTranslationModel(nn.Module):
    """An encoder-decoder Transformer with MoE layers and attention experts where the config
    lists them (MoE results: the encoder's, then the decoder's, layer by layer, attention
    experts first).

    Training: forward(src [S, B], src_mask, tgt_in [T, B], tgt_mask) -> NMTOutput, nll(): the
    LSTM model's interface. Decoding: lstm_moe.decoding.IncrementalDecoder."""

    def __init__(
        self, config: TransformerNMTConfig, process_group: dist.ProcessGroup | None = None
    ):
        super().__init__()
        self.config = config
        d = config.d_model
        positions = Positions(config.positions, d, config.max_positions)
        self.src_embed = _Embedder(config.vocab_size, d, positions, config.dropout)
        self.tgt_embed = _Embedder(config.vocab_size, d, positions, config.dropout)
        self.encoder = _build_stack(
            config,
            config.encoder_layers,
            config.encoder_moe_layers,
            config.encoder_attention_moe_layers,
            False,
            process_group,
        )
        self.encoder_norm = nn.LayerNorm(d)
        self.decoder = _build_stack(
            config,
            config.decoder_layers,
            config.decoder_moe_layers,
            config.decoder_attention_moe_layers,
            True,
            process_group,
        )
        self.decoder_norm = nn.LayerNorm(d)
        self.softmax = Softmax(d, config.vocab_size)
        if config.tie_embeddings:  # one matrix for the shared vocabulary (Press & Wolf 2017)
            self.tgt_embed.tokens.weight = self.src_embed.tokens.weight
            self.softmax.weight = self.src_embed.tokens.weight

    def encode(
        self, src: Tensor, src_mask: Tensor, dropless: bool = False
    ) -> tuple[Tensor, Tensor, list[MoEOutput]]:
        """src: [B, S] int64; src_mask: [B, S] bool -> memory [B, S, D], aux loss, MoE results.
        dropless: the MoE layers apply no capacity (decoding)."""
        x = self.src_embed(src)
        results: list[MoEOutput] = []
        for layer in self.encoder:
            x, layer_results, _, _ = layer(x, src_mask, causal=False, dropless=dropless)
            results += layer_results
        memory = self.encoder_norm(x)
        return memory, _sum_aux(results, memory), results

    def forward(self, src: Tensor, src_mask: Tensor, tgt_in: Tensor, tgt_mask: Tensor) -> NMTOutput:
        """src: [S, B], tgt_in: [T, B] int64 (BOS, then the target without its EOS); masks
        [S, B] / [T, B] bool, False on padding. Returns NMTOutput with hidden [T, B, D]."""
        src_mask = src_mask.t()  # [B, S]
        memory, aux, results = self.encode(src.t(), src_mask)
        x = self.tgt_embed(tgt_in.t())  # [B, T, D]
        tgt_mask = tgt_mask.t()
        for layer in self.decoder:
            x, layer_results, _, _ = layer(
                x,
                tgt_mask,
                causal=True,
                memory_kv=layer.cross.memory_keys(memory),
                memory_mask=src_mask,
            )
            results += layer_results
            for result in layer_results:
                aux = aux + result.aux_loss
        return NMTOutput(self.decoder_norm(x).transpose(0, 1), aux, results)

    def nll(self, hidden: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
        """Per-token negative log-likelihood [T·B] of targets [T, B] given hidden [T, B, D]."""
        return self.softmax.nll(
            hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1), label_smoothing
        )

    # ------------------------------------------------------------------ decoding

    def start_decoding(self, src: Tensor, src_mask: Tensor) -> TransformerDecoderState:
        """src: [B, S] int64, src_mask: [B, S] bool -> the state of B rows. Decoding runs every
        MoE layer dropless, the encoder's too, so that a sentence's translation does not depend
        on the sentences decoded beside it (expert choice in the encoder still ranks the
        batch: it has no dropless form)."""
        memory, _, _ = self.encode(src, src_mask, dropless=True)
        return TransformerDecoderState(
            memory_kv=[layer.cross.memory_keys(memory) for layer in self.decoder],
            self_kv=[None] * len(self.decoder),
            src_mask=src_mask,
            position=0,
        )

    def decode_step(self, tokens: Tensor, state: TransformerDecoderState) -> DecodeStep:
        """tokens: [N] int64 -> the next token's log-probabilities [N, V] float32 and the last
        layer's attention over the source (mean over heads) [N, S]. Every MoE layer is called
        even with N = 0, so that ranks with no rows left keep exchanging tokens with the
        others (lstm_moe.moe.parallel), and without a capacity: a step's N rows are one per
        hypothesis, and a capacity sized for so few would drop rows by collision and tie each
        hypothesis's result to the others' (MoELayer.forward, dropless)."""
        x = self.tgt_embed(tokens[:, None], state.position)  # [N, 1, D]
        new_cache: list[tuple[Tensor, Tensor] | None] = []
        weights = None
        for index, layer in enumerate(self.decoder):
            last = index == len(self.decoder) - 1
            x, _, keys_values, layer_weights = layer(
                x,
                None,
                causal=True,
                cache=state.self_kv[index],
                memory_kv=state.memory_kv[index],
                memory_mask=state.src_mask,
                need_weights=last,
                dropless=True,
            )
            new_cache.append(keys_values)
            weights = layer_weights if last else weights
        logits = self.softmax.logits(self.decoder_norm(x)[:, 0])  # [N, V]
        new_state = TransformerDecoderState(
            state.memory_kv, new_cache, state.src_mask, state.position + 1
        )
        return DecodeStep(torch.log_softmax(logits, dim=-1), weights[:, 0], new_state)

    def select_rows(self, state: TransformerDecoderState, index: Tensor) -> TransformerDecoderState:
        """Rows `index` [N'] of a decoding state (IncrementalDecoder)."""

        def rows(pair):
            return None if pair is None else (pair[0][index], pair[1][index])

        return TransformerDecoderState(
            memory_kv=[rows(kv) for kv in state.memory_kv],
            self_kv=[rows(kv) for kv in state.self_kv],
            src_mask=state.src_mask[index],
            position=state.position,
        )

    # ------------------------------------------------------------------ size

    def ops_per_timestep(self) -> dict[str, int]:
        """Multiply-adds per source position (encoder, and every decoder layer's projection of
        it into keys and values) and per target position (decoder; softmax), without the
        attention's q·k and p·v products, which grow with the lengths."""
        encoder = sum(layer.ops_per_token() for layer in self.encoder)
        encoder += sum(layer.cross.memory_ops_per_source_token() for layer in self.decoder)
        decoder = sum(layer.ops_per_token() for layer in self.decoder)
        softmax = self.softmax.weight.numel()
        return {
            "encoder": encoder,
            "decoder": decoder,
            "softmax": softmax,
            "total": encoder + decoder + softmax,
        }

    def total_params(self) -> int:
        return trained_params(self)

    def params_excluding_embedding_softmax(self) -> int:
        tables = (self.src_embed.tokens, self.tgt_embed.tokens, self.softmax)
        unique = {id(p): p for m in tables for p in m.parameters() if p.requires_grad}
        return trained_params(self) - sum(p.numel() for p in unique.values())
