"""Train a language model on a prepared dataset (data_prep.*), resumably.

    python -m lstm_moe.train --data data/lm1b-<id> --run runs/moe32 --preset MoE-32 \\
        --max_tokens=100000000 [--key=value ...]
    python -m lstm_moe.train --run runs/moe32 --resume

Any LMConfig or TrainConfig field can be overridden with `--field=value` (type-checked). The run
folder holds everything needed to resume or evaluate:
  config.json     the model and training configs, the dataset's path and fingerprint
  metrics.jsonl   one JSON object per log interval ("kind": "train") and per validation
                  ("kind": "valid"): loss, perplexity, each auxiliary loss, load CV, max/mean
                  load, tokens/s
  checkpoint.pt   model, optimizer, schedule, RNG states, LSTM state and data position, written
                  atomically every `checkpoint_every` steps and at the end

Optimisation follows App. C.1: Adam; the learning rate rises linearly for `warmup_steps` (1000 in
the paper) and then falls ∝ 1/√step; the weighted balancing losses are added to the loss.
A resumed run continues exactly: its losses equal those of a run that was never interrupted.

Started by `torchrun --nproc_per_node=W -m lstm_moe.train ...` it trains on W ranks, the
experts sharded and everything else data-parallel (lstm_moe.distributed): the `batch_size`
lanes are split evenly over the ranks, and the updates are those of one process on the same
batch, up to the order of floating-point sums, when the run draws nothing at random per token
(no dropout, no router noise). The sampled softmax's candidates are drawn per step from a
generator keyed by the seed and the step, the same on every rank, so it is exact too. Dropout
masks and router noise are drawn by each rank for its own tokens from its own stream: the
same distributions as one process, other draws. With a capacity_factor the ranks keep the
tokens one process keeps: the MoE layer takes its tokens lane by lane, and a rank's lanes are
a contiguous block of the batch (lstm_moe.lm.MoEBlock). Validation runs on every rank over its
lanes of the validation layout and is summed, so it equals one process's. Rank 0 writes
config.json, metrics.jsonl and checkpoint.pt; every rank writes its expert shard
(lstm_moe.checkpoint), and a run resumes, or is evaluated, at any number of ranks that divides
batch_size, the validation lanes and n_experts.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from lstm_moe.checkpoint import (
    expert_parameter_indices,
    load_run_checkpoint,
    remove_stale_shards,
    rng_state,
    save_checkpoint,
    set_rng_state,
    shard_path,
)
from lstm_moe.config import (
    LMConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    split_overrides,
)
from lstm_moe.data import LaneBatches
from lstm_moe.distributed import (
    Distributed,
    clip_global_grad_norm,
    fail,
    rank_seed,
    split_parameters,
    sum_replicated_grads,
)
from lstm_moe.files import EOS_ID, read_meta, read_split, write_json_atomic, write_text_atomic
from lstm_moe.lm import LanguageModel, detach_state
from lstm_moe.moe.parallel import ParallelGroup, is_expert_tensor
from lstm_moe.presets import get_preset
from lstm_moe.runtime import resolve_device


@dataclass(frozen=True)
class TrainConfig:
    """batch_size lanes × bptt steps = tokens per step. Budgets: training stops at the first
    of max_steps / max_tokens / max_seconds that is set (at least one must be).

    lr: the peak learning rate, reached at the end of the linear warm-up.
    eval_every: steps between validations; eval_tokens: validation targets used each time
        (0 = the whole split). checkpoint_every: steps between checkpoints.
    bf16: on CUDA, run under bf16 autocast (the router and the softmax stay in float32).
    dist_timeout: seconds a rank waits in a collective (on W > 1 ranks) before it gives up
        with an error: a rank that died or hangs stops the others instead of blocking them.
    checkpoint_timeout: the same for the waits around writing a checkpoint, which last as
        long as the slowest rank's disk (gigabytes at the paper's sizes).
    """

    batch_size: int = 32
    bptt: int = 20
    lr: float = 1e-3
    warmup_steps: int = 1000
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0
    max_steps: int | None = None
    max_tokens: int | None = None
    max_seconds: float | None = None
    eval_every: int = 500
    eval_tokens: int = 100_000
    checkpoint_every: int = 200
    log_every: int = 10
    seed: int = 1
    device: str = "auto"
    bf16: bool = True
    threads: int | None = None
    dist_timeout: float = 60.0
    checkpoint_timeout: float = 1800.0

    def __post_init__(self) -> None:
        for name in ("batch_size", "bptt", "eval_every", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "max_tokens", "max_seconds"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 (or unset), got {getattr(self, name)}")
        if self.grad_clip <= 0 or self.eval_tokens < 0:
            raise ValueError(
                f"grad_clip must be > 0 and eval_tokens >= 0, got {self.grad_clip}, "
                f"{self.eval_tokens}"
            )
        if self.checkpoint_every % self.log_every:
            # A resumed run must average the same steps into each logged entry.
            raise ValueError(
                f"checkpoint_every ({self.checkpoint_every}) must be a multiple of log_every "
                f"({self.log_every})"
            )
        for name in ("dist_timeout", "checkpoint_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.lr <= 0 or self.warmup_steps < 0:
            raise ValueError(
                f"lr must be > 0 and warmup_steps >= 0, got {self.lr}, {self.warmup_steps}"
            )

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.bptt


# What `--resume` may change: when and how long to train, and where. Everything else (batch,
# window, schedule, seed) decides which tokens and updates come next, and is fixed by the run.
RESUMABLE_FIELDS = frozenset(
    {
        "max_steps",
        "max_tokens",
        "max_seconds",
        "eval_every",
        "eval_tokens",
        "checkpoint_every",
        "log_every",
        "device",
        "bf16",
        "threads",
        "dist_timeout",
        "checkpoint_timeout",
    }
)


def learning_rate_factor(step: int, warmup_steps: int) -> float:
    """Multiplier of the peak rate after `step` updates: linear warm-up, then ∝ 1/√step."""
    step = max(step, 1)
    if warmup_steps == 0:
        return 1.0 / math.sqrt(step)
    return min(step / warmup_steps, math.sqrt(warmup_steps / step))


def autocast_dtype_for(device: torch.device, bf16: bool) -> torch.dtype | None:
    # bf16 matrix products are very slow on CPUs without AMX; float32 there.
    return torch.bfloat16 if bf16 and device.type == "cuda" else None


def data_fingerprint(data_dir: Path, meta: dict) -> dict:
    fingerprint = {
        "path": str(Path(data_dir).resolve()),
        "dataset": meta.get("dataset"),
        "recipe_id": meta.get("recipe_id"),
        "vocab_size": meta["vocab"]["size"],
        "vocab_sha256": meta["vocab"]["sha256"],
    }
    return fingerprint


# ----------------------------------------------------------------------------- the run


class Trainer:
    def __init__(
        self,
        run_dir: Path,
        model_config: LMConfig,
        train_config: TrainConfig,
        data_dir: Path,
        preset: str | None = None,
        ranks: Distributed | None = None,
    ):
        self.ranks = Distributed() if ranks is None else ranks
        world, rank = self.ranks.world_size, self.ranks.rank
        self.run_dir, self.data_dir = Path(run_dir), Path(data_dir)
        self.model_config, self.config, self.preset = model_config, train_config, preset
        self.meta = read_meta(self.data_dir)
        if model_config.vocab_size != self.meta["vocab"]["size"]:
            raise ValueError(
                f"model vocab_size {model_config.vocab_size} != dataset vocabulary "
                f"{self.meta['vocab']['size']} ({self.data_dir})"
            )
        if train_config.threads:
            torch.set_num_threads(train_config.threads)
        self.device = self.ranks.device(resolve_device(train_config.device))
        valid_lanes = min(train_config.batch_size, 16)
        if train_config.batch_size % world or valid_lanes % world:
            raise ValueError(
                f"batch_size ({train_config.batch_size}) and the validation lanes "
                f"(min(batch_size, 16) = {valid_lanes}) must be multiples of the number of "
                f"ranks ({world})"
            )
        self.autocast_dtype = autocast_dtype_for(self.device, train_config.bf16)
        self.softmax_is_sampled = (
            model_config.softmax == "sampled" and model_config.vocab_size > model_config.n_samples
        )
        torch.manual_seed(train_config.seed)
        # Every rank draws the model from the same seed: the replicated parts whole, the
        # experts only its own shard, as one process draws them (BatchedExperts).
        self.model = LanguageModel(model_config, self.ranks.process_group).to(self.device)
        if rank > 0:
            torch.manual_seed(rank_seed(train_config.seed, rank))
        self.replicated, self.expert_params = split_parameters(self.model)
        self.optimizer = torch.optim.Adam(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=train_config.lr,
            betas=(train_config.adam_beta1, train_config.adam_beta2),
        )
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: learning_rate_factor(step + 1, train_config.warmup_steps)
        )
        self.train_batches = LaneBatches(
            read_split(self.data_dir, "train", self.meta),
            train_config.batch_size,
            train_config.bptt,
            EOS_ID,
            keep_remainder=False,
            lanes=self._lanes(train_config.batch_size),
        )
        self.valid_batches = None
        if "valid" in self.meta["splits"]:
            self.valid_batches = LaneBatches(
                read_split(self.data_dir, "valid", self.meta),
                valid_lanes,
                50,
                EOS_ID,
                keep_remainder=True,
                lanes=self._lanes(valid_lanes),
            )
        self.step = 0
        self.tokens = 0
        self.elapsed = 0.0
        self.state = None

    def _lanes(self, batch_size: int) -> tuple[int, int]:
        """This rank's lanes of a batch_size-lane layout."""
        share = batch_size // self.ranks.world_size
        return self.ranks.rank * share, (self.ranks.rank + 1) * share

    # ------------------------------------------------------------------ files

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    def run_config(self) -> dict:
        return {
            "preset": self.preset,
            "model": config_to_dict(self.model_config),
            "train": config_to_dict(self.config),
            "data": data_fingerprint(self.data_dir, self.meta),
            "ops_per_timestep": self.model.ops_per_timestep(),
            "params_excl_embedding_softmax": self.model.params_excluding_embedding_softmax(),
            "total_params": self.model.total_params(),
        }

    def write_config(self) -> None:
        if not self.ranks.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.run_dir / "config.json", self.run_config())

    def _full_lstm_state(self) -> list[list[Tensor]] | None:
        """The LSTM state of all lanes, [1, B, D] per tensor, gathered in rank order."""
        if not self.state:
            return None
        group = ParallelGroup(self.ranks.process_group)
        return [
            [torch.cat(list(group.gather(t)), dim=1) for t in layer]  # [W, 1, B/W, D] -> [1, B, D]
            for layer in self.state
        ]

    def save(self) -> None:
        """checkpoint.pt; on W > 1 ranks, rank 0 writes the replicated state in it after every
        rank has written its expert shard (lstm_moe.checkpoint)."""
        ranks = self.ranks
        model, optimizer = self.model.state_dict(), self.optimizer.state_dict()
        payload = {
            "model_config": config_to_dict(self.model_config),
            "train_config": config_to_dict(self.config),
            "vocab_sha256": self.meta["vocab"]["sha256"],
            "data_recipe_id": self.meta.get("recipe_id"),
            "model": model,
            "optimizer": optimizer,
            "schedule": self.schedule.state_dict(),
            "rng": rng_state(self.device),
            "lstm_state": self._full_lstm_state(),
            "step": self.step,
            "tokens": self.tokens,
            "elapsed": self.elapsed,
        }
        if ranks.world_size == 1:
            save_checkpoint(self.checkpoint_path, payload)
            remove_stale_shards(self.run_dir, keep=set())
            return
        experts = expert_parameter_indices(self.model)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_checkpoint(
            shard_path(self.run_dir, self.step, ranks.rank, ranks.world_size),
            {
                "step": self.step,
                "rank": ranks.rank,
                "world_size": ranks.world_size,
                "model": {k: v for k, v in model.items() if is_expert_tensor(k)},
                "optimizer_state": {i: v for i, v in optimizer["state"].items() if i in experts},
                "rng": payload["rng"],
            },
        )
        ranks.barrier_for_io()  # every shard is on disk before checkpoint.pt names them
        if ranks.is_main:
            payload["model"] = {k: v for k, v in model.items() if not is_expert_tensor(k)}
            payload["optimizer"] = {
                "state": {i: v for i, v in optimizer["state"].items() if i not in experts},
                "param_groups": optimizer["param_groups"],
            }
            payload["expert_shards"] = ranks.world_size
            save_checkpoint(self.checkpoint_path, payload)
            keep = {
                shard_path(self.run_dir, self.step, r, ranks.world_size)
                for r in range(ranks.world_size)
            }
            remove_stale_shards(self.run_dir, keep)
        ranks.barrier_for_io()  # no rank writes the next shards while old ones are removed

    def restore(self) -> None:
        # Loaded to the CPU: RNG states must stay there; the model's load_state_dict copies.
        # On W ranks each rank reads only its own experts (from any number of saved shards).
        group = ParallelGroup(self.ranks.process_group)
        experts = expert_parameter_indices(self.model)
        ckpt = load_run_checkpoint(
            self.run_dir,
            map_location="cpu",
            group=group if self.ranks.world_size > 1 else None,
            expert_ids=experts,
        )
        saved = config_from_dict(LMConfig, ckpt["model_config"])
        if saved != self.model_config:
            raise ValueError(
                f"{self.checkpoint_path} was trained with a different model config; "
                "resume with the run's own config.json"
            )
        saved_train = ckpt["train_config"]
        changed = sorted(
            name
            for name, value in config_to_dict(self.config).items()
            if name not in RESUMABLE_FIELDS and saved_train.get(name) != value
        )
        if changed:
            raise ValueError(
                f"--resume cannot change {changed}: they decide which tokens and updates come "
                f"next; only {sorted(RESUMABLE_FIELDS)} may change"
            )
        if ckpt["data_recipe_id"] != self.meta.get("recipe_id"):
            raise ValueError(
                f"{self.data_dir} (recipe {self.meta.get('recipe_id')}) is not the dataset "
                f"{self.checkpoint_path} was trained on (recipe {ckpt['data_recipe_id']})"
            )
        if ckpt["vocab_sha256"] != self.meta["vocab"]["sha256"]:
            raise ValueError(
                f"the vocabulary of {self.data_dir} (sha256 {self.meta['vocab']['sha256'][:12]}) "
                f"is not the one {self.checkpoint_path} was trained with "
                f"({ckpt['vocab_sha256'][:12]})"
            )
        # This rank's experts and its lanes of the LSTM state: any number of ranks.
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        # Adam keeps tensors that are already on the right device and dtype as they are: copy
        # them out of the memory-mapped file, which the next save replaces.
        for moments in self.optimizer.state.values():
            for key, value in moments.items():
                if isinstance(value, Tensor):
                    moments[key] = value.clone()
        self.schedule.load_state_dict(ckpt["schedule"])
        rank = self.ranks.rank
        if ckpt.get("expert_shards", 1) == self.ranks.world_size:
            set_rng_state(ckpt["rngs"][rank], self.device)
        elif rank == 0:
            set_rng_state(ckpt["rng"], self.device)
        else:  # another number of ranks: a fresh stream of this rank's own
            torch.manual_seed(rank_seed(self.config.seed + ckpt["step"], rank))
        if ckpt["lstm_state"]:
            first, last = self._lanes(self.config.batch_size)
            self.state = [
                (
                    h[:, first:last].to(self.device, copy=True),
                    c[:, first:last].to(self.device, copy=True),
                )
                for h, c in ckpt["lstm_state"]
            ]
        self.step, self.tokens, self.elapsed = ckpt["step"], ckpt["tokens"], ckpt["elapsed"]
        self._check_ranks_resumed_alike()
        self._truncate_metrics(self.step)

    def _check_ranks_resumed_alike(self) -> None:
        """Every rank must have read the same checkpoint: a run folder that is not shared by
        all machines (a stale copy on one) would otherwise train replicas that drift apart."""
        ranks = self.ranks
        n_differ = ranks.count_differing_from_main((float(self.step), float(self.tokens)))
        if n_differ:
            raise ValueError(
                f"{n_differ} of {ranks.world_size} ranks resumed another checkpoint than rank 0; "
                f"every rank must see the same run folder {self.run_dir}"
            )

    def _truncate_metrics(self, step: int) -> None:
        """Drop metrics logged after the checkpoint, so a resumed log has no duplicates."""
        path = self.run_dir / "metrics.jsonl"
        if not self.ranks.is_main or not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if entry.get("step", 0) <= step:
                kept.append(line)
        write_text_atomic(path, "".join(line + "\n" for line in kept))

    def start_fresh(self) -> None:
        """A new run: remove what an earlier attempt killed before its first checkpoint left."""
        if not self.ranks.is_main:
            return
        remove_stale_shards(self.run_dir, keep=set())
        for name in ("metrics.jsonl", "checkpoint.pt.tmp", "eval/perplexity.json"):
            (self.run_dir / name).unlink(missing_ok=True)

    def log(self, entry: dict) -> None:
        if not self.ranks.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")

    # ------------------------------------------------------------------ training

    def budget_reached(self) -> bool:
        c = self.config
        return (
            (c.max_steps is not None and self.step >= c.max_steps)
            or (c.max_tokens is not None and self.tokens >= c.max_tokens)
            or (c.max_seconds is not None and self.elapsed >= c.max_seconds)
        )

    def total_steps(self) -> int | None:
        c, totals = self.config, []
        if c.max_steps is not None:
            totals.append(c.max_steps)
        if c.max_tokens is not None:
            totals.append(math.ceil(c.max_tokens / c.tokens_per_step))
        return min(totals) if totals else None

    def train_step(self) -> dict:
        window = self.train_batches.window(self.step % len(self.train_batches))
        if window.first:
            self.state = None
        inputs, targets = window.inputs.to(self.device), window.targets.to(self.device)
        self.model.train()
        with torch.autocast(
            self.device.type, self.autocast_dtype, enabled=self.autocast_dtype is not None
        ):
            out = self.model(inputs, self.state)
        world = self.ranks.world_size
        candidates = self.candidate_generator()
        if world == 1:
            nll = self.model.nll(out.hidden, targets, sampled=True, generator=candidates).mean()
            loss = nll + out.aux_loss
        else:
            # Σ_r loss_r is the one-process loss: the global mean NLL plus the aux loss
            # (which is already that of the global batch, on every rank).
            nll_per_token = self.model.nll(
                out.hidden, targets, sampled=True, generator=candidates
            )  # [T·B/W]
            global_tokens = nll_per_token.numel() * world
            loss = nll_per_token.sum() / global_tokens + out.aux_loss / world
            nll = self.ranks.sum(nll_per_token.detach().sum()) / global_tokens
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world == 1:
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], self.config.grad_clip
            )
        else:
            for p in self.expert_params:  # a shard no token reached: zeros, as in one process
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            sum_replicated_grads(self.replicated, self.ranks)
            grad_norm = clip_global_grad_norm(
                self.replicated, self.expert_params, self.config.grad_clip, self.ranks
            )
        self.optimizer.step()
        self.schedule.step()
        self.state = detach_state(out.state)
        self.step += 1
        self.tokens += targets.numel() * world
        stats = {
            "loss": float(nll.detach()),  # the sampled estimate when the softmax is sampled
            "aux_loss": float(out.aux_loss.detach()),
            "grad_norm": float(grad_norm),
        }
        for layer, result in enumerate(out.moe):
            prefix = f"moe{layer}_" if len(out.moe) > 1 else ""
            stats.update({prefix + name: float(v.detach()) for name, v in result.losses.items()})
            stats[prefix + "cv_load"] = float(result.stats.cv_load)
            stats[prefix + "cv_importance"] = float(result.stats.cv_importance)
            stats[prefix + "max_over_mean_load"] = float(result.stats.max_over_mean_load)
            stats[prefix + "fraction_dropped"] = float(result.stats.fraction_dropped)
        return stats

    def candidate_generator(self) -> torch.Generator:
        """The sampled softmax's candidates for this step come from a generator keyed by the
        run's seed and the step, the same on every rank: W ranks score their tokens against
        the candidates one process draws, and a resumed run draws what an uninterrupted one
        did."""
        seed = (self.config.seed * 2_654_435_761 + self.step) % 2**63
        return torch.Generator(self.device).manual_seed(seed)

    def validate(self) -> dict | None:
        from eval.perplexity import evaluate

        if self.valid_batches is None:
            return None
        tokens_per_window = self.valid_batches.batch_size * self.valid_batches.bptt  # all ranks
        max_windows = None
        if self.config.eval_tokens:
            max_windows = max(1, math.ceil(self.config.eval_tokens / tokens_per_window))
        rng = rng_state(self.device)  # validation must not change the training's random stream
        result = evaluate(
            self.model, self.valid_batches, self.device, max_windows, ranks=self.ranks
        )
        set_rng_state(rng, self.device)
        entry = {
            "kind": "valid",
            "step": self.step,
            "tokens": self.tokens,
            "elapsed": round(self.elapsed, 3),
            "valid_nll": result["nll_per_token"],
            "valid_ppl": result["perplexity"],
            "valid_tokens": result["tokens"],
        }
        for layer, summary in enumerate(result["moe_layers"]):
            entry[f"moe{layer}_valid_cv_load"] = summary["cv_load"]
            entry[f"moe{layer}_valid_max_over_mean_load"] = summary["max_over_mean_load"]
        self.log(entry)
        return entry

    def fit(self, progress: bool = True) -> dict:
        """Train until the budget is reached; returns the last validation entry."""
        if self.budget_reached():
            return {}
        self.write_config()
        last_valid: dict = {}
        window_stats: list[dict] = []
        window_start, window_tokens = time.perf_counter(), 0
        bar = tqdm(
            total=self.total_steps(),
            initial=self.step,
            desc=self.run_dir.name,
            unit="step",
            disable=not progress or not self.ranks.is_main,
            dynamic_ncols=True,
        )
        try:
            while not self.budget_reached():
                step_start = time.perf_counter()
                stats = self.train_step()
                self.elapsed += time.perf_counter() - step_start
                if self.config.max_seconds is not None:
                    self.elapsed = self.ranks.broadcast_float(self.elapsed)  # all stop together
                window_stats.append(stats)
                window_tokens += self.config.tokens_per_step
                if self.step % self.config.log_every == 0 or self.budget_reached():
                    seconds = time.perf_counter() - window_start
                    entry = {"kind": "train", "step": self.step, "tokens": self.tokens}
                    for key in window_stats[0]:
                        entry[key] = sum(s[key] for s in window_stats) / len(window_stats)
                    ppl_name = "sampled_ppl" if self.softmax_is_sampled else "ppl"
                    entry[ppl_name] = math.exp(min(entry["loss"], 50.0))
                    entry["lr"] = self.schedule.get_last_lr()[0]
                    entry["tokens_per_s"] = window_tokens / max(seconds, 1e-9)
                    entry["elapsed"] = round(self.elapsed, 3)
                    self.log(entry)
                    bar.set_postfix(
                        loss=f"{entry['loss']:.3f}", tok_s=f"{entry['tokens_per_s']:.0f}"
                    )
                    window_stats, window_start, window_tokens = [], time.perf_counter(), 0
                if self.step % self.config.eval_every == 0:
                    last_valid = self.validate() or last_valid
                    window_start = time.perf_counter()  # tokens/s counts training only
                if self.step % self.config.checkpoint_every == 0:
                    self.save()
                    window_start = time.perf_counter()
                bar.update(1)
        finally:
            bar.close()
        if self.step % self.config.eval_every:
            last_valid = self.validate() or last_valid
        if self.step % self.config.checkpoint_every:  # else the loop has just saved it
            self.save()
        return last_valid


