"""The grid of `make compare`: which runs it trains, and with what arguments.

A run is one point of the grid's axes: task (lm, translation), backbone (lstm, transformer),
router (dense, or one of ROUTERS), number of experts and seed. Every sparse run spends the
dense run's active FLOPs per token on its experts, matched by expert width:

    expert_hidden = total_hidden / experts_per_token

so top-1 gets one expert of the dense width, top-2 two of half of it and the 2017 top-4 four
of a quarter (Switch §2.1 and Fig. 4 hold FLOPs per token fixed the same way; the 2017
paper's Table 7 holds ops/timestep fixed with k = 4 experts of 1024 against 4 LSTMs of 512).
Expert choice fills c = 2 slots per token on average, so its experts are half as wide. The
number of experts then changes parameters only: MoE-4, MoE-32 and MoE-256 of the same width
(Table 7's series). The routers' gating products, small beside the experts, are not matched:
the report prints every run's measured ops per timestep.

Every run of a task trains on the same data for the same number of target tokens (budget
"tokens"), or for the same training seconds (budget "time": tokens then differ, and the
report says so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

DENSE = "dense"


@dataclass(frozen=True)
class RouterSpec:
    """One router of the comparison: its MoEConfig fields and how many experts a token uses.

    label: the name on the command line (ROUTERS=) and in the report.
    experts_per_token: expert slots a token fills, what the expert width is divided by.
    fields: MoEConfig fields set on the backbone's sparse preset, as --field=value.
    sees_whole_batch: the router ranks the whole batch's tokens for each expert, so a causal
        layer would see later tokens through it (Zhou et al. 2022, §6): such a router runs
        only where the backbone has a layout without a causal MoE layer (Backbone.ec_preset).
    """

    label: str
    experts_per_token: int
    fields: tuple[tuple[str, str], ...]
    description: str
    sees_whole_batch: bool = False


# Switch evaluates with capacity factor 2.0 whatever it trained with (ST-MoE §3.4 trains at
# 1.25 and evaluates at 2.0): fewer test tokens are dropped when nothing learns from drops.
ROUTERS: dict[str, RouterSpec] = {
    spec.label: spec
    for spec in (
        RouterSpec(
            "top1-cf1.0",
            1,
            (("router", "switch"), ("k", "1"), ("capacity_factor", "1.0")),
            "Switch top-1, capacity factor 1.0 (2.0 in evaluation)",
        ),
        RouterSpec(
            "top1-cf1.25",
            1,
            (("router", "switch"), ("k", "1"), ("capacity_factor", "1.25")),
            "Switch top-1, capacity factor 1.25 (2.0 in evaluation)",
        ),
        RouterSpec(
            "top2",
            2,
            (("router", "switch"), ("k", "2"), ("capacity_factor", "1.25")),
            "top-2 (GShard: renormalised gates, second choices after every first), "
            "capacity factor 1.25 (2.0 in evaluation)",
        ),
        RouterSpec(
            "top4",
            4,
            (
                ("router", "noisy_topk"),
                ("k", "4"),
                ("capacity_factor", "none"),
                ("eval_capacity_factor", "none"),
            ),
            "the 2017 noisy top-4 with the importance and load losses, dropless",
        ),
        RouterSpec(
            "ec",
            2,
            (("router", "expert_choice"), ("capacity_factor", "2.0")),
            "expert choice, c = 2 (each expert takes its top 2T/E tokens)",
            sees_whole_batch=True,
        ),
    )
}
_EVAL_CAPACITY = (("eval_capacity_factor", "2.0"),)


@dataclass(frozen=True)
class Backbone:
    """How one (task, architecture) is trained in the comparison.

    dense_preset / sparse_preset: the compute-matched pair of presets (sparse_preset gives
    the MoE layout; its router fields are replaced per run). ec_preset: a layout where expert
    choice sees no later token, or None with the reason in ec_absent.
    total_hidden: the hidden units the dense model's feed-forward (or, for the LSTM LM, the
    two LSTMs the MoE replaces) spend per token, which the experts of each run share.
    train: arguments every run of the backbone takes; dense: the dense run's own.
    tokens_per_step: about how many target tokens a step trains on (sets the cadences only).
    """

    task: str
    arch: str
    dense_preset: str
    sparse_preset: str
    total_hidden: int
    train: tuple[str, ...]
    dense: tuple[str, ...] = ()
    sparse: tuple[str, ...] = ()
    ec_preset: str | None = None
    ec_absent: str = ""
    tokens_per_step: int = 640


# Workstation widths (those of `make demo`): d_model 64; the LSTM LM's four 64-cell LSTMs
# against two around the experts (4 × 128 = 512 hidden units per token at k = 4), the
# Transformers' 256-wide feed-forward against experts sharing 256.
_LM_COMMON = ("--softmax=full", "--dropout=0.0", "--batch_size=32", "--lr=0.003")
_NMT_COMMON = ("--task=translation", "--dropout=0.1", "--batch_size=64", "--lr=0.003")
BACKBONES: dict[tuple[str, str], Backbone] = {
    (b.task, b.arch): b
    for b in (
        Backbone(
            "lm",
            "lstm",
            "4xLSTM-512",
            "MoE-32",
            512,
            ("--d_model=64", "--lstm_hidden=64", "--bptt=20", *_LM_COMMON),
            ec_absent="the LSTM language model is causal: expert choice would rank later "
            "tokens of the batch",
        ),
        Backbone(
            "lm",
            "transformer",
            "transformer-dense",
            "switch-32",
            256,
            ("--d_model=64", "--n_heads=2", "--ffn_hidden=256", "--bptt=32", *_LM_COMMON),
            tokens_per_step=32 * 32,
            ec_absent="a decoder-only language model is causal: expert choice would rank "
            "later tokens of the batch",
        ),
        Backbone(
            "translation",
            "lstm",
            "NMT-dense",
            "NMT-MoE-32",
            512,
            ("--d_model=64", "--lstm_hidden=64", "--attention_hidden=64", *_NMT_COMMON),
            dense=("--ffn_hidden=512",),
            tokens_per_step=64 * 16,
            ec_absent="the LSTM translation model's encoder and (causal) decoder share one "
            "MoE config, and expert choice would rank later target tokens in the decoder",
        ),
        Backbone(
            "translation",
            "transformer",
            "NMT-transformer-dense",
            "NMT-switch-32",
            256,
            ("--d_model=64", "--n_heads=2", "--ffn_hidden=256", *_NMT_COMMON),
            ec_preset="NMT-ec-32",
            tokens_per_step=64 * 16,
        ),
    )
}
TASKS = ("lm", "translation")
ARCHS = ("lstm", "transformer")


def expert_hidden(backbone: Backbone, router: RouterSpec) -> int:
    """The expert width that gives a token the dense model's active hidden units."""
    if backbone.total_hidden % router.experts_per_token:
        raise ValueError(
            f"{backbone.total_hidden} hidden units cannot be shared by "
            f"{router.experts_per_token} experts per token ({router.label})"
        )
    return backbone.total_hidden // router.experts_per_token


