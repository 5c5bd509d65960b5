"""The GPU check's driver without a GPU: it refuses to run, its commands are the ones the
check needs, it reads test results and training logs, a stage that fails or runs too long is
reported while the others go on, and the summary gathers it all."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from eval import gpu_check
from eval.gpu_check import (
    BACKBONES,
    CheckResult,
    GpuCheckConfig,
    StageResult,
    main,
    planned_commands,
    read_junit,
    read_training,
    run_check,
    run_stage,
    write_summary,
)


def test_without_cuda_it_refuses_in_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "needs a CUDA GPU" in err
    assert not (tmp_path / "out").exists()


def test_the_commands_run_this_python_and_train_every_backbone_in_bf16_on_cuda(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    commands = planned_commands(GpuCheckConfig(out=tmp_path, data=Path("data").resolve()))
    assert lines == [" ".join(c) for c in commands]
    assert all(c[:2] == [sys.executable, "-m"] for c in commands)
    modules = [c[2] for c in commands]
    assert modules[0] == "pytest" and commands[0][3] == "tests/cuda"
    assert modules[-2:] == ["eval.bench_grouped_mm", "eval.bench_moe"]
    trainings = [c for c in commands if c[2] == "lstm_moe.train"]
    pairs = {(c[c.index("--task") + 1], c[c.index("--arch") + 1]) for c in trainings}
    assert pairs == {("lm", "lstm"), ("lm", "transformer"), ("translation", "lstm"),
                     ("translation", "transformer")}  # fmt: skip
    for command in trainings:
        assert "--device=cuda" in command and "--bf16=true" in command
        assert any(a.startswith("--max_seconds=") for a in command)
    bench = commands[-1]
    assert bench[bench.index("--device") + 1] == "cuda"
    assert bench[bench.index("--dtype") + 1] == "bfloat16"
    experts = [int(e) for e in bench[bench.index("--experts") + 1 : bench.index("--max-seconds")]]
    assert experts[0] == 8 and experts[-1] == 1024


def test_the_training_presets_have_moe_layers_of_their_task_and_arch():
    from lstm_moe.tasks import TASKS
    from lstm_moe.tasks.common import architecture_of

    for backbone in BACKBONES:
        task = TASKS[backbone.task]
        config = task.presets()[backbone.preset]
        assert architecture_of(task.architectures, config) == backbone.arch
        assert config.moe.n_experts > 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--stages", "tests", "--time-limit", "0"], "time_limit must be > 0"),
        (["--bench-experts", "2"], "bench_experts must be >= 4"),
        (["--stages", "nothing"], "invalid choice"),
    ],
)
def test_bad_options_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as error:
        main(argv)
    assert error.value.code == 2 and message in capsys.readouterr().err


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="2" tests="6" time="12.5">
<testcase classname="tests.cuda.test_a" name="test_ok" time="1"/>
<testcase classname="tests.cuda.test_a" name="test_bad" time="1">
<failure message="AssertionError: 0.4 &lt; 0.01">long traceback</failure></testcase>
<testcase classname="tests.cuda.test_b" name="test_broken" time="1">
<error message="RuntimeError: CUDA error: out of memory&#10;more">trace</error></testcase>
<testcase classname="tests.cuda.test_b" name="test_skip" time="0"><skipped message="x"/></testcase>
</testsuite></testsuites>
"""


def test_the_junit_counts_and_failures_are_read(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    result = read_junit(path)
    assert (result["tests"], result["passed"], result["failures"], result["errors"]) == (6, 2, 1, 1)
    assert result["skipped"] == 2 and result["seconds"] == 12.5
    assert [f["test"] for f in result["failed"]] == [
        "tests.cuda.test_a::test_bad",
        "tests.cuda.test_b::test_broken",
    ]
    messages = [f["message"] for f in result["failed"]]  # the first line of each
    assert messages == ["AssertionError: 0.4 < 0.01", "RuntimeError: CUDA error: out of memory"]


def write_metrics(run: Path, losses: list[float], rates: list[float]) -> None:
    run.mkdir(parents=True)
    entries = [
        {"kind": "train", "step": 20 * (i + 1), "tokens": 1000 * (i + 1), "loss": loss,
         "aux_loss": 0.01, "tokens_per_s": rate, "elapsed": 1.5 * (i + 1)}
        for i, (loss, rate) in enumerate(zip(losses, rates, strict=True))
    ]  # fmt: skip
    entries.append({"kind": "valid", "step": 20 * len(losses), "valid_nll": 2.5, "valid_ppl": 12.2})
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))