# ----------------------------------------------------------------------------- command line


def build_trainer(args: argparse.Namespace, overrides: dict[str, str]) -> Trainer:
    run_dir: Path = args.run
    model_fields = set(LMConfig.__dataclass_fields__)
    model_overrides = {k: v for k, v in overrides.items() if k.replace("-", "_") in model_fields}
    train_overrides = {k: v for k, v in overrides.items() if k not in model_overrides}
    if args.resume:
        config_path = run_dir / "config.json"
        if not (run_dir / "checkpoint.pt").is_file() or not config_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint in {run_dir}")
        saved = json.loads(config_path.read_text())
        if model_overrides:
            raise ValueError(
                f"--resume keeps the run's model; drop {sorted(model_overrides)} or start a new run"
            )
        model_config = config_from_dict(LMConfig, saved["model"])
        train_config = apply_overrides(
            config_from_dict(TrainConfig, saved["train"]), train_overrides
        )
        data_dir = args.data or Path(saved["data"]["path"])
        return _start(run_dir, model_config, train_config, data_dir, saved.get("preset"), True)
    if (run_dir / "checkpoint.pt").exists():
        raise FileExistsError(
            f"{run_dir} already holds a checkpoint: pass --resume to continue it, or choose "
            "another --run"
        )
    if args.data is None:
        raise ValueError("--data DIR (a folder prepared by data_prep) is required")
    meta = read_meta(args.data)
    model_config = get_preset(args.preset) if args.preset else LMConfig()
    model_config = apply_overrides(
        model_config, {"vocab_size": str(meta["vocab"]["size"]), **model_overrides}
    )
    train_config = apply_overrides(TrainConfig(), train_overrides)
    if (
        train_config.max_steps is None
        and train_config.max_tokens is None
        and train_config.max_seconds is None
    ):
        raise ValueError("set a budget: --max_steps=N, --max_tokens=N or --max_seconds=S")
    return _start(run_dir, model_config, train_config, args.data, args.preset, False)


