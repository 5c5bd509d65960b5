"""Language modelling (Shazeer et al. 2017, §5.1-5.2, App. C.1) as a task of the engine: the
paper's LSTM-MoE language model on a binarized token stream (data_prep), its lanes carried
across windows (truncated backpropagation through time), and per-word perplexity.

The batch of a step is `batch_size` lanes × `bptt` steps of one token stream
(lstm_moe.data.LaneBatches). With M micro-batches, micro-batch m is lanes [m·B/M, (m+1)·B/M);
on W ranks each is cut into W contiguous blocks in rank order, each carrying its own LSTM
state. Every MoE call (one micro-batch, all ranks) thus routes the lanes one process routes
in that micro-batch, in the same order. The MoE layers take their tokens lane by lane, so with a
capacity W ranks keep exactly the tokens one process keeps (lstm_moe.lm.MoEBlock).

The sampled softmax's candidates are drawn per step from a generator keyed by the seed and
the step, the same on every rank and for every micro-batch: W ranks score their tokens against
the candidates one process draws, and a resumed run draws what an uninterrupted one did.

Perplexity is exp(Σ -log p(target) / N) over every target of the split, where N counts each
word plus one `</S>` per sentence: "sum over all words including the end of sentence symbol"
(§5.1, following Jozefowicz et al. 2016). It always uses the exact full softmax.

Distillation (Switch §4.2): with teacher_run, the run's model starts from the teacher run's
non-expert weights and trains on (1 - w)·NLL + w·CE(teacher) (lstm_moe.tasks.teacher,
switch.distill); an LSTM teacher carries its own state from window to window beside the
student's. It needs the full softmax. Validation stays the ground-truth perplexity.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from tqdm import tqdm

from lstm_moe.config import LMConfig
from lstm_moe.data import LaneBatches
from lstm_moe.engine.task import StepOutput
from lstm_moe.files import EOS_ID, read_meta, read_split
from lstm_moe.lm import LanguageModel, detach_state
from lstm_moe.moe.parallel import ParallelGroup
from lstm_moe.tasks.common import (
    Architecture,
    RoutingTotals,
    architecture_of,
    check_same_dataset,
    data_fingerprint,
    load_run_model,
    routing_stats,
    routing_summary,
)
from lstm_moe.tasks.teacher import Teacher
from switch.config import TransformerLMConfig
from switch.distill import TEACHER_WEIGHT, softmax_distillation_terms
from switch.transformer import TransformerLM

# Validation reads the valid split in windows of this many steps, over at most this many
# lanes (fewer when the training batch is smaller).
VALID_BPTT = 50
VALID_MAX_LANES = 16


@dataclass(frozen=True)
class LMTaskConfig:
    """batch_size lanes × bptt steps = tokens per step (over all ranks and micro-batches).
    eval_tokens: validation targets used each time (0 = the whole split).
    teacher_run: a trained LM run folder to distil (Switch §4.2; switch.distill): the model
        starts from its non-expert weights and trains on the soft target
        teacher_weight·p_teacher + (1 - teacher_weight)·onehot. None: no teacher.
    """

    HELP: ClassVar[dict[str, str]] = {
        "teacher_run": "distil this trained run (its non-expert weights, then the mixed loss; "
        "Switch §4.2); needs --softmax=full",
        "teacher_weight": "the teacher's share of the soft target (Switch §4.2: 0.25)",
    }

    batch_size: int = 32
    bptt: int = 20
    eval_tokens: int = 100_000
    teacher_run: str | None = None
    teacher_weight: float = TEACHER_WEIGHT

    def __post_init__(self) -> None:
        for name in ("batch_size", "bptt"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_tokens < 0:
            raise ValueError(f"eval_tokens must be >= 0, got {self.eval_tokens}")
        if not 0 <= self.teacher_weight <= 1:
            raise ValueError(f"teacher_weight must be in [0, 1], got {self.teacher_weight}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.bptt

    @property
    def valid_lanes(self) -> int:
        return min(self.batch_size, VALID_MAX_LANES)


# The models this task trains, by `--arch`: the paper's LSTM model, and the Transformer.
ARCHITECTURES = {
    "lstm": Architecture(LMConfig, LanguageModel),
    "transformer": Architecture(TransformerLMConfig, TransformerLM),
}


class LanguageModelTask:
    """A language model on a prepared dataset folder (data_prep.*): the LSTM model of App.
    C.1, its state carried from window to window, or a Transformer (switch.transformer),
    which reads each window from position 0: its window, bptt, is its context, in training
    and in validation alike."""

    name = "lm"
    architectures = ARCHITECTURES
    default_arch = "lstm"
    model_config_class = LMConfig  # the default architecture's
    config_class = LMTaskConfig
    resumable_fields = frozenset({"eval_tokens"})

    def __init__(
        self,
        model_config: LMConfig,
        config: LMTaskConfig,
        data_dir: Path,
        group: ParallelGroup | None = None,
        micro_batches: int = 1,
        seed: int = 1,
    ):
        """micro_batches: how many the engine splits each step into (TrainConfig); seed: the
        run's, which keys the sampled softmax's candidates."""
        self.model_config, self.config = model_config, config
        self.arch = architecture_of(self.architectures, model_config)
        _check_window(model_config, config.bptt, "the learned positions' table")
        self.seed = seed
        self.group = ParallelGroup() if group is None else group
        self.data_dir = Path(data_dir)
        self.meta = read_meta(self.data_dir)
        if model_config.vocab_size != self.meta["vocab"]["size"]:
            raise ValueError(
                f"model vocab_size {model_config.vocab_size} != dataset vocabulary "
                f"{self.meta['vocab']['size']} ({self.data_dir})"
            )
        world = self.group.world_size
        if config.batch_size % (world * micro_batches) or config.valid_lanes % world:
            raise ValueError(
                f"batch_size ({config.batch_size}) must be a multiple of the number of ranks "
                f"({world}) times micro_batches ({micro_batches}), and the validation lanes "
                f"(min(batch_size, {VALID_MAX_LANES}) = {config.valid_lanes}) a multiple of "
                "the number of ranks"
            )
        self.micro_batches = micro_batches
        self.sampled = model_config.softmax == "sampled" and (
            model_config.vocab_size > model_config.n_samples
        )
        train_ids = read_split(self.data_dir, "train", self.meta)
        self.train_batches = [
            LaneBatches(
                train_ids,
                config.batch_size,
                config.bptt,
                EOS_ID,
                keep_remainder=False,
                lanes=self._lanes(config.batch_size, micro, micro_batches),
            )
            for micro in range(micro_batches)
        ]
        self.valid_batches = None
        if "valid" in self.meta["splits"]:
            self.valid_batches = LaneBatches(
                read_split(self.data_dir, "valid", self.meta),
                config.valid_lanes,
                self.valid_bptt,
                EOS_ID,
                keep_remainder=True,
                lanes=self._lanes(config.valid_lanes),
            )
        self.states: list[list | None] = [None] * micro_batches  # LSTM state per micro-batch
        self.teacher: Teacher | None = None
        if config.teacher_run is not None:
            if model_config.softmax == "sampled":
                raise ValueError(
                    "distillation needs the full softmax (the teacher's whole distribution is "
                    "the target): set --softmax=full"
                )
            # Saved resolved, so that the run resumes from any working directory.
            self.config = config = dataclasses.replace(
                config, teacher_run=str(Path(config.teacher_run).resolve())
            )
            self.teacher = Teacher(
                config.teacher_run, config.teacher_weight, load_trained_model, self._check_data
            )
            _check_window(self.teacher.model.config, config.bptt, "the teacher's positions")
        self.teacher_states: list[list | None] = [None] * micro_batches  # the teacher's

    def _lanes(self, batch_size: int, micro: int = 0, micro_batches: int = 1) -> tuple[int, int]:
        """This rank's lanes of micro-batch `micro` of a batch_size-lane layout: micro-batch m
        is lanes [m·B/M, (m+1)·B/M), cut over the ranks in rank order, so each MoE call (one
        micro-batch on every rank) routes the tokens one process routes in its micro-batch m."""
        share = batch_size // (self.group.world_size * micro_batches)
        first = (micro * self.group.world_size + self.group.rank) * share
        return first, first + share

    # ------------------------------------------------------------------ the engine's interface

    @property
    def valid_bptt(self) -> int:
        """Validation's window: VALID_BPTT steps for the LSTM (its state carries on), the
        training window for the Transformer (the context it learned)."""
        return VALID_BPTT if self.arch == "lstm" else self.config.bptt

    def build_model(self) -> nn.Module:
        model = self.architectures[self.arch].model_class(
            self.model_config, self.group.process_group
        )
        return model if self.teacher is None else self.teacher.initialise(model)

    def train_batch(self, step: int, micro: int, micro_batches: int):
        batches = self.train_batches[micro]
        return batches.window(step % len(batches))

    def count_targets(self, batch) -> int:
        return int(batch.mask.sum())

    def forward(
        self, model: nn.Module, batch, step: int, micro: int, device: torch.device
    ) -> StepOutput:
        if batch.first:
            self.states[micro] = self.teacher_states[micro] = None
        inputs, targets = batch.inputs.to(device), batch.targets.to(device)
        out = model(inputs, _on(self.states[micro], device))
        self.states[micro] = detach_state(out.state)
        if self.teacher is not None:
            return self._distill(model, out, inputs, targets, micro, device)
        nll = model.nll(
            out.hidden, targets, sampled=True, generator=self.candidate_generator(step, device)
        )  # [T·B], the sampled estimate when the softmax is sampled
        return StepOutput(nll.sum(), out.aux_loss, routing_stats(out.moe))

    def _distill(
        self, model: nn.Module, out, inputs, targets, micro: int, device: torch.device
    ) -> StepOutput:
        """The distillation step (Switch §4.2): the frozen teacher on the same window, in
        float32 and evaluation mode, its own LSTM state carried as the student's is."""
        teacher = self.teacher.on(device)
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            taught = teacher(inputs, _on(self.teacher_states[micro], device))
        self.teacher_states[micro] = detach_state(taught.state)
        nll, teacher_ce = softmax_distillation_terms(
            model.softmax,
            out.hidden.reshape(-1, out.hidden.shape[-1]),  # [T·B, D]
            teacher.softmax,
            taught.hidden.reshape(-1, taught.hidden.shape[-1]),  # [T·B, D']
            targets.reshape(-1),
        )  # [T·B] each
        return self.teacher.step_output(
            nll, teacher_ce, None, out.aux_loss, routing_stats(out.moe), self.group
        )

    def candidate_generator(self, step: int, device: torch.device) -> torch.Generator:
        """The sampled softmax's candidates for a step: keyed by the run's seed and the step,
        not drawn from the global stream, so every rank and every micro-batch of the step
        scores against the same candidates, and a resumed run draws what an uninterrupted
        one did."""
        seed = (self.seed * 2_654_435_761 + step) % 2**63
        return torch.Generator(device).manual_seed(seed)

    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        if self.valid_batches is None:
            return {}
        tokens_per_window = self.valid_batches.batch_size * self.valid_batches.bptt  # all ranks
        max_windows = None
        if self.config.eval_tokens:
            max_windows = max(1, math.ceil(self.config.eval_tokens / tokens_per_window))
        result = evaluate(model, self.valid_batches, device, max_windows, group=self.group)
        entry = {
            "valid_nll": result["nll_per_token"],
            "valid_ppl": result["perplexity"],
            "valid_tokens": result["tokens"],
        }
        for layer, summary in enumerate(result["moe_layers"]):
            entry[f"moe{layer}_valid_cv_load"] = summary["cv_load"]
            entry[f"moe{layer}_valid_max_over_mean_load"] = summary["max_over_mean_load"]
        return entry

    def state_dict(self) -> dict:
        """The LSTM state of all lanes, [1, B, D] per tensor, gathered in lane order
        (micro-batches, then ranks: _lanes), or None before the first step; a teacher's
        beside it."""
        state = {"lstm_state": self._gather_lanes(self.states)}
        if self.teacher is not None:
            state["teacher_lstm_state"] = self._gather_lanes(self.teacher_states)
        return state

    def _gather_lanes(self, states: list[list | None]) -> list | None:
        if any(state is None for state in states):
            return None
        layers = []
        for layer in range(len(states[0])):
            tensors = []
            for i in range(2):  # h, c
                blocks = []
                for state in states:  # [1, B/(W·M), D] per micro-batch
                    everyone = self.group.gather(state[layer][i])  # [W, 1, B/(W·M), D]
                    blocks.extend(everyone)
                tensors.append(torch.cat(blocks, dim=1))  # [1, B, D]
            layers.append(tensors)
        return layers

    def load_state_dict(self, state: dict) -> None:
        """This rank's lanes of a saved state, at any number of ranks and micro-batches."""
        self.states = self._my_lanes(state["lstm_state"])
        self.teacher_states = self._my_lanes(state.get("teacher_lstm_state"))

    def _my_lanes(self, full: list | None) -> list[list | None]:
        states: list[list | None] = []
        for micro in range(self.micro_batches):
            if not full:
                states.append(None)
                continue
            first, last = self._lanes(self.config.batch_size, micro, self.micro_batches)
            states.append([(h[:, first:last].clone(), c[:, first:last].clone()) for h, c in full])
        return states

    def record(self, model: nn.Module) -> dict:
        record = {
            "arch": self.arch,
            "data": data_fingerprint(self.data_dir, self.meta),
            "ops_per_timestep": model.ops_per_timestep(),
            "params_excl_embedding_softmax": model.params_excluding_embedding_softmax(),
            "total_params": model.total_params(),
        }
        if self.teacher is not None:
            record["teacher"] = self.teacher.record()
        return record

    def check_resume(self, saved_record: dict, source: str) -> None:
        self._check_data(saved_record, source)
        if self.teacher is not None:
            self.teacher.check_resume(saved_record.get("teacher"), source)

    def _check_data(self, record: dict, source: str) -> None:
        """Refuse a checkpoint or a teacher run (its record) trained on other data."""
        check_same_dataset(record["data"], self.data_dir, self.meta, source)

    def loss_metrics(self, loss: float) -> dict[str, float]:
        return {("sampled_ppl" if self.sampled else "ppl"): math.exp(min(loss, 50.0))}

    def progress_total(self, max_tokens: int) -> int | None:
        return math.ceil(max_tokens / self.config.tokens_per_step)

    def summary(self, model: nn.Module) -> str:
        return (
            f"{model.ops_per_timestep() / 1e6:.2f}M ops/timestep, "
            f"{model.params_excluding_embedding_softmax() / 1e6:.2f}M params excl. embedding "
            f"and softmax, {model.total_params() / 1e6:.1f}M total"
        ) + ("" if self.teacher is None else f"; {self.teacher.summary()}")

    # ------------------------------------------------------------------ the command line

    @staticmethod
    def presets() -> dict:
        from lstm_moe.presets import PRESETS
        from switch.presets import TRANSFORMER_LM_PRESETS

        return {**PRESETS, **TRANSFORMER_LM_PRESETS}

    @staticmethod
    def data_dir_of(record: dict) -> Path:
        return Path(record["data"]["path"])

    @staticmethod
    def dataset_overrides(data_dir: Path) -> dict:
        """Model fields a new run takes from its dataset: the vocabulary size."""
        return {"vocab_size": read_meta(data_dir)["vocab"]["size"]}