def test_a_training_log_is_summarised_without_its_warm_up_interval(tmp_path):
    write_metrics(tmp_path / "run", [6.0, 5.0, 4.0, 3.5], [100.0, 900.0, 1000.0, 1100.0])
    result = read_training(tmp_path / "run")
    assert result["steps"] == 80 and result["tokens"] == 4000 and result["entries"] == 4
    assert result["losses"] == [6.0, 5.0, 4.0, 3.5] and result["finite"]
    assert result["tokens_per_s"] == 1000.0  # the median of the last three
    assert result["valid_nll"] == 2.5
    write_metrics(tmp_path / "nan", [6.0, math.nan], [100.0, 200.0])
    assert read_training(tmp_path / "nan")["finite"] is False
    assert read_training(tmp_path / "missing") == {"entries": 0}


def test_a_stage_that_fails_or_runs_too_long_is_reported(tmp_path):
    ok = run_stage("ok", [sys.executable, "-c", "print('folder')"], 60, tmp_path)
    assert ok.status == "ok" and ok.returncode == 0
    assert gpu_check.last_line(tmp_path / "ok.out") == "folder"
    failed = run_stage("bad", [sys.executable, "-c", "raise SystemExit(3)"], 60, tmp_path)
    assert failed.status == "failed" and failed.returncode == 3
    slow = run_stage("slow", [sys.executable, "-c", "import time; time.sleep(30)"], 1, tmp_path)
    assert slow.status == "timed out" and "killed after 1 s" in slow.note


def test_a_failed_stage_does_not_stop_the_check_and_the_summary_is_written(tmp_path):
    """Without a GPU the benchmarks fail at once (their --device cuda is refused): the check
    reports both, keeps going from one to the next, and still writes its summary."""
    config = GpuCheckConfig(out=tmp_path / "out", stages=("grouped", "bench"), time_limit=200)
    result = run_check(config)
    assert [s.name for s in result.stages] == ["grouped", "bench"]
    assert all(s.status == "failed" for s in result.stages) and not result.ok
    text = write_summary(result, config).read_text()
    assert "| grouped | failed |" in text and "sees no CUDA device" in text
    assert json.loads((config.out / "summary.json").read_text())["ok"] is False


def test_the_summary_gathers_tests_trainings_and_benchmarks(tmp_path):
    config = GpuCheckConfig(out=tmp_path)
    write_metrics(tmp_path / "lstm-lm", [6.0, 5.0, 4.0], [10.0, 20000.0, 22000.0])
    env = {"device": "NVIDIA H200", "capability": "9.0", "torch": "2.13.0", "cuda": "12.6",
           "grouped_mm": True, "python": "3.11.9", "executable": "python3",
           "missing_modules": ["sacremoses"]}  # fmt: skip
    result = CheckResult(
        environment=env,
        stages=[
            StageResult("tests", ["pytest"], "ok", 40.0, 0),
            StageResult("train-lstm-lm", ["train"], "ok", 35.0, 0),
            StageResult(
                "train-lstm-nmt",
                ["train"],
                "timed out",
                140.0,
                None,
                "killed after 140 s",
                "Traceback\nRuntimeError: hang",
            ),
            StageResult("bench", ["bench"], "not run", note="no time left in --time-limit"),
        ],
        tests={
            "tests": 40,
            "passed": 39,
            "failures": 1,
            "errors": 0,
            "skipped": 0,
            "seconds": 38.0,
            "failed": [{"test": "t::x", "message": "boom"}],
        },
        trainings={"lstm-lm": read_training(tmp_path / "lstm-lm")},
        grouped_markdown="| N | D |\n|---:|---:|\n| 1 | 2 |\n",
        seconds=300.0,
        time_limit=450.0,
    )
    text = write_summary(result, config).read_text()
    assert text.startswith("# GPU check\n")
    assert "NVIDIA H200 (compute capability 9.0), torch 2.13.0, CUDA 12.6" in text
    assert "Not importable here: sacremoses." in text
    assert "| train-lstm-nmt | timed out | 140 | killed after 140 s |" in text
    assert "| bench | not run | 0 | no time left in --time-limit |" in text
    assert "40 tests: 39 passed, 1 failed, 0 errors, 0 skipped (38 s)." in text
    assert "- `t::x`: boom" in text
    row = "| lstm-lm | lm | lstm | MoE-32 | 60 | 3,000 | 6.000 → 5.000 → 4.000 | yes | 21,000 |"
    assert row + " 2.500 |" in text
    assert "| transformer-nmt | translation | transformer | NMT-switch-32 | n/a |" in text
    assert "| N | D |" in text
    assert "RuntimeError: hang" in text  # the tail of what did not pass
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] is False and summary["trainings"]["lstm-lm"]["steps"] == 60
