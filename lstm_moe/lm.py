"""The paper's language model (Shazeer et al. 2017, App. C.1): embedding → LSTM → MoE → LSTM →
softmax, every layer wrapped as `h + Dropout(f(h))`.

"For every layer other than the softmax, we apply dropout to the layer output ... After dropout,
the output of the previous layer is added to the layer output. ... The MoE layer output is passed
through a sigmoid function before dropout." The MoE runs on all time steps of the batch in one
call (`[T, B, D]` is one set of T·B tokens): the paper's "convolutional" application.

Index letters: T time steps, B batch lanes, D model width, V vocabulary.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lstm_moe.config import LMConfig
from lstm_moe.moe import MoEConfig, MoELayer, MoEOutput
from lstm_moe.softmax import Softmax

LSTMState = tuple[Tensor, Tensor]


class LSTMBlock(nn.Module):
    """One LSTM layer, with an output projection to d_model when it has more cells (LSTMP).
    input_size: the width it reads, d_model unless given (a translation decoder's layers also
    read the attention context beside it)."""

    def __init__(self, d_model: int, hidden: int, input_size: int | None = None):
        super().__init__()
        self.d_model, self.hidden = d_model, hidden
        self.input_size = d_model if input_size is None else input_size
        self.lstm = nn.LSTM(self.input_size, hidden, proj_size=d_model if hidden != d_model else 0)
        # PyTorch's LSTM adds two bias vectors (b_ih + b_hh) where the paper's LSTM has one;
        # b_hh is held at zero and frozen so the model and its parameter count are the paper's.
        with torch.no_grad():
            self.lstm.bias_hh_l0.zero_()
        self.lstm.bias_hh_l0.requires_grad_(False)

    def forward(self, x: Tensor, state: LSTMState | None) -> tuple[Tensor, LSTMState]:
        # cuDNN's autocast path would run the LSTM in float16 whatever dtype autocast asks
        # for; the recurrence (and the state carried across windows) stays in the weights'
        # dtype (float32 unless the whole model was cast).
        dtype = self.lstm.weight_ih_l0.dtype
        with torch.autocast(x.device.type, enabled=False):
            state = None if state is None else (state[0].to(dtype), state[1].to(dtype))
            return self.lstm(x.to(dtype), state)  # [T, B, D]

    def ops_per_timestep(self) -> int:
        """Multiply-adds per token: four gates over [input, recurrent output], plus projection."""
        recurrent = self.d_model if self.hidden != self.d_model else self.hidden
        projection = self.hidden * self.d_model if self.hidden != self.d_model else 0
        return 4 * self.hidden * (self.input_size + recurrent) + projection


class MoEBlock(nn.Module):
    """The sparsely-gated MoE layer applied to every position; sigmoid of its output (App. C.1).
    process_group: the ranks the experts are spread over (lstm_moe.moe.parallel), or None."""

    def __init__(self, config: MoEConfig, process_group: dist.ProcessGroup | None = None):
        super().__init__()
        self.moe = MoELayer.from_config(config, process_group)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, dropless: bool = False
    ) -> tuple[Tensor, MoEOutput]:
        # x: [T, B, D], routed as T·B tokens in one call, lane by lane ([B, T] order): under a
        # capacity the earliest tokens in that order are kept, and since each rank holds a
        # contiguous block of lanes, W ranks then keep exactly the tokens one process keeps.
        # mask: [T, B] bool, False on padding, which the layer does not route. dropless: no
        # capacity for this call (MoELayer.forward; a decoder's steps).
        tokens = x.movedim(0, -2)  # [B, T, D] ([B, D] for one step stays as it is)
        # Without padding the layer is called without a mask ([B, T] when there is one).
        options = {} if mask is None else {"mask": mask.movedim(0, -1)}
        if dropless:
            options["dropless"] = True
        result = self.moe(tokens, **options)
        return torch.sigmoid(result.output.movedim(-2, 0)), result  # [T, B, D]

    def ops_per_timestep(self) -> int:
        """Multiply-adds per token: the experts each token uses (expert_ops_per_token: 2·D·H,
        3·D·H for GEGLU experts) plus the router's gating matrices (its gating_ops_per_token:
        W_g and W_noise for the 2017 noisy gates, Eq. 3-4, counted like this the totals match
        Table 7; one matrix for batchwise, switch and expert choice). Expert choice computes
        c experts per token on average (MoEConfig.mean_experts_per_token)."""
        cfg = self.moe.config
        expert = cfg.expert_ops_per_token()
        return round(cfg.mean_experts_per_token * expert) + self.moe.router.gating_ops_per_token()


class FFNBlock(nn.Module):
    """A dense stand-in for the MoE layer: one "expert" that every token uses (MoE-1-Wide,
    MoE-1-Deep). Treated like the MoE layer it replaces, sigmoid included."""

    def __init__(self, d_model: int, hidden: tuple[int, ...]):
        super().__init__()
        widths = (d_model, *hidden, d_model)
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
            layers.append(nn.Linear(n_in, n_out, bias=False))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.net(x))

    def ops_per_timestep(self) -> int:
        return sum(m.weight.numel() for m in self.net if isinstance(m, nn.Linear))


@dataclass
class LMOutput:
    """hidden: [T, B, D] final layer output (the softmax input); state: per LSTM layer;
    aux_loss: the sum of the MoE layers' weighted balancing losses; moe: their full results."""

    hidden: Tensor
    state: list[LSTMState]
    aux_loss: Tensor
    moe: list[MoEOutput]