def active_hidden(router_label: str, hidden: int) -> int:
    """Hidden units a token is computed by: experts per token × expert width."""
    return ROUTERS[router_label].experts_per_token * hidden


@dataclass(frozen=True)
class GridConfig:
    """The comparison's axes and budget.

    routers: DENSE and labels of ROUTERS, each at main_experts experts.
    experts / expert_routers / expert_tasks: the experts axis (MoE-4, MoE-32, MoE-256 at one
        expert width): these routers also run at every E of `experts`, for these tasks.
    seeds: every run once per seed (the seed of initialisation and of every draw).
    budget: "tokens" (every run trains lm_tokens / translation_tokens target tokens) or "time"
        (every run trains `seconds` of training steps).
    data: task -> prepared folder (data_prep output).
    nproc: ranks per run (torchrun above 1: experts sharded, the rest data-parallel).
    eval_tokens / eval_pairs: the test split's share every run is scored on (the whole split
        when None); bleu_sentences: sentences translated for BLEU (beam search); valid_points:
        validations along training, the learning curves' points.
    experts_tokens: test tokens eval.experts reads for each sparse run (what its experts
        learned; None for none).
    distill: also train the dense model distilled from the distill_teacher run at
        main_experts (Switch §4.2: switch.distill), on the same tokens, one per backbone and
        seed.
    """

    tasks: tuple[str, ...] = TASKS
    archs: tuple[str, ...] = ARCHS
    routers: tuple[str, ...] = (DENSE, "top1-cf1.0", "top1-cf1.25", "top2", "top4", "ec")
    main_experts: int = 32
    experts: tuple[int, ...] = (4, 32, 256)
    expert_routers: tuple[str, ...] = ("top1-cf1.25", "top4")
    expert_tasks: tuple[str, ...] = ("lm",)
    seeds: tuple[int, ...] = (1,)
    budget: str = "tokens"
    lm_tokens: int = 600_000
    translation_tokens: int = 400_000
    seconds: float = 20.0
    data: dict[str, str] = field(default_factory=dict)
    nproc: int = 1
    eval_tokens: int | None = 10_000
    eval_pairs: int | None = 200
    bleu_sentences: int | None = 100
    valid_points: int = 4
    valid_tokens: int = 4_000
    experts_tokens: int | None = 5_000
    distill: bool = False
    distill_teacher: str = "top1-cf1.25"
    extra_train_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, allowed in (("tasks", TASKS), ("archs", ARCHS), ("expert_tasks", TASKS)):
            unknown = [v for v in getattr(self, name) if v not in allowed]
            if unknown:
                raise ValueError(f"unknown {name} {unknown}: choose from {list(allowed)}")
        labels = (DENSE, *ROUTERS)
        for name in ("routers", "expert_routers"):
            unknown = [v for v in getattr(self, name) if v not in labels]
            if unknown:
                raise ValueError(f"unknown router {unknown[0]!r} in {name}: choose from {labels}")
        if self.distill and self.distill_teacher not in self.routers:
            raise ValueError(
                f"distill needs its teacher {self.distill_teacher!r} among the routers"
            )
        if self.distill and DENSE not in self.routers:
            raise ValueError("distill needs the dense run (the distilled student's baseline)")
        if self.budget not in ("tokens", "time"):
            raise ValueError(f"budget must be 'tokens' or 'time', got {self.budget!r}")
        if not self.seeds:
            raise ValueError("seeds: give at least one")
        if self.nproc < 1 or self.main_experts < 1 or min(self.experts, default=1) < 1:
            raise ValueError("nproc and the numbers of experts must be >= 1")

    def tokens(self, task: str) -> int:
        return self.lm_tokens if task == "lm" else self.translation_tokens


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid. router is DENSE or a label of ROUTERS; n_experts 0 for dense.
    teacher: for a dense student distilled from the run of that router (at n_experts)."""

    task: str
    arch: str
    router: str
    n_experts: int
    seed: int
    teacher: str | None = None

    @property
    def name(self) -> str:
        if self.teacher is not None:
            source = f"{self.teacher}-e{self.n_experts}"
            return f"{self.task}-{self.arch}-dense-from-{source}-s{self.seed}"
        experts = "" if self.router == DENSE else f"-e{self.n_experts}"
        return f"{self.task}-{self.arch}-{self.router}{experts}-s{self.seed}"

    def teacher_spec(self) -> RunSpec | None:
        if self.teacher is None:
            return None
        return RunSpec(self.task, self.arch, self.teacher, self.n_experts, self.seed)

    @property
    def setting(self) -> tuple[str, str]:
        """The (task, arch) group the run is compared within."""
        return self.task, self.arch

    @property
    def label(self) -> str:
        """The run without its seed: what seeds are averaged over."""
        return run_label(self.router, self.n_experts, self.teacher)

    def preset(self) -> str:
        backbone = BACKBONES[self.setting]
        if self.router == DENSE:
            return backbone.dense_preset
        if ROUTERS[self.router].sees_whole_batch:
            return backbone.ec_preset
        return backbone.sparse_preset

    def expert_hidden(self) -> int | None:
        if self.router == DENSE:
            return None
        return expert_hidden(BACKBONES[self.setting], ROUTERS[self.router])

    def model_args(self) -> list[str]:
        """The preset and the overrides that make this run's model."""
        backbone = BACKBONES[self.setting]
        args = [f"--preset={self.preset()}", *backbone.train]
        if self.router == DENSE:
            return args + list(backbone.dense)
        spec = ROUTERS[self.router]
        fields = dict(spec.fields)
        if fields["router"] == "switch":
            fields.update(_EVAL_CAPACITY)
        fields.update(n_experts=str(self.n_experts), expert_hidden=str(self.expert_hidden()))
        return args + list(backbone.sparse) + [f"--{k}={v}" for k, v in fields.items()]