def _start(
    run_dir: Path,
    model_config: LMConfig,
    train_config: TrainConfig,
    data_dir: Path,
    preset: str | None,
    resume: bool,
) -> Trainer:
    """Join the other ranks (when torchrun started several) and build the trainer."""
    ranks = Distributed.from_env(
        resolve_device(train_config.device),
        train_config.dist_timeout,
        train_config.checkpoint_timeout,
    )
    try:
        trainer = Trainer(run_dir, model_config, train_config, data_dir, preset, ranks)
        if resume:
            trainer.restore()
        else:
            trainer.start_fresh()
    except BaseException:
        ranks.close()
        raise
    return trainer


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--"]:  # `torchrun -m lstm_moe.train -- ARGS` (some Pythons keep the --)
        argv = argv[1:]
    parser = argparse.ArgumentParser(
        prog="python -m lstm_moe.train",
        description=__doc__.split("\n\n")[0],
        epilog="Model fields: "
        + ", ".join(LMConfig.__dataclass_fields__)
        + ". Training fields: "
        + ", ".join(TrainConfig.__dataclass_fields__)
        + ". Set any of them with --field=value.",
    )
    parser.add_argument("--data", type=Path, help="dataset folder (data_prep output)")
    parser.add_argument("--run", type=Path, required=True, help="run folder, e.g. runs/moe32")
    parser.add_argument("--preset", help="a Table 7 preset (python -m lstm_moe.presets)")
    parser.add_argument("--resume", action="store_true", help="continue the run's checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args, unknown = parser.parse_known_args(argv)
    rest, overrides = split_overrides(unknown)
    if rest:
        parser.error(
            f"unrecognized arguments {rest} (model and training fields take --field=value)"
        )
    try:
        trainer = build_trainer(args, overrides)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    model, ranks = trainer.model, trainer.ranks
    ranks.print(
        f"{args.run}: {model.ops_per_timestep() / 1e6:.2f}M ops/timestep, "
        f"{model.params_excluding_embedding_softmax() / 1e6:.2f}M params excl. embedding and "
        f"softmax, {model.total_params() / 1e6:.1f}M total, on {trainer.device}"
        + (f", {ranks.world_size} ranks" if ranks.world_size > 1 else "")
        + (f", resuming at step {trainer.step}" if args.resume else ""),
        file=sys.stderr,
    )
    try:
        last = trainer.fit(progress=not args.quiet)
    except RuntimeError as error:
        if ranks.world_size == 1 or isinstance(error, torch.OutOfMemoryError):
            raise  # this rank's own failure, not a peer's
        # A collective raised (a peer closed its connection) or timed out (a peer hangs).
        # The group cannot be shut down cleanly with a rank missing; the process exit frees it.
        fail(ranks, error)
        return 1
    ranks.close()
    if last:
        ranks.print(
            f"valid perplexity {last['valid_ppl']:.2f} after {trainer.tokens} tokens",
            file=sys.stderr,
        )
    ranks.print(f"wrote {args.run}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
