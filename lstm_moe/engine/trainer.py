"""The task-agnostic trainer: budgets, schedule, gradient accumulation, logging, validation
cadence, atomic checkpoints, exact resume, and data + expert parallelism over the ranks of a
ParallelGroup (lstm_moe.moe.parallel; lstm_moe.engine.ranks joins torchrun's ranks and
reduces the gradients).

Optimisation follows App. C.1: Adam; the learning rate rises linearly for `warmup_steps` and
then falls ∝ 1/√step; the weighted balancing losses are added to the loss. A step runs its
micro-batches one after another and sums their gradients; the task loss of each is its sum
over real target tokens divided by the real targets of the whole step on all ranks, so ranks
may hold different numbers of targets and M micro-batches make the update of one batch M
times as large. A resumed run continues exactly: its losses equal those of a run that was
never interrupted.

Host synchronisation: each step reads only host values (token counts, the clock); the losses
and statistics stay on the device and are read once per log interval.

The run folder holds config.json, metrics.jsonl (one JSON object per log interval, "kind":
"train", and per validation, "kind": "valid") and the checkpoint (engine.checkpoint).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from lstm_moe.engine.checkpoint import (
    load_optimizer_state_by_name,
    load_run_checkpoint,
    optimizer_state_by_name,
    remove_stale_shards,
    rng_state,
    save_checkpoint,
    set_rng_state,
    shard_path,
)
from lstm_moe.engine.config import RESUMABLE_FIELDS, TrainConfig
from lstm_moe.engine.ranks import (
    clip_global_grad_norm,
    rank_seed,
    split_parameters,
    sum_replicated_grads,
)
from lstm_moe.engine.task import Task, parameters_of
from lstm_moe.fields import config_to_dict
from lstm_moe.files import write_json_atomic, write_text_atomic
from lstm_moe.moe.parallel import ParallelGroup, expert_tensor_names
from lstm_moe.runtime import resolve_device


def learning_rate_factor(step: int, warmup_steps: int) -> float:
    """Multiplier of the peak rate after `step` updates: linear warm-up, then ∝ 1/√step."""
    step = max(step, 1)
    if warmup_steps == 0:
        return 1.0 / math.sqrt(step)
    return min(step / warmup_steps, math.sqrt(warmup_steps / step))


def autocast_dtype_for(device: torch.device, bf16: bool) -> torch.dtype | None:
    # bf16 matrix products are very slow on CPUs without AMX; float32 there.
    return torch.bfloat16 if bf16 and device.type == "cuda" else None


def adam(params: list[Tensor], lr: float, betas: tuple[float, float]) -> torch.optim.Adam:
    """Adam as every training loop here runs it: the fused kernel (one pass over each tensor
    instead of about eight; on a 2-core CPU 15 ms against 77 ms per step for 17M parameters,
    which a MoE model's experts soon reach: Adam updates every expert at every step)."""
    return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)


class LogWindow:
    """Sums of one log interval, kept on the device: read (one host sync, one reduction over
    ranks) only when the interval is logged."""

    def __init__(self) -> None:
        self.loss_sum: Tensor | None = None  # this rank's summed task loss
        self.sums: dict[str, Tensor] = {}  # aux_loss, grad_norm and the task's stats
        self.counts: dict[str, int] = {}
        self.targets = 0  # real targets of all ranks
        self.start = time.perf_counter()

    def add(self, name: str, value: Tensor) -> None:
        value = value.detach().float()
        self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.counts[name] = self.counts.get(name, 0) + 1

    def add_loss(self, loss_sum: Tensor) -> None:
        loss_sum = loss_sum.detach().double()
        self.loss_sum = loss_sum if self.loss_sum is None else self.loss_sum + loss_sum

    def state_dict(self, group: ParallelGroup) -> dict:
        """The interval so far, for a checkpoint taken inside it (a run that stops off the
        log grid): its sums, on the CPU, and the summed loss of all ranks. Every rank calls
        it together."""
        loss = None
        if self.loss_sum is not None:
            loss = float(group.sum(self.loss_sum.reshape(1))[0])
        return {
            "sums": {name: value.cpu() for name, value in self.sums.items()},
            "counts": dict(self.counts),
            "loss_sum": loss,
            "targets": self.targets,
        }

    def load_state_dict(self, state: dict, device: torch.device, is_main: bool) -> None:
        """Continue a saved interval; the summed loss of all ranks goes to rank 0 (read sums
        over ranks)."""
        self.sums = {name: value.to(device) for name, value in state["sums"].items()}
        self.counts = dict(state["counts"])
        self.targets = state["targets"]
        if state["loss_sum"] is not None:
            value = state["loss_sum"] if is_main else 0.0
            self.loss_sum = torch.tensor(value, dtype=torch.float64, device=device)

    def read(self, group: ParallelGroup) -> dict[str, float]:
        """Means over the interval: the loss per real target of all ranks, each statistic
        over the micro-batches (steps for the gradient norm)."""
        names = list(self.sums)
        values = torch.stack([self.sums[n].double() for n in names] + [self.loss_sum])
        total_loss = group.sum(values[-1:])  # the one collective of the interval
        values = torch.cat([values[:-1], total_loss]).tolist()  # the one host sync
        out = {"loss": values[-1] / max(self.targets, 1)}
        out.update({n: v / self.counts[n] for n, v in zip(names, values[:-1], strict=False)})
        return out