def run_label(router: str, n_experts: int, teacher: str | None = None) -> str:
    if teacher is not None:
        return f"dense ← {teacher} E={n_experts}"
    return router if router == DENSE else f"{router} E={n_experts}"


def expand_grid(grid: GridConfig) -> list[RunSpec]:
    """Every run of the grid, in training order: per task and backbone, dense first, then
    each router at main_experts, then the experts axis; each for every seed. Expert choice
    is left out where its only layout would be causal (Backbone.ec_absent)."""
    runs: list[RunSpec] = []
    for task in grid.tasks:
        for arch in grid.archs:
            backbone = BACKBONES[task, arch]
            points: list[tuple[str, int]] = []
            for router in grid.routers:
                if router == DENSE:
                    points.append((DENSE, 0))
                elif not (ROUTERS[router].sees_whole_batch and backbone.ec_preset is None):
                    points.append((router, grid.main_experts))
            if task in grid.expert_tasks:
                for router in grid.expert_routers:
                    if router == DENSE or (
                        ROUTERS[router].sees_whole_batch and backbone.ec_preset is None
                    ):
                        continue
                    points += [(router, e) for e in grid.experts if (router, e) not in points]
            for router, n_experts in points:
                runs += [RunSpec(task, arch, router, n_experts, seed) for seed in grid.seeds]
            if grid.distill and (grid.distill_teacher, grid.main_experts) in points:
                runs += [
                    RunSpec(task, arch, DENSE, grid.main_experts, seed, grid.distill_teacher)
                    for seed in grid.seeds
                ]
    return runs


