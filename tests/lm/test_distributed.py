"""Language-model training on 2 gloo ranks (lstm_moe.engine.ranks) equals one process.

The runs draw nothing at random per token, so that one process and 2 ranks must agree: no
dropout, the full softmax, and the router's noise replaced by zeros (tests.ranks.no_noise, in
the test process and in the workers alike); the smooth Load estimator and the gradients of
W_noise still run. Agreement is to 1e-5 (relative): the ranks sum the same numbers in another
order.

One spawn of 2 workers trains every multi-rank run the tests compare, the one-process runs
are trained in the test process; the last test kills (or stops) one of two ranks started as
plain processes and checks that the other exits with an error within --dist_timeout.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from eval.perplexity import main as perplexity_main
from lstm_moe.config import LMConfig
from lstm_moe.fields import apply_overrides
from lstm_moe.moe.parallel import ParallelGroup
from lstm_moe.tasks.lm import LanguageModelTask, LMTaskConfig
from lstm_moe.train import main as train_main
from tests.lm.test_train import SMALL
from tests.ranks import free_port, join, no_noise, run_commands
from tests.runs import TOL, assert_same_metrics, read_metrics

ARGS = [
    *(a for a in SMALL if not a.startswith("--preset=")),
    "--dropout=0.0",
    "--eval_every=10",
    "--eval_tokens=0",
]
COMPARED = ("loss", "aux_loss", "importance", "load", "grad_norm", "cv_load", "fraction_dropped")


def new_run(data: Path, run: Path, max_steps: int, *extra: str) -> list[str]:
    return ["--data", str(data), "--run", str(run), "--preset", "MoE-32", *ARGS,
            f"--max_steps={max_steps}", *extra]  # fmt: skip


CAPACITY = "--capacity_factor=0.5"  # drops tokens: the kept ones must be one process's
SAMPLED = ("--softmax=sampled", "--n_samples=16")  # 16 candidates of a 43-word vocabulary
MICRO = "--micro_batches=2"


def resume(run: Path, max_steps: int) -> list[str]:
    return ["--run", str(run), "--resume", f"--max_steps={max_steps}", "--quiet"]


def worker(rank: int, world: int, port: int, jobs: list[list[str]]) -> None:
    run_commands(rank, world, port, [("lstm_moe.train", argv) for argv in jobs])


@pytest.fixture(scope="module")
def runs(tiny_dataset, tmp_path_factory):
    """one: 1 process, 20 steps (one_at_10: its checkpoint at step 10). two, four: 2 and 4
    ranks, 10 steps. one_then_two: one_at_10 resumed on 2 ranks to 20. two_then_one: two
    resumed by 1 process to 20. four_then_two: four resumed on 2 ranks to 20. capacity_one,
    capacity_two: 1 process and 2 ranks, 10 steps with a capacity factor; sampled_one,
    sampled_two: the same with the sampled softmax; micro_one, micro_two: with a capacity
    factor and 2 micro-batches."""
    root = tmp_path_factory.mktemp("distributed")
    names = ("one", "one_at_10", "two", "one_then_two", "two_then_one", "four", "four_then_two")
    extra = ("capacity_one", "capacity_two", "sampled_one", "sampled_two", "micro_one",
             "micro_two")  # fmt: skip
    paths = {name: root / name for name in (*names, *extra)}
    with no_noise():
        assert train_main(new_run(tiny_dataset, paths["capacity_one"], 10, CAPACITY)) == 0
        assert train_main(new_run(tiny_dataset, paths["sampled_one"], 10, *SAMPLED)) == 0
        assert train_main(new_run(tiny_dataset, paths["micro_one"], 10, CAPACITY, MICRO)) == 0
        assert train_main(new_run(tiny_dataset, paths["one"], 10)) == 0
        shutil.copytree(paths["one"], paths["one_then_two"])
        shutil.copytree(paths["one"], paths["one_at_10"])
        assert train_main(resume(paths["one"], 20)) == 0
    jobs = [new_run(tiny_dataset, paths["four"], 10)]
    mp.spawn(worker, args=(4, free_port(), jobs), nprocs=4, join=True)
    shutil.copytree(paths["four"], paths["four_then_two"])
    jobs = [
        new_run(tiny_dataset, paths["two"], 10),
        resume(paths["one_then_two"], 20),
        resume(paths["four_then_two"], 20),
        new_run(tiny_dataset, paths["capacity_two"], 10, CAPACITY),
        new_run(tiny_dataset, paths["sampled_two"], 10, *SAMPLED),
        new_run(tiny_dataset, paths["micro_two"], 10, CAPACITY, MICRO),
    ]
    mp.spawn(worker, args=(2, free_port(), jobs), nprocs=2, join=True)
    shutil.copytree(paths["two"], paths["two_then_one"])
    with no_noise():
        assert train_main(resume(paths["two_then_one"], 20)) == 0
    return paths


@pytest.mark.distributed
def test_two_and_four_ranks_train_like_one_process(runs):
    assert_same_metrics(runs["two"], runs["one"], range(1, 11), COMPARED)
    assert_same_metrics(runs["four"], runs["one"], range(1, 11), COMPARED)
    assert [e["tokens"] for e in read_metrics(runs["two"])] == [
        e["tokens"] for e in read_metrics(runs["one"]) if e["step"] <= 10
    ]
    shards = sorted(p.name for p in runs["two"].glob("experts-*"))
    assert shards == ["experts-step10-rank0-of2.pt", "experts-step10-rank1-of2.pt"]


@pytest.mark.distributed
def test_with_a_capacity_two_ranks_keep_the_tokens_one_process_keeps(runs):
    assert_same_metrics(runs["capacity_two"], runs["capacity_one"], range(1, 11), COMPARED)
    assert min(e["fraction_dropped"] for e in read_metrics(runs["capacity_one"])) > 0


@pytest.mark.distributed
def test_two_ranks_of_two_micro_batches_keep_what_one_process_of_two_keeps(runs):
    """Each micro-batch is one MoE call over the ranks: with a capacity, 2 ranks keep the
    tokens one process keeps in each of its 2 micro-batches, and carry the same LSTM state."""
    assert_same_metrics(runs["micro_two"], runs["micro_one"], range(1, 11), COMPARED)
    assert min(e["fraction_dropped"] for e in read_metrics(runs["micro_one"])) > 0


@pytest.mark.distributed
def test_with_the_sampled_softmax_two_ranks_score_against_one_process_candidates(runs):
    assert_same_metrics(runs["sampled_two"], runs["sampled_one"], range(1, 11), COMPARED)
    config = json.loads((runs["sampled_one"] / "config.json").read_text())
    assert config["model"]["softmax"] == "sampled"
    # The sampled estimate differs from the exact loss of the same model and batch.
    assert read_metrics(runs["sampled_one"])[0]["loss"] != read_metrics(runs["one"])[0]["loss"]


def resume_worker(rank: int, world: int, port: int, runs: list[str], out: str) -> None:
    """Rank r resumes runs[r]; writes its exit code and error output to out/rank."""
    join(rank, world, port)
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            code = train_main(resume(Path(runs[rank]), 30))
        Path(out, str(rank)).write_text(f"{code}\n{errors.getvalue()}")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_ranks_that_resume_different_checkpoints_stop(runs, tmp_path):
    """Rank 0 sees a checkpoint of step 10, rank 1 one of step 20 (a stale or foreign copy of
    the run folder): both stop with an error instead of training diverging replicas."""
    for name in ("two", "one"):
        shutil.copytree(runs[name], tmp_path / name)
    folders = [str(tmp_path / "two"), str(tmp_path / "one")]
    mp.spawn(resume_worker, args=(2, free_port(), folders, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        code, _, errors = (tmp_path / str(rank)).read_text().partition("\n")
        assert code == "2", errors
        assert "resumed another checkpoint than rank 0" in errors


@pytest.mark.distributed
def test_resume_at_another_number_of_ranks(runs):
    steps = range(1, 21)
    assert_same_metrics(runs["one_then_two"], runs["one"], steps, COMPARED)  # 1 -> 2 ranks
    assert_same_metrics(runs["two_then_one"], runs["one"], steps, COMPARED)  # 2 -> 1
    assert_same_metrics(runs["four_then_two"], runs["one"], steps, COMPARED)  # 4 -> 2
    assert sorted(p.name for p in runs["four_then_two"].glob("experts-*")) == [
        "experts-step20-rank0-of2.pt",
        "experts-step20-rank1-of2.pt",
    ]
    assert not list(runs["two_then_one"].glob("experts-*"))  # saved whole by one process


def evaluate(run: Path, split: str) -> dict:
    assert perplexity_main([str(run), "--split", split, "--batch_size=8"]) == 0
    name = "perplexity.json" if split == "test" else f"perplexity-{split}.json"
    return json.loads((run / "eval" / name).read_text())


@pytest.mark.distributed
def test_multi_rank_checkpoints_evaluate_in_one_process(runs):
    """eval.perplexity reassembles the experts of the shards: the test perplexity equals that
    of the one-process model at the same step (4 -> 1 and 4 -> 2 -> 1 included), and the
    validation loss (8 lanes, the whole split) equals the one the 2 ranks computed together
    at the end of training."""
    pairs = (
        ("two", "one_at_10", 10),
        ("four", "one_at_10", 10),
        ("one_then_two", "one", 20),
        ("four_then_two", "one", 20),
    )
    for got_name, want_name, step in pairs:
        got, want = evaluate(runs[got_name], "test"), evaluate(runs[want_name], "test")
        assert got["step"] == want["step"] == step
        assert got["tokens"] == want["tokens"]
        assert got["nll_per_token"] == pytest.approx(want["nll_per_token"], **TOL), got_name
        got_layer, want_layer = got["moe_layers"][0], want["moe_layers"][0]
        assert got_layer["tokens_per_expert"] == want_layer["tokens_per_expert"]
    valid = evaluate(runs["two"], "valid")
    valid_at_10 = [e for e in read_metrics(runs["two"], "valid") if e["step"] == 10]
    assert valid["nll_per_token"] == pytest.approx(valid_at_10[0]["valid_nll"], **TOL)


def test_the_batch_must_split_evenly_over_the_ranks(tiny_dataset):
    small = dict(vocab_size=43, d_model=8, lstm_hidden=8, n_experts=6, expert_hidden=8)
    model = apply_overrides(LMConfig(), small)
    three = ParallelGroup()
    three.world_size = 3  # what a ParallelGroup of 3 ranks reports
    with pytest.raises(ValueError, match="multiple of the number of ranks"):
        LanguageModelTask(model, LMTaskConfig(batch_size=8), tiny_dataset, three)
    with pytest.raises(ValueError, match="times micro_batches"):
        LanguageModelTask(model, LMTaskConfig(batch_size=8), tiny_dataset, micro_batches=3)


@pytest.mark.distributed
@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_dead_or_hung_rank_stops_the_other_with_an_error(tiny_dataset, tmp_path, fault):
    """Rank 1 is killed (its peer sees the connection close) or stopped (its peer waits
    --dist_timeout seconds): rank 0 exits non-zero with the error, instead of hanging."""
    run, timeout = tmp_path / "run", 5
    port = free_port()
    argv = [sys.executable, "-m", "lstm_moe.train", *new_run(tiny_dataset, run, 100_000)]
    argv += [f"--dist_timeout={timeout}", "--checkpoint_every=1000", "--eval_every=1000"]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")  # fmt: skip
        procs.append(
            subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        )
    try:
        deadline = time.monotonic() + 90
        while not (run / "metrics.jsonl").exists():  # training is under way
            assert time.monotonic() < deadline and procs[0].poll() is None, "training never began"
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        start = time.monotonic()
        _, err = procs[0].communicate(timeout=timeout + 30)
        waited = time.monotonic() - start
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.communicate()
    assert procs[0].returncode not in (0, None)
    assert "rank 0 of 2: a collective failed" in err.decode(), err.decode()[-2000:]
    assert waited < timeout + 15