class Trainer:
    """Trains `task`'s model in `run_dir` with `config`, on the ranks of `group`."""

    def __init__(
        self,
        run_dir: Path,
        task: Task,
        config: TrainConfig,
        group: ParallelGroup | None = None,
        preset: str | None = None,
    ):
        self.group = ParallelGroup() if group is None else group
        self.run_dir, self.task, self.config, self.preset = Path(run_dir), task, config, preset
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = self.group.device(resolve_device(config.device))
        self.autocast_dtype = autocast_dtype_for(self.device, config.bf16)
        torch.manual_seed(config.seed)
        # Every rank draws the model from the same seed: the replicated parts whole, the
        # experts only its own shard, as one process draws them (BatchedExperts).
        self.model = task.build_model().to(self.device)
        if self.group.rank > 0:
            torch.manual_seed(rank_seed(config.seed, self.group.rank))
        self.replicated, self.expert_params = split_parameters(self.model)
        self.expert_names = expert_tensor_names(self.model)
        self.optimizer = adam(
            [p for _, p in parameters_of(self.model)],
            lr=config.lr,
            betas=(config.adam_beta1, config.adam_beta2),
        )
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: learning_rate_factor(step + 1, config.warmup_steps)
        )
        self.step = 0
        self.tokens = 0
        self.elapsed = 0.0
        self.window = LogWindow()  # the log interval under way

    # ------------------------------------------------------------------ files

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    def run_config(self) -> dict:
        return {
            "task": self.task.name,
            "preset": self.preset,
            "model": config_to_dict(self.task.model_config),
            "task_config": config_to_dict(self.task.config),
            "train": config_to_dict(self.config),
            **self.task.record(self.model),
        }

    def write_config(self) -> None:
        if not self.group.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.run_dir / "config.json", self.run_config())

    def save(self) -> None:
        """checkpoint.pt; on W > 1 ranks, rank 0 writes the replicated state in it after every
        rank has written its expert shard (engine.checkpoint)."""
        group = self.group
        model = self.model.state_dict()
        optimizer = optimizer_state_by_name(self.optimizer, self.model)
        payload = {
            "task": self.task.name,
            "model_config": config_to_dict(self.task.model_config),
            "task_config": config_to_dict(self.task.config),
            "train_config": config_to_dict(self.config),
            "task_record": self.task.record(self.model),
            "model": model,
            "optimizer": optimizer,
            "schedule": self.schedule.state_dict(),
            "rng": rng_state(self.device),
            "task_state": self.task.state_dict(),
            "step": self.step,
            "tokens": self.tokens,
            "elapsed": self.elapsed,
            "expert_tensors": sorted(self.expert_names),
            "log_window": self.window.state_dict(group),
        }
        if group.world_size == 1:
            save_checkpoint(self.checkpoint_path, payload)
            remove_stale_shards(self.run_dir, keep=set())
            return
        experts = self.expert_names
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_checkpoint(
            shard_path(self.run_dir, self.step, group.rank, group.world_size),
            {
                "step": self.step,
                "rank": group.rank,
                "world_size": group.world_size,
                "model": {k: v for k, v in model.items() if k in experts},
                "optimizer_state": {k: v for k, v in optimizer["state"].items() if k in experts},
                "rng": payload["rng"],
            },
        )
        group.barrier_for_io()  # every shard is on disk before checkpoint.pt names them
        if group.is_main:
            payload["model"] = {k: v for k, v in model.items() if k not in experts}
            payload["optimizer"] = {
                "state": {k: v for k, v in optimizer["state"].items() if k not in experts},
                "param_groups": optimizer["param_groups"],
            }
            payload["expert_shards"] = group.world_size
            save_checkpoint(self.checkpoint_path, payload)
            keep = {
                shard_path(self.run_dir, self.step, r, group.world_size)
                for r in range(group.world_size)
            }
            remove_stale_shards(self.run_dir, keep)
        group.barrier_for_io()  # no rank writes the next shards while old ones are removed

    def restore(self) -> None:
        """Continue the run's checkpoint: refuse one trained with another model, task, data
        or schedule. On W ranks each rank reads only its own experts (from any number of
        saved shards)."""
        group = self.group
        # Loaded to the CPU: RNG states must stay there; load_state_dict copies.
        ckpt = load_run_checkpoint(
            self.run_dir,
            map_location="cpu",
            group=group if group.world_size > 1 else None,
            expert_names=self.expert_names,
        )
        source = self.checkpoint_path
        if ckpt["task"] != self.task.name:
            raise ValueError(f"{source} is a {ckpt['task']!r} run, not {self.task.name!r}")
        if ckpt["model_config"] != config_to_dict(self.task.model_config):
            raise ValueError(
                f"{source} was trained with a different model config; resume with the run's "
                "own config.json"
            )
        for what, saved, now, resumable in (
            ("task", ckpt["task_config"], self.task.config, self.task.resumable_fields),
            ("training", ckpt["train_config"], self.config, RESUMABLE_FIELDS),
        ):
            changed = sorted(
                name
                for name, value in config_to_dict(now).items()
                if name not in resumable and saved.get(name) != value
            )
            if changed:
                raise ValueError(
                    f"--resume cannot change the {what} fields {changed}: they decide which "
                    f"tokens and updates come next; only {sorted(resumable)} may change"
                )
        self.task.check_resume(ckpt["task_record"], str(source))
        self.model.load_state_dict(ckpt["model"])  # this rank's experts
        load_optimizer_state_by_name(self.optimizer, self.model, ckpt["optimizer"], source)
        # Adam keeps tensors that are already on the right device and dtype as they are: copy
        # them out of the memory-mapped file, which the next save replaces.
        for moments in self.optimizer.state.values():
            for key, value in moments.items():
                if isinstance(value, Tensor):
                    moments[key] = value.clone()
        self.schedule.load_state_dict(ckpt["schedule"])
        rank = group.rank
        if ckpt.get("expert_shards", 1) == group.world_size:
            set_rng_state(ckpt["rngs"][rank], self.device)
        elif rank == 0:
            set_rng_state(ckpt["rng"], self.device)
        else:  # another number of ranks: a fresh stream of this rank's own
            torch.manual_seed(rank_seed(self.config.seed + ckpt["step"], rank))
        self.task.load_state_dict(ckpt["task_state"])
        self.step, self.tokens, self.elapsed = ckpt["step"], ckpt["tokens"], ckpt["elapsed"]
        if ckpt.get("log_window"):
            self.window.load_state_dict(ckpt["log_window"], self.device, group.is_main)
        self._check_ranks_resumed_alike()
        self._truncate_metrics(self.step)

    def _check_ranks_resumed_alike(self) -> None:
        """Every rank must have read the same checkpoint: a run folder that is not shared by
        all machines (a stale copy on one) would otherwise train replicas that drift apart."""
        group = self.group
        n_differ = group.count_differing_from_main((float(self.step), float(self.tokens)))
        if n_differ:
            raise ValueError(
                f"{n_differ} of {group.world_size} ranks resumed another checkpoint than rank 0; "
                f"every rank must see the same run folder {self.run_dir}"
            )

    def _truncate_metrics(self, step: int) -> None:
        """Drop metrics logged after the checkpoint, so a resumed log has no duplicates, and
        the entries a run that stopped off the grid wrote at its last step (a partial log
        interval, restored from the checkpoint and logged whole later; a validation at a
        step an uninterrupted run does not validate at): the resumed log is the log of an
        uninterrupted run."""
        path = self.run_dir / "metrics.jsonl"
        if not self.group.is_main or not path.exists():
            return
        every = {"train": self.config.log_every, "valid": self.config.eval_every}
        kept = []
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            at = entry.get("step", 0)
            if at < step or (at == step and at % every.get(entry.get("kind"), 1) == 0):
                kept.append(line)
        write_text_atomic(path, "".join(line + "\n" for line in kept))

    def start_fresh(self) -> None:
        """A new run: remove what an earlier attempt killed before its first checkpoint left."""
        if not self.group.is_main:
            return
        remove_stale_shards(self.run_dir, keep=set())
        for name in ("metrics.jsonl", "checkpoint.pt.tmp"):
            (self.run_dir / name).unlink(missing_ok=True)
        for stale in self.run_dir.glob("eval/*.json"):
            stale.unlink()

    def log(self, entry: dict) -> None:
        if not self.group.is_main:
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
            steps = self.task.progress_total(c.max_tokens)
            if steps is not None:
                totals.append(steps)
        return min(totals) if totals else None

    def train_step(self, window: LogWindow) -> None:
        """One update: every micro-batch of the step, then the reduction, clipping and Adam."""
        group, n_micro = self.group, self.config.micro_batches
        batches = [self.task.train_batch(self.step, m, n_micro) for m in range(n_micro)]
        local_targets = sum(self.task.count_targets(b) for b in batches)
        (global_targets,) = group.sum_host([float(local_targets)])
        if global_targets <= 0:
            raise ValueError(f"step {self.step + 1} has no real target tokens on any rank")
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        for micro, batch in enumerate(batches):
            with torch.autocast(
                self.device.type, self.autocast_dtype, enabled=self.autocast_dtype is not None
            ):
                out = self.task.forward(self.model, batch, self.step, micro, self.device)
            # Σ over ranks and micro-batches is the one-process loss of the whole step: the
            # mean task loss per real target plus the mean of the micro-batches' aux losses
            # (each already that of the batch of all ranks, on every rank).
            loss = out.loss_sum / global_targets + out.aux_loss / (group.world_size * n_micro)
            loss.backward()
            window.add_loss(out.loss_sum if out.reported_sum is None else out.reported_sum)
            window.add("aux_loss", out.aux_loss)
            for name, value in out.stats.items():
                window.add(name, value)
        if group.world_size == 1:
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for _, p in parameters_of(self.model)], self.config.grad_clip
            )
        else:
            for p in self.expert_params:  # a shard no token reached: zeros, as in one process
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            sum_replicated_grads(self.replicated, group)
            grad_norm = clip_global_grad_norm(
                self.replicated, self.expert_params, self.config.grad_clip, group
            )
        self.optimizer.step()
        self.schedule.step()
        window.add("grad_norm", grad_norm)
        window.targets += int(global_targets)
        self.step += 1
        self.tokens += int(global_targets)

    def validate(self) -> dict:
        rng = rng_state(self.device)  # validation must not change the training's random stream
        metrics = self.task.validate(self.model, self.device)
        set_rng_state(rng, self.device)
        if not metrics:
            return {}
        entry = {
            "kind": "valid",
            "step": self.step,
            "tokens": self.tokens,
            "elapsed": round(self.elapsed, 3),
            **metrics,
        }
        self.log(entry)
        return entry

    def fit(self, progress: bool = True) -> dict:
        """Train until the budget is reached; returns the last validation entry."""
        if self.budget_reached():
            return {}
        self.write_config()
        last_valid: dict = {}
        self.window.start = time.perf_counter()
        bar = tqdm(
            total=self.total_steps(),
            initial=self.step,
            desc=self.run_dir.name,
            unit="step",
            disable=not progress or not self.group.is_main,
            dynamic_ncols=True,
        )
        try:
            while not self.budget_reached():
                step_start = time.perf_counter()
                self.train_step(self.window)
                self.elapsed += time.perf_counter() - step_start
                if self.config.max_seconds is not None:
                    self.elapsed = self.group.broadcast_float(self.elapsed)  # all stop together
                on_grid = self.step % self.config.log_every == 0
                if on_grid or self.budget_reached():
                    self._log_window(self.window, bar)
                    if on_grid:  # off the grid (the last step) it is saved and continued
                        self.window = LogWindow()
                if self.step % self.config.eval_every == 0:
                    last_valid = self.validate() or last_valid
                    self.window.start = time.perf_counter()  # tokens/s counts training only
                if self.step % self.config.checkpoint_every == 0:
                    self.save()
                    self.window.start = time.perf_counter()
                bar.update(1)
        finally:
            bar.close()
        if self.step % self.config.eval_every:
            last_valid = self.validate() or last_valid
        if self.step % self.config.checkpoint_every:  # else the loop has just saved it
            self.save()
        return last_valid

    def _log_window(self, window: LogWindow, bar: tqdm) -> None:
        seconds = time.perf_counter() - window.start
        means = window.read(self.group)
        entry = {"kind": "train", "step": self.step, "tokens": self.tokens}
        entry.update(means)
        entry.update(self.task.loss_metrics(means["loss"]))
        entry["lr"] = self.schedule.get_last_lr()[0]
        entry["tokens_per_s"] = window.targets / max(seconds, 1e-9)
        entry["elapsed"] = round(self.elapsed, 3)
        self.log(entry)
        bar.set_postfix(loss=f"{entry['loss']:.3f}", tok_s=f"{entry['tokens_per_s']:.0f}")


__all__ = ["LogWindow", "Trainer", "autocast_dtype_for", "learning_rate_factor"]