def left_out(grid: GridConfig) -> list[str]:
    """One line per (task, arch) where a requested router cannot run, and why."""
    lines = []
    for task in grid.tasks:
        for arch in grid.archs:
            backbone = BACKBONES[task, arch]
            for router in grid.routers:
                absent = router != DENSE and ROUTERS[router].sees_whole_batch
                if absent and backbone.ec_preset is None:
                    lines.append(f"{task}/{arch}: no {router}: {backbone.ec_absent}")
    return lines


# The pair the comparison is about: Switch top-1 at its paper's capacity factor and the 2017
# noisy top-4. The report puts them side by side and shows what their experts learned.
K1_VS_K4 = ("top1-cf1.25", "top4")


def experts_shown(grid: GridConfig, spec: RunSpec) -> bool:
    """Whether the report shows what this run's experts learned (with its heat maps): the
    k=1 and k=4 runs at main_experts, first seed. The other sparse runs give the table their
    mutual information."""
    return (
        spec.teacher is None
        and spec.router in K1_VS_K4
        and spec.n_experts == grid.main_experts
        and spec.seed == grid.seeds[0]
    )


def schedule_args(grid: GridConfig, backbone: Backbone) -> list[str]:
    """The budget and the cadences: valid_points validations along training (the last one at
    the end, which the engine always validates), a checkpoint halfway (so a killed
    comparison loses little)."""
    task = backbone.task
    if grid.budget == "tokens":
        steps = max(1, grid.tokens(task) // backbone.tokens_per_step)
        budget = f"--max_tokens={grid.tokens(task)}"
    else:
        steps = 200  # a guess for the cadences only: the budget is the clock
        budget = f"--max_seconds={grid.seconds}"
    log_every = max(1, min(10, steps // 20))
    checkpoint_every = log_every * max(1, math.ceil(steps / 2 / log_every))
    valid = "--eval_pairs" if task == "translation" else "--eval_tokens"
    valid_amount = max(1, grid.valid_tokens // 20) if task == "translation" else grid.valid_tokens
    return [
        budget,
        f"--warmup_steps={max(1, min(100, steps // 10))}",
        f"--eval_every={max(1, math.ceil(steps / grid.valid_points))}",
        f"--checkpoint_every={checkpoint_every}",
        f"--log_every={log_every}",
        f"{valid}={valid_amount}",
    ]


def train_args(grid: GridConfig, spec: RunSpec, data: Path, run: Path) -> list[str]:
    """lstm_moe.train's arguments for one run (a distilled student's teacher is the run of
    its teacher_spec beside it)."""
    teacher = spec.teacher_spec()
    distill = [] if teacher is None else [f"--teacher_run={run.parent / teacher.name}"]
    return [
        f"--data={data}",
        f"--run={run}",
        *spec.model_args(),
        *schedule_args(grid, BACKBONES[spec.setting]),
        f"--seed={spec.seed}",
        *distill,
        *grid.extra_train_args,
    ]
