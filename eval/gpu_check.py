"""The GPU check: one command, on one GPU, in under 8 minutes, with one summary.

    python -m eval.gpu_check [--out runs/gpu-check] [--time-limit 450]
    PYTHONPATH=. python3 -m eval.gpu_check      # a machine with torch but without the venv
    python -m eval.gpu_check --dry-run          # the commands it would run (needs no GPU)

Stages, each a subprocess of the interpreter that runs this module (so `python3` without the
venv runs every stage with that same python3), from the repository root:
  tests     python -m pytest tests/cuda: the bf16 experts, the float32 routers, each
            backbone's bf16 training, CUDA decoding (counts and failures from its JUnit XML).
  data      the generated corpora of `make demo` (data_prep.synthetic, .synthetic_parallel).
  train     a short bf16 training of each backbone through lstm_moe.train (--task lm or
            translation, --arch lstm or transformer, a MoE preset, --device=cuda --bf16=true),
            each stopped by a time budget: losses, tokens/s, validation NLL.
  grouped   eval.bench_grouped_mm: the grouped expert product against a dense bf16 GEMM of
            the same FLOPs.
  bench     eval.bench_moe --device cuda: the MoE layer with bf16 experts against the dense,
            loop and one-hot contenders at E = 8 ... 1024, k = 4 and k = 1; it gets the time
            the other stages left (--max-seconds), so the whole check keeps to --time-limit.
Writes OUT/summary.md (and summary.json): the environment, each stage's status, the test
result, each training's losses and tokens/s, and the benchmark tables; OUT/logs/<stage>.out
and .err hold each command's output. A failed stage is reported and the others still run.

Exit status: 0 when every stage passed, 1 when one failed, timed out or did not fit in the
time limit, 2 without a CUDA device (nothing runs) or for a bad option.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("tests", "data", "train", "grouped", "bench")
# What the stages import beyond torch: a machine's own python3 may lack some of them.
NEEDED_MODULES = ("numpy", "pytest", "sentencepiece", "sacrebleu", "sacremoses", "tqdm")


@dataclass(frozen=True)
class Backbone:
    """One training of the train stage: lstm_moe.train's task, architecture, preset and the
    fields that size it for a short run on one GPU."""

    name: str
    task: str
    arch: str
    preset: str
    fields: tuple[str, ...]


BACKBONES = (
    # The paper's MoE-32 LM (App. C.1: 32 experts of width 1024, k = 4, noisy top-k gates).
    Backbone("lstm-lm", "lm", "lstm", "MoE-32",
             ("--softmax=full", "--batch_size=128", "--bptt=20", "--lr=0.002",
              "--eval_tokens=50000")),
    # switch-32: 4 layers of width 256, top-1 of 32 experts in layers 1 and 3.
    Backbone("transformer-lm", "lm", "transformer", "switch-32",
             ("--softmax=full", "--batch_size=64", "--bptt=128", "--lr=0.001",
              "--eval_tokens=50000")),
    # The paper's MoE-32 translation model (App. E: LSTMs of 2048 cells, the batchwise gate).
    Backbone("lstm-nmt", "translation", "lstm", "NMT-MoE-32",
             ("--batch_size=128", "--dropout=0.1", "--lr=0.001", "--eval_pairs=500")),
    Backbone("transformer-nmt", "translation", "transformer", "NMT-switch-32",
             ("--batch_size=128", "--lr=0.001", "--eval_pairs=500")),
)  # fmt: skip


@dataclass(frozen=True)
class GpuCheckConfig:
    """out: where the summary, logs, runs and reports go. data: the parent folder of the
    generated corpora (data_prep's --out; a second check finds them there). time_limit:
    seconds for the whole check; a stage gets what is left, and one that cannot start in
    time is reported as not run. train_seconds: each training's budget (--max_seconds: the
    training steps only; start-up, the final validation and the checkpoint come on top).
    bench_experts: the E of eval.bench_moe. bench_reserve: seconds kept back from
    bench_moe's --max-seconds, for the size in flight when it passes. stages: which run."""

    out: Path = Path("runs/gpu-check")
    data: Path = Path("data")
    time_limit: float = 450.0
    train_seconds: float = 20.0
    bench_experts: tuple[int, ...] = (8, 32, 128, 512, 1024)
    bench_reserve: float = 60.0
    stages: tuple[str, ...] = STAGES

    def __post_init__(self) -> None:
        unknown = sorted(set(self.stages) - set(STAGES))
        if unknown:
            raise ValueError(f"unknown stages {unknown}; choose from {list(STAGES)}")
        for name in ("time_limit", "train_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if not self.bench_experts or min(self.bench_experts) < 4:
            raise ValueError(f"bench_experts must be >= 4 (k = 4), got {self.bench_experts}")

    @property
    def runs(self) -> Path:
        return self.out / "runs"

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    @property
    def junit(self) -> Path:
        return self.out / "cuda-tests.xml"

    def report(self, name: str, suffix: str) -> Path:
        return self.out / "bench" / f"{name}.{suffix}"


# ----------------------------------------------------------------------------- commands


def python_module(module: str, *args: str) -> list[str]:
    """`<this interpreter> -m module args`: the stages run with whatever python runs this."""
    return [sys.executable, "-m", module, *args]


def tests_command(config: GpuCheckConfig) -> list[str]:
    return python_module(
        "pytest", "tests/cuda", "-q", "-rfEs", "-p", "no:cacheprovider",
        f"--junitxml={config.junit}",
    )  # fmt: skip


def data_commands(config: GpuCheckConfig) -> dict[str, list[str]]:
    """The corpora of `make demo`; each prints its folder on its last line."""
    return {
        "lm": python_module("data_prep.synthetic", "--out", str(config.data)),
        "translation": python_module(
            "data_prep.synthetic_parallel", "--out", str(config.data), "--preset", "demo",
            "--no-progress",
        ),
    }  # fmt: skip


def train_command(config: GpuCheckConfig, backbone: Backbone, data_dir: Path) -> list[str]:
    """A short bf16 training on the GPU: stopped by --max_seconds (max_steps only bounds it),
    logged every 20 steps, validated and saved once at the end."""
    return python_module(
        "lstm_moe.train", "--task", backbone.task, "--arch", backbone.arch,
        "--preset", backbone.preset, "--data", str(data_dir),
        "--run", str(config.runs / backbone.name), *backbone.fields,
        "--device=cuda", "--bf16=true", f"--max_seconds={config.train_seconds:g}",
        "--max_steps=1000000", "--warmup_steps=100", "--log_every=20",
        "--eval_every=1000000", "--checkpoint_every=1000000", "--quiet",
    )  # fmt: skip


def grouped_command(config: GpuCheckConfig) -> list[str]:
    return python_module(
        "eval.bench_grouped_mm", "--device", "cuda", "--dtype", "bfloat16",
        "--experts", *map(str, config.bench_experts),
        "--json", str(config.report("grouped_mm", "json")),
        "--markdown", str(config.report("grouped_mm", "md")),
    )  # fmt: skip


def bench_command(config: GpuCheckConfig, max_seconds: float) -> list[str]:
    return python_module(
        "eval.bench_moe", "--device", "cuda", "--dtype", "bfloat16",
        "--experts", *map(str, config.bench_experts), "--max-seconds", f"{max_seconds:.0f}",
        "--json", str(config.report("bench_moe", "json")),
        "--markdown", str(config.report("bench_moe", "md")),
    )  # fmt: skip


# ----------------------------------------------------------------------------- running


@dataclass
class StageResult:
    """One command of the check. status: "ok", "failed" (non-zero exit), "timed out",
    "not run" (no time left, or a stage it needs failed)."""

    name: str
    command: list[str]
    status: str
    seconds: float = 0.0
    returncode: int | None = None
    note: str = ""
    output_tail: str = ""


def run_stage(name: str, command: list[str], timeout: float, logs: Path) -> StageResult:
    """Run command from the repository root, its stdout to logs/<name>.out and its stderr to
    logs/<name>.err; a timeout kills it."""
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # The packages import from the repository itself, with or without an installed copy.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out_path, err_path = logs / f"{name}.out", logs / f"{name}.err"
    start = time.perf_counter()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        err.write("$ " + " ".join(command) + "\n")
        err.flush()
        try:
            returncode = subprocess.run(
                command, cwd=ROOT, env=env, stdout=out, stderr=err, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            returncode = None
    seconds = time.perf_counter() - start
    tail = "\n".join(
        (err_path.read_text(errors="replace") + out_path.read_text(errors="replace")).splitlines()[
            -15:
        ]
    )
    if returncode is None:
        note = f"killed after {timeout:.0f} s"
        return StageResult(name, command, "timed out", seconds, None, note, tail)
    status = "ok" if returncode == 0 else "failed"
    return StageResult(name, command, status, seconds, returncode, output_tail=tail)


def not_run(name: str, command: list[str], why: str) -> StageResult:
    return StageResult(name, command, "not run", note=why)


def last_line(path: Path) -> str:
    """The last non-empty line of a file ("" if none)."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


# ----------------------------------------------------------------------------- reading


def read_junit(path: Path) -> dict:
    """Counts of a pytest JUnit XML file and the failed tests with their first message line."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites)
              for key in ("tests", "failures", "errors", "skipped")}  # fmt: skip
    counts["seconds"] = sum(float(s.get("time", 0.0)) for s in suites)
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = []
    for case in root.iter("testcase"):
        for problem in (*case.findall("failure"), *case.findall("error")):
            message = (problem.get("message") or problem.text or "").strip().splitlines()
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            failed.append({"test": name, "message": message[0][:200] if message else ""})
    counts["failed"] = failed
    return counts


def read_training(run_dir: Path) -> dict:
    """A run folder's log, as the summary shows it: steps, tokens, the loss at each log
    entry (every one finite?), the median tokens/s of the entries after the first (whose
    interval holds the GPU's warm-up) and the last validation."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {"entries": 0}
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [e for e in entries if e.get("kind") == "train"]
    valid = [e for e in entries if e.get("kind") == "valid"]
    if not train:
        return {"entries": 0}
    losses = [e["loss"] for e in train]
    rates = [e["tokens_per_s"] for e in train]
    steady = rates[1:] if len(rates) > 1 else rates
    result = {
        "entries": len(train),
        "steps": train[-1]["step"],
        "tokens": train[-1]["tokens"],
        "seconds": train[-1].get("elapsed"),
        "losses": losses,
        "finite": all(math.isfinite(v) for v in losses + [e["aux_loss"] for e in train]),
        "tokens_per_s": statistics.median(steady),
    }
    if valid:
        result["valid_nll"] = valid[-1].get("valid_nll")
        result["valid_ppl"] = valid[-1].get("valid_ppl")
    return result


def environment() -> dict:
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name(0) if cuda else None,
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "grouped_mm": hasattr(torch, "_grouped_mm"),
        "python": platform.python_version(),
        "executable": sys.executable,
        "missing_modules": [m for m in NEEDED_MODULES if importlib.util.find_spec(m) is None],
    }


# ----------------------------------------------------------------------------- the check


@dataclass
class CheckResult:
    """Everything the summary shows."""

    environment: dict
    stages: list[StageResult] = field(default_factory=list)
    tests: dict | None = None
    trainings: dict[str, dict] = field(default_factory=dict)
    bench_markdown: str | None = None
    grouped_markdown: str | None = None
    seconds: float = 0.0
    time_limit: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.stages) and all(s.status == "ok" for s in self.stages)


def clear_outputs(config: GpuCheckConfig) -> None:
    """Remove what an earlier check wrote (lstm_moe.train refuses a run folder that holds a
    checkpoint), and nothing else in OUT."""
    for path in (config.runs, config.logs, config.out / "bench"):
        shutil.rmtree(path, ignore_errors=True)
    for path in (config.junit, config.out / "summary.md", config.out / "summary.json"):
        path.unlink(missing_ok=True)


def run_check(config: GpuCheckConfig) -> CheckResult:
    start = time.perf_counter()
    deadline = start + config.time_limit
    result = CheckResult(environment(), time_limit=config.time_limit)
    clear_outputs(config)
    config.out.mkdir(parents=True, exist_ok=True)

    def run(name: str, command: list[str], cap: float) -> StageResult:
        left = deadline - time.perf_counter()
        if left < 10:
            stage = not_run(name, command, "no time left in --time-limit")
        else:
            print(f"[gpu-check] {name} ...", flush=True)
            stage = run_stage(name, command, min(cap, left), config.logs)
            print(f"[gpu-check] {name}: {stage.status} ({stage.seconds:.0f} s)", flush=True)
        result.stages.append(stage)
        return stage

    if "tests" in config.stages:
        run("tests", tests_command(config), 240)
        if config.junit.is_file():
            result.tests = read_junit(config.junit)
    data_dirs: dict[str, Path] = {}
    if "data" in config.stages or "train" in config.stages:
        for task, command in data_commands(config).items():
            stage = run(f"data-{task}", command, 120)
            if stage.status == "ok":
                data_dirs[task] = Path(last_line(config.logs / f"{stage.name}.out"))
    if "train" in config.stages:
        for backbone in BACKBONES:
            name = f"train-{backbone.name}"
            data_dir = data_dirs.get(backbone.task)
            if data_dir is None:
                command = train_command(config, backbone, Path("<data>"))
                result.stages.append(not_run(name, command, f"no {backbone.task} corpus"))
                continue
            run(name, train_command(config, backbone, data_dir), config.train_seconds + 120)
            result.trainings[backbone.name] = read_training(config.runs / backbone.name)
    if "grouped" in config.stages:
        run("grouped", grouped_command(config), 120)
        if config.report("grouped_mm", "md").is_file():
            result.grouped_markdown = config.report("grouped_mm", "md").read_text()
    if "bench" in config.stages:
        budget = deadline - time.perf_counter() - config.bench_reserve
        command = bench_command(config, max(budget, 1))
        if budget < 20:
            result.stages.append(not_run("bench", command, "no time left in --time-limit"))
        else:
            run("bench", command, budget + config.bench_reserve)
        if config.report("bench_moe", "md").is_file():
            result.bench_markdown = config.report("bench_moe", "md").read_text()
    result.seconds = time.perf_counter() - start
    return result


# ----------------------------------------------------------------------------- the summary


def _fmt(value, pattern: str = "{:.3f}") -> str:
    return "n/a" if value is None else pattern.format(value)


def _loss_path(losses: list[float], shown: int = 6) -> str:
    """A few losses evenly spaced from the first logged to the last."""
    if not losses:
        return "n/a"
    if len(losses) > shown:
        picks = sorted({round(i * (len(losses) - 1) / (shown - 1)) for i in range(shown)})
        losses = [losses[i] for i in picks]
    return " → ".join(f"{v:.3f}" for v in losses)


def summary_markdown(result: CheckResult, config: GpuCheckConfig) -> str:
    env = result.environment
    verdict = "every stage passed" if result.ok else "some stages did not pass (below)"
    lines = [
        "# GPU check",
        "",
        f"{env['device'] or 'no CUDA device'} (compute capability {env['capability']}), "
        f"torch {env['torch']}, CUDA {env['cuda']}, Python {env['python']} "
        f"({env['executable']}); torch._grouped_mm {'present' if env['grouped_mm'] else 'absent'}."
        f" {result.seconds:.0f} s of a {result.time_limit:.0f} s limit: {verdict}.",
    ]
    if env["missing_modules"]:
        lines += ["", f"Not importable here: {', '.join(env['missing_modules'])}."]
    lines += ["", "## Stages", "", "| stage | status | seconds | note |", "|---|---|---:|---|"]
    for stage in result.stages:
        note = stage.note or ("" if stage.returncode in (0, None) else f"exit {stage.returncode}")
        lines.append(f"| {stage.name} | {stage.status} | {stage.seconds:.0f} | {note} |")
    lines += ["", f"Each command's output: `{config.logs}/<stage>.out` and `.err`."]

    lines += ["", "## CUDA tests (`pytest tests/cuda`)", ""]
    tests = result.tests
    if tests is None:
        lines.append("No result (see the tests stage).")
    else:
        lines.append(
            f"{tests['tests']} tests: {tests['passed']} passed, {tests['failures']} failed, "
            f"{tests['errors']} errors, {tests['skipped']} skipped ({tests['seconds']:.0f} s)."
        )
        lines += [f"- `{f['test']}`: {f['message']}" for f in tests["failed"]]

    lines += [
        "",
        "## bf16 training of each backbone (`lstm_moe.train --device=cuda --bf16=true`)",
        "",
        f"Each trained for {config.train_seconds:g} s of steps (`--max_seconds`), logged every 20 "
        "steps; tokens/s is the median over the log entries after the first (the first holds "
        "the warm-up); tokens count target tokens.",
        "",
        "| run | task | arch | preset | steps | tokens | loss (logged, first → last) | finite "
        "| tokens/s | valid NLL |",
        "|---|---|---|---|---:|---:|---|---|---:|---:|",
    ]
    for backbone in BACKBONES:
        run = result.trainings.get(backbone.name)
        cells = [backbone.name, backbone.task, backbone.arch, backbone.preset]
        if not run or not run.get("entries"):
            lines.append("| " + " | ".join(cells + ["n/a"] * 6) + " |")
            continue
        cells += [str(run["steps"]), f"{run['tokens']:,}", _loss_path(run["losses"]),
                  "yes" if run["finite"] else "**no**", f"{run['tokens_per_s']:,.0f}",
                  _fmt(run.get("valid_nll"))]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")

    lines += ["", "## Grouped expert product against a dense GEMM (`eval.bench_grouped_mm`)", ""]
    lines.append(result.grouped_markdown.strip() if result.grouped_markdown else "No result.")
    lines += ["", "## MoE layer against its peers (`eval.bench_moe --device cuda`)", ""]
    lines.append(result.bench_markdown.strip() if result.bench_markdown else "No result.")
    failed = [s for s in result.stages if s.status in ("failed", "timed out") and s.output_tail]
    if failed:
        lines += ["", "## Output of the stages that did not pass"]
        for stage in failed:
            lines += ["", f"`{stage.name}` (last lines):", "", "```", stage.output_tail, "```"]
    return "\n".join(lines) + "\n"


def write_summary(result: CheckResult, config: GpuCheckConfig) -> Path:
    """OUT/summary.md, and OUT/summary.json with the same content as data."""
    config.out.mkdir(parents=True, exist_ok=True)
    path = config.out / "summary.md"
    path.write_text(summary_markdown(result, config))
    data = dataclasses.asdict(result)
    data["ok"] = result.ok
    (config.out / "summary.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


# ----------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> tuple[GpuCheckConfig, bool]:
    parser = argparse.ArgumentParser(
        prog="python -m eval.gpu_check",
        description="On one CUDA GPU: the CUDA tests, a short bf16 training of each backbone, "
        "the MoE benchmarks, in one markdown summary (OUT/summary.md).",
    )
    defaults = GpuCheckConfig()
    parser.add_argument("--out", type=Path, default=defaults.out, help=f"({defaults.out})")
    parser.add_argument(
        "--data",
        type=Path,
        default=defaults.data,
        help=f"parent folder of the generated corpora ({defaults.data})",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=defaults.time_limit,
        help=f"seconds for the whole check ({defaults.time_limit:g})",
    )
    parser.add_argument(
        "--train-seconds",
        type=float,
        default=defaults.train_seconds,
        help=f"training steps' seconds per backbone ({defaults.train_seconds:g})",
    )
    parser.add_argument(
        "--bench-experts",
        type=int,
        nargs="+",
        default=list(defaults.bench_experts),
        help="E of the benchmarks",
    )
    parser.add_argument(
        "--stages",
        nargs="+",
        choices=STAGES,
        default=list(STAGES),
        help="the stages to run (all by default)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the commands and exit (needs no GPU)"
    )
    args = parser.parse_args(argv)
    try:
        # Absolute: the stages run from the repository root, wherever this was started.
        config = GpuCheckConfig(
            out=args.out.resolve(), data=args.data.resolve(), time_limit=args.time_limit,
            train_seconds=args.train_seconds, bench_experts=tuple(args.bench_experts),
            stages=tuple(args.stages),
        )  # fmt: skip
    except ValueError as error:
        parser.error(str(error))
    return config, args.dry_run


def planned_commands(config: GpuCheckConfig) -> list[list[str]]:
    """The commands a check runs, in order (the corpora's folders and the benchmark's time
    limit are known only when it runs: shown as placeholders)."""
    commands = []
    if "tests" in config.stages:
        commands.append(tests_command(config))
    if "data" in config.stages or "train" in config.stages:
        commands += list(data_commands(config).values())
    if "train" in config.stages:
        commands += [train_command(config, b, Path(f"<{b.task} corpus>")) for b in BACKBONES]
    if "grouped" in config.stages:
        commands.append(grouped_command(config))
    if "bench" in config.stages:
        commands.append(bench_command(config, config.time_limit))
    return commands


def main(argv: list[str] | None = None) -> int:
    config, dry_run = parse_args(argv)
    if dry_run:
        for command in planned_commands(config):
            print(" ".join(command))
        return 0
    if not torch.cuda.is_available():
        print(
            f"error: eval.gpu_check needs a CUDA GPU, and torch {torch.__version__} "
            f"({sys.executable}) sees none",
            file=sys.stderr,
        )
        return 2
    result = run_check(config)
    path = write_summary(result, config)
    print(f"wrote {path}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
