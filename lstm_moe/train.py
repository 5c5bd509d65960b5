"""Train a task's model on a prepared dataset (data_prep.*), resumably, on one process or on
the ranks torchrun starts.

    python -m lstm_moe.train --data data/lm1b-<id> --run runs/moe32 --preset MoE-32 \\
        --max_tokens=100000000 [--key=value ...]
    python -m lstm_moe.train --run runs/moe32 --resume [--max_tokens=200000000]
    torchrun --nproc_per_node=4 -m lstm_moe.train -- --data ... --run ... --preset MoE-32

`--task` picks the task: `lm` (the default: language modelling) or `translation`; `--arch`
the model family: `lstm` (the default: the paper's LSTM language model, or its GNMT-style
translation model) or `transformer` (switch.transformer: decoder-only, or encoder-decoder). A
preset implies its task and its architecture.
Every field of the model config, the task's config and the training config can be set with
`--field=value` (type-checked; `--help` lists them with their types, defaults and allowed
values). The run folder holds everything needed to resume or evaluate:
  config.json     the task, the three configs, the dataset's path and fingerprint, the size
  metrics.jsonl   one JSON object per log interval ("kind": "train") and per validation
                  ("kind": "valid"): loss, each auxiliary loss, routing statistics, tokens/s
  checkpoint.pt   model, optimizer, schedule, RNG states and the task's state (on W ranks
                  beside one expert shard per rank), written atomically

`--resume` continues the run exactly; it accepts fields equal to the run's and the fields
marked resumable (budgets, cadences, devices), and refuses any other change.

On W ranks (lstm_moe.engine.ranks) the experts are sharded and everything else is
data-parallel; the updates are those of one process on the same batch, up to the order of
floating-point sums, when the run draws nothing at random per token (no dropout, no router
noise). A run resumes, or is evaluated, at any number of ranks that divides its batch and
its number of experts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lstm_moe.engine.config import RESUMABLE_FIELDS, TrainConfig
from lstm_moe.engine.ranks import fail, join_ranks
from lstm_moe.engine.trainer import Trainer
from lstm_moe.fields import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    describe_fields,
    field_names,
    nearest_names,
    split_overrides,
)
from lstm_moe.files import read_json
from lstm_moe.runtime import enable_cpu_hugepages, resolve_device
from lstm_moe.tasks import TASKS
from lstm_moe.tasks.common import architecture_of, run_architecture

DEFAULT_TASK = "lm"


def split_by_config(
    task_cls, overrides: dict[str, str], model_config_class: type | None = None
) -> dict[str, dict[str, str]]:
    """The overrides for the model (of model_config_class, by default the task's default
    architecture's), the task and the training config (their field names are disjoint); an
    unknown name is a ValueError naming the nearest fields."""
    model_config_class = model_config_class or task_cls.model_config_class
    owners = {
        "model": field_names(model_config_class),
        "task": field_names(task_cls.config_class),
        "train": field_names(TrainConfig),
    }
    split: dict[str, dict[str, str]] = {name: {} for name in owners}
    for key, value in overrides.items():
        name = key.replace("-", "_")
        owner = next((o for o, names in owners.items() if name in names), None)
        if owner is None:
            near = nearest_names(name, set().union(*owners.values()))
            if near:
                hint = f"did you mean {', '.join('--' + n for n in near)}?"
            else:
                hint = "; ".join(
                    f"{what} fields: {', '.join(sorted(owners[o]))}"
                    for o, what in (("model", "model"), ("task", "task"), ("train", "training"))
                )
            raise ValueError(f"unknown option --{key}; {hint} (--help says what each is)")
        split[owner][name] = value
    return split


def changed_fields(before, after) -> list[str]:
    """Names of the fields (nested ones flat) whose values differ."""
    old, new = _flat(config_to_dict(before)), _flat(config_to_dict(after))
    return sorted(name for name in new if old.get(name) != new[name])


def _flat(values: dict) -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update({k: v for k, v in _flat(value).items() if k not in values})
        else:
            out[key] = value
    return out


def build_trainer(args: argparse.Namespace, overrides: dict[str, str]) -> Trainer:
    run_dir: Path = args.run
    if args.resume:
        return _resume(args, overrides)
    if (run_dir / "checkpoint.pt").exists():
        raise FileExistsError(
            f"{run_dir} already holds a checkpoint: pass --resume to continue it, or choose "
            "another --run"
        )
    task_cls = TASKS[args.task or _task_of_preset(args.preset) or DEFAULT_TASK]
    if args.data is None:
        raise ValueError("--data DIR (a folder prepared by data_prep) is required")
    presets = task_cls.presets()
    if args.preset is not None and args.preset not in presets:
        other = _task_of_preset(args.preset)
        hint = f" (it is a --task {other} preset)" if other else ""
        raise ValueError(
            f"unknown preset {args.preset!r} for --task {task_cls.name}{hint}; choose one of "
            f"{list(presets)}"
        )
    model_config = _initial_model_config(task_cls, args.preset, args.arch)
    split = split_by_config(task_cls, overrides, type(model_config))
    model_config = apply_overrides(
        model_config, {**task_cls.dataset_overrides(args.data), **split["model"]}
    )
    task_config = apply_overrides(task_cls.config_class(), split["task"])
    train_config = apply_overrides(TrainConfig(), split["train"])
    if not train_config.has_budget:
        raise ValueError("set a budget: --max_steps=N, --max_tokens=N or --max_seconds=S")
    return _start(
        task_cls,
        run_dir,
        model_config,
        task_config,
        train_config,
        args.data,
        args.preset,
        resume=False,
    )


def _initial_model_config(task_cls, preset: str | None, arch: str | None):
    """The preset's model config, or the default config of --arch (of the task's default
    architecture without it); a preset of another architecture than --arch is refused."""
    if preset is not None:
        config = task_cls.presets()[preset]
        preset_arch = architecture_of(task_cls.architectures, config)
        if arch is not None and arch != preset_arch:
            raise ValueError(
                f"preset {preset!r} is a --arch {preset_arch} model, not --arch {arch}"
            )
        return config
    arch = task_cls.default_arch if arch is None else arch
    return task_cls.architectures[arch].config_class()


def _task_of_preset(preset: str | None) -> str | None:
    """The task whose presets hold `preset` (preset names are unique across tasks), so that
    `--preset NMT-MoE-32` alone picks translation."""
    return next((name for name, cls in TASKS.items() if preset in cls.presets()), None)


def _resume(args: argparse.Namespace, overrides: dict[str, str]) -> Trainer:
    """The run's own configs, with the overrides applied: a value equal to the run's is
    accepted, a change of the model, the task or the preset refused here, and a change of a
    task or training field that is not resumable by Trainer.restore."""
    run_dir: Path = args.run
    config_path = run_dir / "config.json"
    if not (run_dir / "checkpoint.pt").is_file() or not config_path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint in {run_dir}")
    saved = read_json(config_path)
    task_name = saved.get("task", DEFAULT_TASK)
    if args.task is not None and args.task != task_name:
        raise ValueError(f"--resume: {run_dir} is a {task_name!r} run, not --task {args.task}")
    if task_name not in TASKS:
        raise ValueError(f"{config_path}: unknown task {task_name!r}")
    if args.preset is not None and args.preset != saved.get("preset"):
        raise ValueError(
            f"--resume keeps the run's model: {run_dir} was started from preset "
            f"{saved.get('preset')!r}, not {args.preset!r}; start a new run for another preset"
        )
    task_cls = TASKS[task_name]
    arch = run_architecture(saved)
    if args.arch is not None and args.arch != arch:
        raise ValueError(f"--resume: {run_dir} is a --arch {arch} run, not --arch {args.arch}")
    if arch not in task_cls.architectures:
        raise ValueError(f"{config_path}: unknown architecture {arch!r}")
    model_config_class = task_cls.architectures[arch].config_class
    split = split_by_config(task_cls, overrides, model_config_class)
    try:
        model_config = config_from_dict(model_config_class, saved["model"])
        task_config = config_from_dict(task_cls.config_class, saved["task_config"])
        train_config = config_from_dict(TrainConfig, saved["train"])
        data_dir = args.data or task_cls.data_dir_of(saved)
    except (KeyError, TypeError) as error:
        raise ValueError(f"{config_path} is not a run's config (no {error})") from None
    changed = changed_fields(model_config, apply_overrides(model_config, split["model"]))
    if changed:
        raise ValueError(
            f"--resume keeps the run's model; {changed} differ from {run_dir}'s: drop them or "
            "start a new run"
        )
    task_config = apply_overrides(task_config, split["task"])
    train_config = apply_overrides(train_config, split["train"])
    return _start(
        task_cls,
        run_dir,
        model_config,
        task_config,
        train_config,
        data_dir,
        saved.get("preset"),
        resume=True,
    )


def _start(
    task_cls, run_dir, model_config, task_config, train_config, data_dir, preset, resume: bool
) -> Trainer:
    """Join the other ranks (when torchrun started several), build the task and the trainer."""
    group = join_ranks(
        resolve_device(train_config.device),
        train_config.dist_timeout,
        train_config.checkpoint_timeout,
    )
    try:
        task = task_cls(
            model_config,
            task_config,
            data_dir,
            group,
            micro_batches=train_config.micro_batches,
            seed=train_config.seed,
        )
        trainer = Trainer(run_dir, task, train_config, group, preset)
        if resume:
            trainer.restore()
        else:
            trainer.start_fresh()
    except BaseException:
        group.close()
        raise
    return trainer


def help_epilog() -> str:
    parts = [f"Tasks: {', '.join(TASKS)} (default {DEFAULT_TASK})."]
    for name, task_cls in TASKS.items():
        for arch_name, arch in task_cls.architectures.items():
            parts.append(
                f"Model fields of --task {name} --arch {arch_name} ({arch.config_class.__name__}):"
            )
            parts += describe_fields(arch.config_class)
        parts.append(f"Task fields of --task {name} ({task_cls.config_class.__name__}):")
        parts += describe_fields(task_cls.config_class, task_cls.resumable_fields)
        parts.append(f"Presets of --task {name}: {', '.join(task_cls.presets())}.")
    parts.append("Training fields (TrainConfig):")
    parts += describe_fields(TrainConfig, RESUMABLE_FIELDS)
    parts.append(
        "Set any of them with --field=value (tuples as a,b,c; none for unset). With "
        "--resume, a field equal to the run's is accepted; only those marked resumable may "
        "change."
    )
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    enable_cpu_hugepages()  # huge pages for large CPU tensors (runtime.py)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--"]:  # `torchrun -m lstm_moe.train -- ARGS` (some Pythons keep the --)
        argv = argv[1:]
    parser = argparse.ArgumentParser(
        prog="python -m lstm_moe.train",
        description=__doc__.split("\n\n")[0],
        epilog=help_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, help="dataset folder (data_prep output)")
    parser.add_argument("--run", type=Path, required=True, help="run folder, e.g. runs/moe32")
    parser.add_argument("--task", choices=sorted(TASKS), help=f"default {DEFAULT_TASK}")
    parser.add_argument(
        "--arch",
        choices=sorted({arch for cls in TASKS.values() for arch in cls.architectures}),
        help="the model family: the paper's LSTMs (default) or a Transformer (switch/); a "
        "preset implies its own",
    )
    parser.add_argument("--preset", help="a model preset (python -m lstm_moe.presets)")
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
    group = trainer.group
    group.print(
        f"{args.run}: {trainer.task.summary(trainer.model)}, on {trainer.device}"
        + (f", {group.world_size} ranks" if group.world_size > 1 else "")
        + (f", resuming at step {trainer.step}" if args.resume else ""),
        file=sys.stderr,
    )
    try:
        last = trainer.fit(progress=not args.quiet)
    except RuntimeError as error:
        if group.world_size == 1 or isinstance(error, torch.OutOfMemoryError):
            raise  # this rank's own failure, not a peer's
        # A collective raised (a peer closed its connection) or timed out (a peer hangs).
        # The group cannot be shut down cleanly with a rank missing; the process exit frees it.
        fail(group, error)
        return 1
    group.close()
    if last:
        summary = ", ".join(
            f"{k} {v:.4g}"
            for k, v in last.items()
            if k.startswith("valid_") and k != "valid_tokens"
        )
        group.print(f"{summary} after {trainer.tokens} tokens", file=sys.stderr)
    group.print(f"wrote {args.run}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
