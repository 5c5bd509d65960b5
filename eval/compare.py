"""`make compare`: train a grid of routers side by side and write one report.

    python -m eval.compare --out runs/compare [--tasks lm,translation] [--archs lstm,transformer]
        [--routers dense,top1-cf1.0,top1-cf1.25,top2,top4,ec] [--experts 4,32,256]
        [--seeds 1,2] [--budget tokens|time] [--data lm=DIR,translation=DIR] [--nproc N]

Every run of the grid (eval/compare_grid.py: which runs, with which arguments, and how the
active FLOPs are matched) is trained by lstm_moe.train, scored by eval.perplexity on the test
split (and, for translation, by eval.translate: beam search and BLEU), then
eval/compare_report.py puts them side by side in OUT/report.md, OUT/summary.json and PNGs.

A run already finished with the same arguments is reused; one with a checkpoint is resumed;
so a killed comparison continues where it stopped. A run folder holding another grid's run
(other arguments) is refused, not overwritten. Each run folder's compare.json records its
arguments and the wall time of each stage, from which the report measures what the
comparison costs beyond training itself.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

from lstm_moe.files import PATH_ERRORS, read_json, write_json_atomic

from .compare_grid import (
    ARCHS,
    DENSE,
    ROUTERS,
    TASKS,
    GridConfig,
    RunSpec,
    expand_grid,
    experts_shown,
    left_out,
    train_args,
)

RECORD = "compare.json"


def default_data(task: str, out: Path = Path("data")) -> Path:
    """The generated corpus of a task (made once, then found): the multi-topic Markov corpus
    for language models, the generated parallel corpus (demo preset) for translation."""
    with contextlib.redirect_stdout(sys.stderr):
        if task == "lm":
            from data_prep.synthetic import PRESETS, prepare_synthetic

            return prepare_synthetic(PRESETS["default"], out)
        from data_prep.synthetic_parallel import PRESETS, prepare_synthetic_parallel

        return prepare_synthetic_parallel(PRESETS["demo"], out, progress=False)


def eval_args(grid: GridConfig, spec: RunSpec) -> dict[str, list[str]]:
    """Each evaluation's arguments after the run folder."""
    if spec.task == "lm":
        limit = [] if grid.eval_tokens is None else [f"--max_tokens={grid.eval_tokens}"]
        out = {"perplexity": limit}
    else:
        pairs = [] if grid.eval_pairs is None else [f"--max_pairs={grid.eval_pairs}"]
        bleu = [] if grid.bleu_sentences is None else [f"--limit={grid.bleu_sentences}"]
        out = {"perplexity": pairs, "translate": [*bleu, "--quiet"]}
    if spec.router != DENSE and grid.experts_tokens is not None:
        out["experts"] = [f"--max_tokens={grid.experts_tokens}"]
        if not experts_shown(grid, spec):  # a map per layer is most of the analysis' time
            out["experts"].append("--no_heatmaps")
    return out


class RunFailed(RuntimeError):
    pass


class Runner:
    """Runs lstm_moe.train, eval.perplexity and eval.translate: in this process for one rank
    (a new Python costs seconds per run), under torchrun for several."""

    def __init__(self, nproc: int, progress: bool) -> None:
        self.nproc, self.progress = nproc, progress

    def train(self, args: list[str]) -> None:
        self._run("lstm_moe.train", args if self.progress else [*args, "--quiet"], ranks=True)

    def evaluate(self, module: str, args: list[str]) -> None:
        self._run(module, args, ranks=module == "eval.translate")

    def _run(self, module: str, args: list[str], ranks: bool) -> None:
        if self.nproc > 1 and ranks:
            command = [
                str(Path(sys.executable).with_name("torchrun")),
                "--standalone",
                f"--nproc_per_node={self.nproc}",
                "-m",
                module,
                "--",
                *args,
            ]
            status = subprocess.run(command, stdout=sys.stderr, check=False).returncode
        else:
            main = _entry_point(module)
            with contextlib.redirect_stdout(sys.stderr):
                status = main(args)
        if status:
            raise RunFailed(f"python -m {module} {' '.join(args)} exited with status {status}")


def _entry_point(module: str):
    if module == "lstm_moe.train":
        from lstm_moe.train import main
    elif module == "eval.perplexity":
        from eval.perplexity import main
    elif module == "eval.experts":
        from eval.experts import main
    else:
        from eval.translate import main
    return main


# What each evaluation writes into RUN/eval.
EVAL_OUTPUT = {"perplexity": "perplexity.json", "translate": "bleu.json", "experts": "experts.json"}


def is_finished(run: Path, evaluations: dict[str, list[str]]) -> bool:
    """Trained and scored: every evaluation's output is there (each written after training)."""
    return all((run / "eval" / EVAL_OUTPUT[module]).is_file() for module in evaluations)


def run_one(grid: GridConfig, spec: RunSpec, data: Path, out: Path, runner: Runner) -> dict:
    """Train (or resume, or reuse) and evaluate one run; returns its compare.json record."""
    run = out / spec.name
    args = train_args(grid, spec, data, run)
    evaluations = eval_args(grid, spec)
    identity = {"train_args": args, "eval_args": evaluations, "nproc": grid.nproc}
    record_path = run / RECORD
    if record_path.is_file():
        record = read_json(record_path)
        if {k: record.get(k) for k in identity} != identity:
            raise ValueError(
                f"{run} holds a run with other arguments than this grid's ({RECORD}); "
                "remove it or choose another --out"
            )
        if record["finished"] and is_finished(run, evaluations):
            return {**record, "reused": True}
    elif run.exists():
        raise ValueError(f"{run} exists but holds no {RECORD}: remove it or choose another --out")
    else:
        record = {**identity, "spec": vars(spec), "seconds": {}, "finished": False}
        run.mkdir(parents=True)
        write_json_atomic(record_path, record)
    seconds = record["seconds"]
    start = time.perf_counter()
    if (run / "checkpoint.pt").is_file():
        runner.train([f"--run={run}", "--resume"])
    else:  # new, or killed before its first checkpoint: start it (again)
        for path in run.iterdir():
            if path.name != RECORD:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        runner.train(args)
    seconds["train"] = seconds.get("train", 0.0) + time.perf_counter() - start
    write_json_atomic(record_path, record)
    for module, extra in evaluations.items():
        start = time.perf_counter()
        runner.evaluate(f"eval.{module}", [str(run), *extra])
        seconds[module] = time.perf_counter() - start
    record["finished"] = True
    write_json_atomic(record_path, record)
    return {**record, "reused": False}


