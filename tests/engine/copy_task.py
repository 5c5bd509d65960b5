"""A second, trivial task for the engine: copy each token of a padded batch of random-length
sequences through an embedding, one MoE layer and an output projection. It has what the
engine must not assume away: padding (ranks and micro-batches hold different numbers of real
targets), a model that is not the language model, its own state and its own resume check, and
optionally experts with an extra tensor (a GLU's gate) that only marking can find."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lstm_moe.engine.task import StepOutput
from lstm_moe.moe import MoELayer
from lstm_moe.moe.experts import BatchedExperts, grouped_matmul
from lstm_moe.moe.parallel import ParallelGroup
from lstm_moe.tasks.common import routing_stats


@dataclass(frozen=True)
class CopyModelConfig:
    vocab: int = 12
    d_model: int = 12  # rows of 48 bytes, aligned for the grouped kernel too
    n_experts: int = 4
    expert_hidden: int = 16
    k: int = 2
    capacity_factor: float | None = None
    w_importance: float = 0.1
    w_load: float = 0.1
    glu: bool = False


@dataclass(frozen=True)
class CopyTaskConfig:
    batch_size: int = 8
    length: int = 6
    data_seed: int = 0


class GLUExperts(BatchedExperts):
    """ReLU(x·W_in) ⊙ (x·W_gate) · W_out: a third expert tensor, named w_gate, that no list of
    expert tensor names holds; each expert's gate is drawn from its own generator, so a shard
    holds one process's values."""

    def __init__(self, n_experts, d_model, expert_hidden, expert_range):
        super().__init__(n_experts, d_model, expert_hidden, False, expert_range)
        self.w_gate = nn.Parameter(torch.empty(self.n_experts, d_model, expert_hidden))
        with torch.no_grad():
            for local in range(self.n_experts):
                generator = torch.Generator().manual_seed(10_000 + self.first_expert + local)
                self.w_gate[local].uniform_(-0.5, 0.5, generator=generator)

    def forward(self, rows: Tensor, rows_per_expert: Tensor) -> Tensor:
        hidden = torch.relu(grouped_matmul(rows, self.w_in, rows_per_expert))
        hidden = hidden * grouped_matmul(rows, self.w_gate, rows_per_expert)
        return grouped_matmul(hidden, self.w_out, rows_per_expert)


class CopyModel(nn.Module):
    def __init__(self, config: CopyModelConfig, process_group=None):
        super().__init__()
        self.embedding = nn.Embedding(config.vocab, config.d_model)
        self.moe = MoELayer(
            config.d_model,
            config.n_experts,
            config.expert_hidden,
            config.k,
            process_group=process_group,
            capacity_factor=config.capacity_factor,
            w_importance=config.w_importance,
            w_load=config.w_load,
        )
        if config.glu:
            expert_range = self.moe.group.expert_range(config.n_experts)
            self.moe.experts = GLUExperts(
                config.n_experts, config.d_model, config.expert_hidden, expert_range
            )
        self.output = nn.Linear(config.d_model, config.vocab)

    def forward(self, tokens: Tensor, mask: Tensor):
        h = self.embedding(tokens)  # [B, L, D]
        result = self.moe(h, mask=mask)
        return self.output(h + result.output), result  # [B, L, V]


class CopyTask:
    name = "copy"
    model_config_class = CopyModelConfig
    config_class = CopyTaskConfig
    resumable_fields = frozenset()

    def __init__(self, model_config, config, data_dir, group=None, micro_batches=1, seed=1):
        self.model_config, self.config = model_config, config
        self.group = ParallelGroup() if group is None else group
        self.micro_batches = micro_batches
        self.data_dir = Path(data_dir)
        if config.batch_size % (self.group.world_size * micro_batches):
            raise ValueError("batch_size must divide by ranks × micro_batches")
        self.targets_seen = 0  # this rank's; the state is the sum over ranks
        self.data_version = 1  # what a dataset's fingerprint is to the language model

    def global_batch(self, step: int, rows: int | None = None, salt: int = 0):
        """Step `step`'s batch of all ranks: [B, L] tokens and mask, lengths 1..L, so rows
        hold different numbers of real targets."""
        rows = self.config.batch_size if rows is None else rows
        generator = torch.Generator().manual_seed(self.config.data_seed * 7919 + step + salt)
        tokens = torch.randint(1, self.model_config.vocab, (rows, self.config.length),
                               generator=generator)  # fmt: skip
        lengths = torch.randint(1, self.config.length + 1, (rows,), generator=generator)
        lengths[0] = self.config.length  # the first rank always holds more
        mask = torch.arange(self.config.length)[None, :] < lengths[:, None]  # [B, L]
        return torch.where(mask, tokens, 0), mask

    def build_model(self):
        return CopyModel(self.model_config, self.group.process_group)

    def train_batch(self, step, micro, micro_batches):
        tokens, mask = self.global_batch(step)
        share = self.config.batch_size // (self.group.world_size * micro_batches)
        first = (
            micro * self.group.world_size + self.group.rank
        ) * share  # as the LM lays lanes out
        return tokens[first : first + share], mask[first : first + share]

    def count_targets(self, batch) -> int:
        return int(batch[1].sum())

    def forward(self, model, batch, step, micro, device):
        tokens, mask = (t.to(device) for t in batch)
        logits, result = model(tokens, mask)
        nll = F.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="none")
        self.targets_seen += int(batch[1].sum())
        return StepOutput((nll * mask.flatten()).sum(), result.aux_loss, routing_stats([result]))

    @torch.no_grad()
    def validate(self, model, device):
        model.eval()
        tokens, mask = self.global_batch(0, rows=8, salt=10**6)  # the same at any world size
        share = 8 // self.group.world_size
        rows = slice(share * self.group.rank, share * (self.group.rank + 1))
        tokens, mask = tokens[rows].to(device), mask[rows].to(device)
        logits, _ = model(tokens, mask)
        nll = F.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="none")
        total, count = self.group.sum_host([float((nll * mask.flatten()).sum()), float(mask.sum())])
        model.train()
        return {"valid_loss": total / count}

    def state_dict(self):
        (seen,) = self.group.sum_host([float(self.targets_seen)])
        return {"targets_seen": int(seen)}

    def load_state_dict(self, state):
        # Ranks resume with the total on rank 0: the sum over ranks is what was saved.
        self.targets_seen = state["targets_seen"] if self.group.rank == 0 else 0

    def record(self, model):
        return {"data": {"version": self.data_version}}

    def check_resume(self, saved_record, source):
        if saved_record["data"]["version"] != self.data_version:
            raise ValueError(f"{source} was trained on other data")

    @staticmethod
    def presets():
        return {}

    @staticmethod
    def dataset_overrides(data_dir):
        return {}

    @staticmethod
    def data_dir_of(record):
        return Path(".")

    def loss_metrics(self, loss):
        return {"ppl": math.exp(min(loss, 50.0))}

    def progress_total(self, max_tokens):
        return None

    def summary(self, model):
        return "copy"