class LanguageModel(nn.Module):
    """process_group: expert parallelism over its ranks (§3.1): each rank holds its share of
    every MoE layer's experts and a replica of everything else; None is one process."""

    def __init__(self, config: LMConfig, process_group: dist.ProcessGroup | None = None):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        nn.init.normal_(self.embedding.weight, std=1.0)
        blocks: list[nn.Module] = []
        for kind in config.layers:
            if kind == "lstm":
                blocks.append(LSTMBlock(config.d_model, config.lstm_hidden))
            elif kind == "moe":
                blocks.append(MoEBlock(config.moe, process_group))
            else:
                blocks.append(FFNBlock(config.d_model, config.ffn_hidden))
        self.blocks = nn.ModuleList(blocks)
        self.dropout = nn.Dropout(config.dropout)
        self.softmax = Softmax(config.d_model, config.vocab_size, config.n_samples)

    def initial_state(self) -> list[LSTMState | None]:
        return [None] * sum(isinstance(b, LSTMBlock) for b in self.blocks)

    def forward(
        self,
        inputs: Tensor,
        state: list[LSTMState | None] | None = None,
        mask: Tensor | None = None,
    ) -> LMOutput:
        """inputs: [T, B] int64 token ids; state: from the previous window (or None); mask:
        [T, B] bool, False at padded positions (the MoE layers route only the others)."""
        state = self.initial_state() if state is None else state
        h = self.dropout(self.embedding(inputs))  # [T, B, D]
        new_state: list[LSTMState] = []
        moe_results: list[MoEOutput] = []
        aux_loss = h.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            if isinstance(block, LSTMBlock):
                out, layer_state = block(h, state[len(new_state)])
                new_state.append(layer_state)
            elif isinstance(block, MoEBlock):
                out, result = block(h, mask)
                moe_results.append(result)
                aux_loss = aux_loss + result.aux_loss
            else:
                out = block(h)
            h = h + self.dropout(out)
        return LMOutput(h, new_state, aux_loss, moe_results)

    def nll(
        self,
        hidden: Tensor,
        targets: Tensor,
        sampled: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Per-token negative log-likelihood [T·B] of targets [T, B] given hidden [T, B, D];
        `sampled` uses the importance-sampled estimate (training only), its candidates drawn
        from `generator` (None: the global stream)."""
        use_sampled = sampled and self.config.softmax == "sampled"
        return token_nll(self.softmax, hidden, targets, use_sampled, generator)

    # ------------------------------------------------------------------ size, as in Table 7

    def ops_per_timestep(self) -> int:
        """Multiply-adds per token, excluding embedding and softmax (Table 7's ops/timestep)."""
        return sum(block.ops_per_timestep() for block in self.blocks)

    def params_excluding_embedding_softmax(self) -> int:
        """Trained parameters between the embedding and the softmax (Table 7's #Params), of the
        whole model whatever the number of ranks holding its experts."""
        return trained_params(self.blocks)

    def total_params(self) -> int:
        return trained_params(self)


def token_nll(
    softmax: Softmax,
    hidden: Tensor,
    targets: Tensor,
    sampled: bool,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A language model's per-token negative log-likelihood [T·B] of targets [T, B] given
    hidden [T, B, D]: exact, or the sampled softmax's estimate with candidates from
    `generator`."""
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # [T·B, D]
    flat_targets = targets.reshape(-1)  # [T·B]
    if sampled:
        return softmax.sampled_nll(flat_hidden, flat_targets, generator)
    return softmax.nll(flat_hidden, flat_targets)


def trained_params(module: nn.Module) -> int:
    """Trained parameters of the model, not of this rank: a rank of W holds E/W of each MoE
    layer's experts, and they count W times."""
    total = sum(p.numel() for p in module.parameters() if p.requires_grad)
    for layer in module.modules():
        if isinstance(layer, MoELayer):
            held = sum(p.numel() for p in layer.experts.parameters() if p.requires_grad)
            total += held * (layer.group.world_size - 1)
    return total


def detach_state(state: list[LSTMState]) -> list[LSTMState]:
    """Truncated backpropagation through time: keep the values, cut the graph."""
    return [(h.detach(), c.detach()) for h, c in state]