def run_grid(grid: GridConfig, out: Path, progress: bool = True) -> list[Path]:
    """Every run of the grid, trained and evaluated (or reused); returns their folders."""
    specs = expand_grid(grid)
    if not specs:
        raise ValueError("the grid is empty: check --tasks, --archs and --routers")
    for line in left_out(grid):
        print(f"left out: {line}", file=sys.stderr)
    data = {task: Path(grid.data[task]) if task in grid.data else None for task in grid.tasks}
    runner = Runner(grid.nproc, progress and sys.stderr.isatty())
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for index, spec in enumerate(specs, 1):
        if data[spec.task] is None:
            data[spec.task] = default_data(spec.task)
        record = run_one(grid, spec, data[spec.task], out, runner)
        runs.append(out / spec.name)
        done = "reused" if record["reused"] else f"{sum(record['seconds'].values()):.1f} s"
        print(f"[{index}/{len(specs)}] {spec.name}: {done}", file=sys.stderr)
    return runs


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _data_arg(text: str) -> dict[str, str]:
    """`lm=DIR,translation=DIR`, or one DIR whose meta.json says which task it serves."""
    if "=" not in text:
        meta = read_json(Path(text) / "meta.json")
        return {"translation" if "src_lang" in meta else "lm": text}
    pairs = dict(part.split("=", 1) for part in _csv(text))
    unknown = set(pairs) - set(TASKS)
    if unknown:
        raise ValueError(f"--data: unknown task {sorted(unknown)}; use lm=DIR,translation=DIR")
    return pairs


def parse_grid(argv: list[str]) -> tuple[GridConfig, argparse.Namespace]:
    defaults = GridConfig()
    parser = argparse.ArgumentParser(
        prog="python -m eval.compare",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Routers: "
        + "; ".join(f"{label}: {spec.description}" for label, spec in ROUTERS.items())
        + f"; {DENSE}: the compute-matched dense model.",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--title", default="k=1 vs k=2 vs k=4: routers side by side")
    parser.add_argument("--tasks", type=_csv, default=defaults.tasks, help=f"of {TASKS}")
    parser.add_argument("--archs", type=_csv, default=defaults.archs, help=f"of {ARCHS}")
    parser.add_argument("--routers", type=_csv, default=defaults.routers)
    parser.add_argument(
        "--experts",
        type=lambda t: tuple(int(v) for v in _csv(t)),
        default=defaults.experts,
        help="the experts axis (at equal active FLOPs), for --expert_routers and "
        "--expert_tasks; '' for none",
    )
    parser.add_argument("--expert_routers", type=_csv, default=defaults.expert_routers)
    parser.add_argument("--expert_tasks", type=_csv, default=defaults.expert_tasks)
    parser.add_argument("--main_experts", type=int, default=defaults.main_experts)
    parser.add_argument(
        "--seeds", type=lambda t: tuple(int(v) for v in _csv(t)), default=defaults.seeds
    )
    parser.add_argument("--budget", choices=("tokens", "time"), default=defaults.budget)
    parser.add_argument("--lm_tokens", type=int, default=defaults.lm_tokens)
    parser.add_argument("--translation_tokens", type=int, default=defaults.translation_tokens)
    parser.add_argument("--seconds", type=float, default=defaults.seconds)
    parser.add_argument("--data", type=_data_arg, default={}, help="lm=DIR,translation=DIR")
    parser.add_argument("--nproc", type=int, default=defaults.nproc)
    parser.add_argument(
        "--distill",
        action="store_true",
        help="also distil each backbone's --distill_teacher run into its dense model (Switch §4.2)",
    )
    parser.add_argument("--distill_teacher", default=defaults.distill_teacher)
    for name in (
        "eval_tokens",
        "eval_pairs",
        "bleu_sentences",
        "valid_points",
        "valid_tokens",
        "experts_tokens",
    ):
        parser.add_argument(f"--{name}", type=_optional_int, default=getattr(defaults, name))
    parser.add_argument(
        "--train_args",
        type=lambda t: tuple(t.split()),
        default=(),
        help="more --field=value for every run, e.g. '--softmax=sampled'",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in fields(GridConfig) if hasattr(args, f.name)}
    values["extra_train_args"] = args.train_args
    return replace(defaults, **values), args


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "all") else int(text)


def main(argv: list[str] | None = None) -> int:
    from .compare_report import write_comparison

    try:
        grid, args = parse_grid(sys.argv[1:] if argv is None else argv)
    except (ValueError, *PATH_ERRORS) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        runs = run_grid(grid, args.out, progress=not args.quiet)
        summary = write_comparison(runs, args.out, args.title, grid)
    except (ValueError, RunFailed, KeyError, *PATH_ERRORS) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out / 'report.md'} ({len(summary['runs'])} runs) "
        f"in {time.perf_counter() - start:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
