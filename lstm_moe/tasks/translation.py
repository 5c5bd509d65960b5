"""Translation (Shazeer et al. 2017, §5.3, App. E) as a task of the engine: the GNMT-style
LSTM-MoE of lstm_moe.nmt on a binarized parallel dataset (data_prep.parallel), trained with
teacher forcing on batches of length-sorted sentence pairs (lstm_moe.pair_batches).

The loss is the per-target-token negative log-likelihood (every target word piece and one EOS
per sentence), label-smoothed when the model config asks for it; validation reports the
unsmoothed per-token NLL and its perplexity (the paper reports test perplexity beside BLEU),
with the routing statistics of both MoE layers (moe0: encoder, moe1: decoder).

A step's batch is `batch_size` pairs over all ranks and micro-batches; micro-batch m on rank r
is a contiguous block of it (lstm_moe.pair_batches.share), so W ranks route what one process
routes. The schedule is a function of the seed and the step, so the task carries no state.
BLEU needs decoding, which is evaluation's job (eval.translate, eval.bleu).

Distillation (Switch §4.2): with teacher_run, the model starts from the teacher run's
non-expert weights and trains on (1 - w)·NLL + w·CE(teacher) (lstm_moe.tasks.teacher,
switch.distill); the ground-truth term is label-smoothed as without a teacher, the teacher's
term is not. Validation stays the unsmoothed ground-truth NLL.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from lstm_moe.config import NMTConfig
from lstm_moe.engine.task import StepOutput
from lstm_moe.moe.parallel import ParallelGroup
from lstm_moe.nmt import TranslationModel
from lstm_moe.pair_batches import PairBatch, PairBatches, collate_pairs, share, sorted_batches
from lstm_moe.pairs import PairSplit, read_pairs, read_parallel_meta
from lstm_moe.tasks.common import (
    Architecture,
    RoutingTotals,
    architecture_of,
    check_same_dataset,
    data_fingerprint,
    load_run_model,
    routing_stats,
)
from lstm_moe.tasks.teacher import Teacher
from switch.config import TransformerNMTConfig
from switch.distill import TEACHER_WEIGHT, softmax_distillation_terms
from switch.transformer import TransformerTranslationModel

__all__ = [
    "TranslationTask",
    "TranslationTaskConfig",
    "evaluate_pairs",
    "load_trained_model",
]


@dataclass(frozen=True)
class TranslationTaskConfig:
    """batch_size: sentence pairs per step (over all ranks and micro-batches); the paper's
    batches held ~16K target words per GPU. eval_pairs: validation pairs used each time (0 =
    the whole split), in the split's order.
    teacher_run: a trained translation run folder to distil (Switch §4.2; switch.distill):
        the model starts from its non-expert weights and trains on the soft target
        teacher_weight·p_teacher + (1 - teacher_weight)·onehot. None: no teacher.
    """

    HELP: ClassVar[dict[str, str]] = {
        "teacher_run": "distil this trained run (its non-expert weights, then the mixed loss; "
        "Switch §4.2)",
        "teacher_weight": "the teacher's share of the soft target (Switch §4.2: 0.25)",
    }

    batch_size: int = 64
    eval_pairs: int = 1000
    teacher_run: str | None = None
    teacher_weight: float = TEACHER_WEIGHT

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.eval_pairs < 0:
            raise ValueError(f"eval_pairs must be >= 0, got {self.eval_pairs}")
        if not 0 <= self.teacher_weight <= 1:
            raise ValueError(f"teacher_weight must be in [0, 1], got {self.teacher_weight}")


# The models this task trains, by `--arch`: the paper's GNMT-style LSTM model, and the
# encoder-decoder Transformer.
ARCHITECTURES = {
    "lstm": Architecture(NMTConfig, TranslationModel),
    "transformer": Architecture(TransformerNMTConfig, TransformerTranslationModel),
}


class TranslationTask:
    """A translation model on a prepared parallel dataset folder: the LSTM model of App. E
    or an encoder-decoder Transformer (switch.transformer), through the same batches, loss
    and validation."""

    name = "translation"
    architectures = ARCHITECTURES
    default_arch = "lstm"
    model_config_class = NMTConfig  # the default architecture's
    config_class = TranslationTaskConfig
    resumable_fields = frozenset({"eval_pairs"})

    def __init__(
        self,
        model_config: NMTConfig,
        config: TranslationTaskConfig,
        data_dir: Path,
        group: ParallelGroup | None = None,
        micro_batches: int = 1,
        seed: int = 1,
    ):
        self.model_config, self.config = model_config, config
        self.arch = architecture_of(self.architectures, model_config)
        self.group = ParallelGroup() if group is None else group
        self.data_dir = Path(data_dir)
        self.meta = read_parallel_meta(self.data_dir)
        if model_config.vocab_size != self.meta["vocab"]["size"]:
            raise ValueError(
                f"model vocab_size {model_config.vocab_size} != the dataset's vocabulary "
                f"{self.meta['vocab']['size']} ({self.data_dir})"
            )
        world = self.group.world_size
        if config.batch_size % (world * micro_batches):
            raise ValueError(
                f"batch_size ({config.batch_size}) must be a multiple of the number of ranks "
                f"({world}) times micro_batches ({micro_batches})"
            )
        self.micro_batches = micro_batches
        self.train_batches = PairBatches(
            read_pairs(self.data_dir, "train", self.meta), config.batch_size, seed
        )
        self.valid: PairSplit | None = None
        if "valid" in self.meta["splits"] and self.meta["splits"]["valid"]["pairs"]:
            self.valid = read_pairs(self.data_dir, "valid", self.meta)
        self.teacher: Teacher | None = None
        if config.teacher_run is not None:
            # Saved resolved, so that the run resumes from any working directory.
            self.config = config = dataclasses.replace(
                config, teacher_run=str(Path(config.teacher_run).resolve())
            )
            self.teacher = Teacher(
                config.teacher_run, config.teacher_weight, load_trained_model, self._check_data
            )

    # ------------------------------------------------------------------ the engine's interface

    def build_model(self) -> nn.Module:
        model = self.architectures[self.arch].model_class(
            self.model_config, self.group.process_group
        )
        return model if self.teacher is None else self.teacher.initialise(model)

    def train_batch(self, step: int, micro: int, micro_batches: int) -> PairBatch:
        part = share(
            self.config.batch_size, micro, micro_batches, self.group.rank, self.group.world_size
        )
        return self.train_batches.batch(step, part)

    def count_targets(self, batch: PairBatch) -> int:
        return batch.n_targets

    def forward(
        self, model: nn.Module, batch: PairBatch, step: int, micro: int, device: torch.device
    ) -> StepOutput:
        src, src_mask = batch.src.to(device), batch.src_mask.to(device)
        tgt_in, targets = batch.tgt_in.to(device), batch.targets.to(device)
        tgt_mask = batch.tgt_mask.to(device)
        out = model(src, src_mask, tgt_in, tgt_mask)
        if self.teacher is not None:
            return self._distill(model, out, (src, src_mask, tgt_in, tgt_mask), targets, device)
        nll = model.nll(out.hidden, targets, self.model_config.label_smoothing)  # [T·B]
        loss_sum = (nll * tgt_mask.reshape(-1)).sum()
        return StepOutput(loss_sum, out.aux_loss, routing_stats(out.moe))

    def _distill(self, model: nn.Module, out, inputs: tuple, targets, device: torch.device):
        """The distillation step (Switch §4.2): the frozen teacher, teacher-forced on the same
        pairs (inputs: src, src_mask, tgt_in, tgt_mask on device), in float32 and evaluation
        mode."""
        teacher = self.teacher.on(device)
        tgt_mask = inputs[3]
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            taught = teacher(*inputs)
        nll, teacher_ce = softmax_distillation_terms(
            model.softmax,
            out.hidden.reshape(-1, out.hidden.shape[-1]),  # [T·B, D]
            teacher.softmax,
            taught.hidden.reshape(-1, taught.hidden.shape[-1]),  # [T·B, D']
            targets.reshape(-1),
            self.model_config.label_smoothing,
        )  # [T·B] each
        return self.teacher.step_output(
            nll, teacher_ce, tgt_mask.reshape(-1), out.aux_loss, routing_stats(out.moe), self.group
        )

    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        if self.valid is None:
            return {}
        result = evaluate_pairs(
            model,
            self.valid,
            device,
            batch_size=self.config.batch_size,
            max_pairs=self.config.eval_pairs or None,
            group=self.group,
        )
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
        return {}  # the schedule is a function of (seed, step)

    def load_state_dict(self, state: dict) -> None:
        pass

    def record(self, model: nn.Module) -> dict:
        record = {
            "arch": self.arch,
            "data": {
                **data_fingerprint(self.data_dir, self.meta),
                "src_lang": self.meta["src_lang"],
                "tgt_lang": self.meta["tgt_lang"],
            },
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
        saved = record["data"]
        pair = (self.meta["src_lang"], self.meta["tgt_lang"])
        saved_pair = (saved.get("src_lang"), saved.get("tgt_lang"))
        if saved_pair != pair:
            raise ValueError(
                f"{self.data_dir} is {pair[0]}→{pair[1]}, but {source} was trained on "
                f"{saved_pair[0]}→{saved_pair[1]}"
            )
        check_same_dataset(saved, self.data_dir, self.meta, source)

    def loss_metrics(self, loss: float) -> dict[str, float]:
        name = "smoothed_ppl" if self.model_config.label_smoothing else "ppl"
        return {name: math.exp(min(loss, 50.0))}

    def progress_total(self, max_tokens: int) -> int | None:
        """An estimate, for the progress bar: batches hold batch_size pairs of the split's mean
        target length."""
        split = self.train_batches.split
        mean_targets = len(split.tgt) / len(split) * self.config.batch_size
        return math.ceil(max_tokens / mean_targets)

    def summary(self, model: nn.Module) -> str:
        ops = model.ops_per_timestep()
        return (
            f"{self.meta['src_lang']}→{self.meta['tgt_lang']}, {ops['total'] / 1e6:.2f}M "
            f"ops/timestep (encoder {ops['encoder'] / 1e6:.2f}M, decoder "
            f"{ops['decoder'] / 1e6:.2f}M, softmax {ops['softmax'] / 1e6:.2f}M), "
            f"{model.params_excluding_embedding_softmax() / 1e6:.2f}M params excl. embeddings "
            f"and softmax, {model.total_params() / 1e6:.1f}M total"
        ) + ("" if self.teacher is None else f"; {self.teacher.summary()}")

    # ------------------------------------------------------------------ the command line

    @staticmethod
    def presets() -> dict:
        from lstm_moe.presets import TRANSLATION_PRESETS
        from switch.presets import TRANSFORMER_NMT_PRESETS

        return {**TRANSLATION_PRESETS, **TRANSFORMER_NMT_PRESETS}

    @staticmethod
    def data_dir_of(record: dict) -> Path:
        return Path(record["data"]["path"])

    @staticmethod
    def dataset_overrides(data_dir: Path) -> dict:
        """Model fields a new run takes from its dataset: the vocabulary size."""
        return {"vocab_size": read_parallel_meta(data_dir)["vocab"]["size"]}


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_pairs(
    model: TranslationModel,
    split: PairSplit,
    device: torch.device,
    batch_size: int = 64,
    max_pairs: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    group: ParallelGroup | None = None,
) -> dict:
    """Exact per-target-token NLL of the first max_pairs pairs of a split (all when None),
    teacher-forced. Batches are length-sorted; each is cut over the ranks of `group` in rank
    order (every rank gets at least one pair of each batch), and the sums are taken over the
    ranks. Returns nll_per_token, perplexity, tokens and per-MoE-layer routing summaries."""
    group = ParallelGroup() if group is None else group
    world = group.world_size
    n_pairs = len(split) if max_pairs is None else min(max_pairs, len(split))
    if n_pairs < world:
        raise ValueError(f"{n_pairs} evaluation pairs cannot be shared by {world} ranks")
    batches = sorted_batches(split.src_lengths[:n_pairs], batch_size, min_size=world)
    was_training = model.training
    model.eval()
    nll_sum, n_tokens = 0.0, 0
    totals = RoutingTotals()
    if progress:
        batches = tqdm(batches, desc="evaluate", unit="batch", leave=False)
    try:
        for indices in batches:
            mine = np.array_split(indices, world)[group.rank]
            batch = collate_pairs(split, mine)
            tgt_mask = batch.tgt_mask.to(device)
            with torch.autocast(device.type, autocast_dtype, enabled=autocast_dtype is not None):
                out = model(
                    batch.src.to(device),
                    batch.src_mask.to(device),
                    batch.tgt_in.to(device),
                    tgt_mask,
                )
            nll = model.nll(out.hidden, batch.targets.to(device)).view_as(tgt_mask)  # [T, B]
            nll_sum += float(nll[tgt_mask].double().sum())
            n_tokens += int(tgt_mask.sum())
            totals.add(out.moe)
    finally:
        model.train(was_training)
    nll_sum, n_tokens = group.sum_host([nll_sum, float(n_tokens)])
    mean_nll = nll_sum / max(n_tokens, 1)
    return {
        "nll_per_token": mean_nll,
        "perplexity": math.exp(min(mean_nll, 50.0)),
        "tokens": int(n_tokens),
        "moe_layers": totals.summaries(),
    }


def load_trained_model(run_dir: Path, device: torch.device, group: ParallelGroup | None = None):
    """The translation model of a run folder, its experts reassembled from however many ranks
    saved them (this rank's share of them with a group), with its dataset folder and
    meta.json, checked to belong together. Returns (model, data_dir, meta, run_config,
    checkpoint step, tokens trained)."""
    return load_run_model(
        run_dir, device, TranslationTask.name, ARCHITECTURES, read_parallel_meta, group
    )