def _check_window(model_config, bptt: int, what: str) -> None:
    """Refuse a window longer than a Transformer's learned positions (ValueError)."""
    if getattr(model_config, "positions", None) == "learned" and bptt > model_config.max_positions:
        raise ValueError(
            f"bptt ({bptt}) is longer than {what} (max_positions={model_config.max_positions})"
        )


def _on(state: list | None, device: torch.device) -> list | None:
    """A carried LSTM state on device: a no-op but after a resume, which loads it on the CPU."""
    if state is None:
        return None
    return [(h.to(device), c.to(device)) for h, c in state]


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: LanguageModel,
    batches: LaneBatches,
    device: torch.device,
    max_windows: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    group: ParallelGroup | None = None,
) -> dict:
    """Exact negative log-likelihood over the windows of `batches` (all, or the first
    `max_windows`). Returns nll, tokens, perplexity and per-MoE-layer routing statistics.

    The last window's padded positions are masked: the MoE layers route none of them, so
    they use no capacity and are in no statistic. group: every rank evaluates its lanes of
    the same layout (batches.lanes) with its share of the experts, and the sums are taken
    over ranks; the routing statistics already are."""
    group = ParallelGroup() if group is None else group
    was_training = model.training
    model.eval()
    n_windows = len(batches) if max_windows is None else min(max_windows, len(batches))
    nll_sum, n_tokens = 0.0, 0
    state = None
    totals = RoutingTotals()
    windows = range(n_windows)
    if progress:
        windows = tqdm(windows, desc="evaluate", unit="window", leave=False)
    try:
        for index in windows:
            window = batches.window(index)
            inputs, targets = window.inputs.to(device), window.targets.to(device)
            # Decided from the layout, so every rank passes a mask or none alike (a router
            # that counts the batch's tokens then counts the same batch on every rank).
            padded = batches.has_padding(index)
            mask = window.mask.to(device)
            if window.first:
                state = None
            with torch.autocast(device.type, autocast_dtype, enabled=autocast_dtype is not None):
                out = model(inputs, state, mask=mask if padded else None)
            state = detach_state(out.state)
            nll = model.nll(out.hidden, targets).view_as(targets)  # [T, B]
            nll_sum += float(nll[mask].double().sum())
            n_tokens += int(mask.sum())
            totals.add(out.moe)
    finally:
        model.train(was_training)
    nll_sum, n_tokens = group.sum_host([nll_sum, float(n_tokens)])
    n_tokens = int(n_tokens)
    mean_nll = nll_sum / max(n_tokens, 1)
    return {
        "nll_per_token": mean_nll,
        "perplexity": math.exp(mean_nll),
        "tokens": n_tokens,
        "moe_layers": totals.summaries(),
    }


def load_trained_model(run_dir: Path, device: torch.device):
    """The model of a language-model run folder, its experts reassembled from however many
    ranks saved them, with its dataset's folder and meta.json, after checking that they belong
    together. Returns (model, data_dir, meta, run_config, checkpoint step, tokens trained)."""
    return load_run_model(run_dir, device, LanguageModelTask.name, ARCHITECTURES, read_meta)


__all__ = [
    "LMTaskConfig",
    "LanguageModelTask",
    "evaluate",
    "load_trained_model",
    "routing_summary",
]
