"""The training engine's configuration: what every task trains with (App. C.1's optimiser and
schedule, budgets, cadences, devices, ranks). What a batch holds is the task's own config."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainConfig:
    """Budgets: training stops at the first of max_steps / max_tokens / max_seconds that is set
    (at least one must be); tokens are the real target tokens trained on, over all ranks.

    lr: the peak learning rate, reached at the end of the linear warm-up (warmup_steps, 1000
        in the paper), after which it falls ∝ 1/√step. Adam with adam_beta1, adam_beta2.
    grad_clip: the global gradient norm is clipped to this (experts on every rank included).
    micro_batches: each step's batch is run as this many micro-batches, one after another,
        their gradients summed before the update: the same update as one batch of the whole
        size (the balancing losses are computed per micro-batch), with the memory of one
        micro-batch. The task's batch size must divide by it (and by the ranks).
    eval_every: steps between validations; checkpoint_every: steps between checkpoints;
        log_every: steps averaged into each metrics.jsonl entry.
    seed: model initialisation and every random draw of the run.
    device: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N".
    bf16: on CUDA, run under bf16 autocast (the routers stay in float32).
    threads: CPU threads (None: PyTorch's default).
    dist_timeout: seconds a rank waits in a collective (on W > 1 ranks) before it gives up
        with an error: a rank that died or hangs stops the others instead of blocking them.
    checkpoint_timeout: the same for the waits around writing a checkpoint, which last as
        long as the slowest rank's disk (gigabytes at the paper's sizes).
    """

    lr: float = 1e-3
    warmup_steps: int = 1000
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0
    micro_batches: int = 1
    max_steps: int | None = None
    max_tokens: int | None = None
    max_seconds: float | None = None
    eval_every: int = 500
    checkpoint_every: int = 200
    log_every: int = 10
    seed: int = 1
    device: str = "auto"
    bf16: bool = True
    threads: int | None = None
    dist_timeout: float = 60.0
    checkpoint_timeout: float = 1800.0

    def __post_init__(self) -> None:
        for name in ("micro_batches", "eval_every", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "max_tokens", "max_seconds"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 (or unset), got {getattr(self, name)}")
        if self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip}")
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
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 (or unset), got {self.threads}")

    @property
    def has_budget(self) -> bool:
        return any(v is not None for v in (self.max_steps, self.max_tokens, self.max_seconds))


# What `--resume` may change: when and how long to train, and where. Everything else (the
# schedule, the seed, the split into micro-batches) decides which updates come next, and is
# fixed by the run.
RESUMABLE_FIELDS = frozenset(
    {
        "max_steps",
        "max_tokens",
        "max_seconds",
        "eval_every",
        "checkpoint_every",
        "log_every",
        "device",
        "bf16",
        "threads",
        "dist_timeout",
        "checkpoint_timeout",
    }
)
