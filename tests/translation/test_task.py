"""Translation as a task of the engine, end to end on a generated "reverse the words" corpus
(conftest.py): `lstm_moe.train --task translation` lowers the loss and the validation NLL and
records its data; a resumed run equals an uninterrupted one, and --resume refuses other data
and another model; a tiny model learns the corpus, which `eval.translate` measures with BLEU;
2 gloo ranks train and decode as one process does, and a checkpoint they saved is the model
one process trained, loaded whole by `eval.translate`.

The multi-rank runs draw nothing at random per token: no dropout, and the router's noise
replaced by zeros (tests.ranks.no_noise). One spawn of 2 workers runs every multi-rank command
the tests compare; the one-process runs are trained in the test process. Every process runs
one thread: the models are tiny, and a second thread only waits for the first.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from eval.translate import main as translate_main
from lstm_moe.config import NMTConfig
from lstm_moe.fields import config_from_dict
from lstm_moe.files import read_json
from lstm_moe.pairs import read_pairs, read_parallel_meta
from lstm_moe.tasks.translation import (
    TranslationTask,
    TranslationTaskConfig,
    evaluate_pairs,
    load_trained_model,
)
from lstm_moe.train import main as train_main
from tests.lm.conftest import make_dataset
from tests.lm.test_train import train as train_lm
from tests.ranks import free_port, no_noise, run_commands
from tests.runs import TOL, assert_same_metrics, read_metrics
from tests.translation.conftest import make_parallel_dataset

TINY = [
    "--d_model=16",
    "--lstm_hidden=16",
    "--attention_hidden=16",
    "--n_experts=4",
    "--expert_hidden=16",
    "--k=2",
    "--batch_size=16",
    "--dropout=0.0",
    "--lr=0.01",
    "--warmup_steps=10",
    "--log_every=5",
    "--eval_every=10",
    "--checkpoint_every=10",
    "--eval_pairs=0",
    "--quiet",
]
# The model that learns the corpus (TINY with these fields): twice as wide, batches twice as
# large, a higher rate.
LEARNER = [
    "--d_model=32",
    "--lstm_hidden=32",
    "--attention_hidden=32",
    "--expert_hidden=32",
    "--batch_size=32",
    "--lr=0.02",
    "--warmup_steps=50",
    "--log_every=20",
    "--eval_every=100",
    "--checkpoint_every=100",
]
STEPS = 300  # of the learner: sacreBLEU ~40 on the test split (~0 after 5 steps)
EXACT = dict(rel=0.0, abs=0.0)
SHARDS_AT_10 = ["experts-step10-rank0-of2.pt", "experts-step10-rank1-of2.pt"]


def new_run(data: Path, run: Path, max_steps: int, *extra: str) -> list[str]:
    """A later --field=value wins, so `extra` may override TINY."""
    return ["--task", "translation", "--data", str(data), "--run", str(run), "--preset",
            "NMT-MoE-32", *TINY, f"--max_steps={max_steps}", *extra]  # fmt: skip


def resume(run: Path, max_steps: int, *extra: str) -> list[str]:
    return ["--run", str(run), "--resume", f"--max_steps={max_steps}", "--quiet", *extra]


def translate(run: Path, *extra: str) -> int:
    return translate_main([str(run), "--quiet", *extra])


def hypotheses(run: Path) -> list[str]:
    return (run / "eval" / "test.hyp.de").read_text(encoding="utf-8").splitlines()


def copy_run(run: Path, to: Path) -> Path:
    """A run folder without its evaluations, so that what is later found in to/eval is new."""
    shutil.copytree(run, to, ignore=shutil.ignore_patterns("eval"))
    return to


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread per process (the spawned ranks run one each too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def learner(parallel_dataset, tmp_path_factory) -> dict[str, Path]:
    """untrained: the NMT-MoE-32 wiring (strictly balanced gate), small, after 5 steps;
    trained: the same run resumed to STEPS. Both have translated the test split."""
    root = tmp_path_factory.mktemp("learner")
    trained = root / "trained"
    assert train_main(new_run(parallel_dataset, trained, 5, *LEARNER)) == 0
    untrained = copy_run(trained, root / "untrained")
    assert train_main(resume(trained, STEPS)) == 0
    for run in (untrained, trained):
        assert translate(run) == 0
    return {"untrained": untrained, "trained": trained}


@pytest.fixture(scope="module")
def short_run(parallel_dataset, tmp_path_factory) -> Path:
    """5 steps of the tiny model (copy it before resuming it)."""
    run = tmp_path_factory.mktemp("short") / "run"
    assert train_main(new_run(parallel_dataset, run, 5)) == 0
    return run


def test_training_lowers_the_loss_and_the_validation_nll(learner, parallel_dataset):
    run = learner["trained"]
    train, valid = read_metrics(run), read_metrics(run, "valid")
    # The 5-step run's entries (a partial log interval, its last validation) were replaced.
    assert [e["step"] for e in train] == list(range(20, STEPS + 1, 20))
    assert [e["step"] for e in valid] == [100, 200, 300]
    assert train[-1]["loss"] < train[0]["loss"] - 2.0
    nll = [e["valid_nll"] for e in valid]
    assert nll == sorted(nll, reverse=True) and nll[-1] < 1.0  # log(120) = 4.8 is uniform
    meta = read_parallel_meta(parallel_dataset)
    assert {e["valid_tokens"] for e in valid} == {meta["splits"]["valid"]["tgt_tokens"]}
    for layer in ("moe0", "moe1"):  # encoder, decoder
        for stat in ("importance", "load", "threshold", "cv_load", "fraction_dropped"):
            assert f"{layer}_{stat}" in train[-1]
        assert f"{layer}_valid_cv_load" in valid[-1]
    config = read_json(run / "config.json")
    assert config["task"] == "translation" and config["preset"] == "NMT-MoE-32"
    assert config["model"]["moe"]["router"] == "batchwise"
    assert config["model"]["vocab_size"] == meta["vocab"]["size"] == 120
    assert config["train"]["max_steps"] == STEPS
    data = config["data"]
    assert (data["src_lang"], data["tgt_lang"]) == ("en", "de")
    assert data["path"] == str(parallel_dataset.resolve())
    assert data["recipe_id"] == meta["recipe_id"]
    assert data["vocab_sha256"] == meta["vocab"]["sha256"]


def test_resume_is_exact(parallel_dataset, tmp_path):
    """With dropout and the noisy top-k gate: the resumed run continues the random stream."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    random = ("--router=noisy_topk", "--dropout=0.1")
    assert train_main(new_run(parallel_dataset, whole, 20, *random)) == 0
    assert train_main(new_run(parallel_dataset, split, 10, *random)) == 0
    assert train_main(resume(split, 20)) == 0
    assert_same_metrics(split, whole, range(1, 21), train_keys=None, valid_keys=None, tol=EXACT)
    assert [e["step"] for e in read_metrics(split, "valid")] == [10, 20]


def test_resume_refuses_other_data_and_another_model(short_run, parallel_dataset, tmp_path, capsys):
    run = copy_run(short_run, tmp_path / "run")
    other_pair = make_parallel_dataset(tmp_path / "en-fr", tgt_lang="fr")
    other_corpus = make_parallel_dataset(tmp_path / "seed-1", seed=1)
    refused = [
        (["--data", str(other_pair)], "is en→fr, but"),
        (["--data", str(other_corpus)], "is not the dataset"),
        (["--d_model=32"], "['d_model'] differ"),
        (["--router=noisy_topk"], "['router'] differ"),
        (["--batch_size=32"], "cannot change the task fields ['batch_size']"),
        (["--lr=0.5"], "cannot change the training fields ['lr']"),
        (["--task=lm"], "is a 'translation' run, not --task lm"),
    ]
    capsys.readouterr()
    for change, message in refused:
        assert train_main(resume(run, 10, *change)) == 2, change
        assert message in capsys.readouterr().err, change
    assert read_metrics(run)[-1]["step"] == 5  # none of them trained a step
    assert train_main(resume(run, 10, "--eval_pairs=50")) == 0  # resumable

    # The three checks of the task on the record of a run, each refusing one change.
    config = read_json(run / "config.json")
    task = TranslationTask(
        config_from_dict(NMTConfig, config["model"]),
        TranslationTaskConfig(batch_size=16),
        parallel_dataset,
    )
    record = {"data": config["data"]}
    task.check_resume(record, "the run")
    changes = [
        ("src_lang", "fr", "trained on fr→de"),
        ("tgt_lang", "en", "trained on en→en"),
        ("recipe_id", "0" * 12, "is not the dataset the run was trained on"),
        ("vocab_sha256", "0" * 64, "is not the one the run was trained with"),
    ]
    for key, value, message in changes:
        with pytest.raises(ValueError, match=message):
            task.check_resume({"data": {**record["data"], key: value}}, "the run")


def test_a_tiny_model_learns_to_reverse_the_words(learner, parallel_dataset):
    meta = read_parallel_meta(parallel_dataset)
    scores = {}
    for name, run in learner.items():
        out = run / "eval"
        assert len(hypotheses(run)) == meta["splits"]["test"]["pairs"] == 100
        summary = read_json(out / "translate-test.json")
        assert summary["sentences"] == 100 and summary["sentences_per_s"] > 0
        assert summary["step"] == (5 if name == "untrained" else STEPS)
        assert summary["beam"] == 4 and summary["ranks"] == 1
        bleu = read_json(out / "bleu.json")
        assert bleu["sentences"] == 100 and bleu["lang"] == "de"
        signature = bleu["sacrebleu"]["signature"]
        assert signature.startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
        assert "tok:moses-de" in bleu["tokenized"]["signature"]
        scores[name] = bleu["sacrebleu"]["score"]
    assert scores["untrained"] < 5 and scores["trained"] > 25, scores
    # The hypotheses are detokenized: whole words of the corpus, not word pieces.
    references = (parallel_dataset / "test.de").read_text(encoding="utf-8").split()
    trained_words = " ".join(hypotheses(learner["trained"])).split()
    assert sum(w in set(references) for w in trained_words) > 0.9 * len(trained_words)


def test_translate_refuses_what_is_not_a_translation_run(short_run, tmp_path, capsys):
    lm_run = tmp_path / "lm"
    assert train_lm(make_dataset(tmp_path / "lm-data"), lm_run, "--max_steps=2") == 0
    cases = [
        ([str(lm_run)], "is a 'lm' run, not a 'translation' one"),
        ([str(tmp_path / "missing")], "config.json not found"),
        ([str(short_run), "--split", "dev"], "has no split 'dev'"),
    ]
    capsys.readouterr()
    for argv, message in cases:
        assert translate_main([*argv, "--quiet"]) == 2, argv
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (short_run / "eval").exists()


# ----------------------------------------------------------------------------- 2 ranks

CASES = {
    "batchwise": (),  # strictly balanced: each expert takes its top m of the global batch
    "noisy_topk": ("--router=noisy_topk",),
    "micro_batches": ("--micro_batches=2",),  # batchwise, each micro-batch routed globally
}


@pytest.fixture(scope="module")
def ranked(parallel_dataset, learner, tmp_path_factory) -> dict[str, Path]:
    """<case>_one, <case>_two: 10 steps of CASES[case] by 1 process and by 2 ranks.
    trained_one, trained_two: the learner resumed for 10 more steps by 1 process and by 2
    ranks; trained_two translated by the 2 ranks, trained_two_in_one (a copy of trained_two)
    and trained_one by 1 process."""
    root = tmp_path_factory.mktemp("ranks")
    paths = {f"{case}_{n}": root / f"{case}_{n}" for case in CASES for n in ("one", "two")}
    trained_one = copy_run(learner["trained"], root / "trained_one")
    trained_two = copy_run(learner["trained"], root / "trained_two")
    with no_noise():
        for case, extra in CASES.items():
            assert train_main(new_run(parallel_dataset, paths[f"{case}_one"], 10, *extra)) == 0
        assert train_main(resume(trained_one, STEPS + 10)) == 0
    commands = [
        ("lstm_moe.train", new_run(parallel_dataset, paths[f"{case}_two"], 10, *extra))
        for case, extra in CASES.items()
    ]
    commands += [
        ("lstm_moe.train", resume(trained_two, STEPS + 10)),
        ("eval.translate", [str(trained_two), "--quiet"]),
    ]
    mp.spawn(run_commands, args=(2, free_port(), commands), nprocs=2, join=True)
    in_one = copy_run(trained_two, root / "trained_two_in_one")
    assert translate(in_one) == 0
    assert translate(trained_one) == 0
    paths.update(trained_one=trained_one, trained_two=trained_two, trained_two_in_one=in_one)
    return paths


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_train_like_one_process(ranked, case):
    """Every logged number but the clock's (loss, aux_loss, each layer's balancing losses and
    statistics, grad_norm, valid_nll ...) agrees to 1e-5."""
    one, two = ranked[f"{case}_one"], ranked[f"{case}_two"]
    assert_same_metrics(two, one, range(1, 11), train_keys=None, valid_keys=None)
    assert sorted(p.name for p in two.glob("experts-*")) == SHARDS_AT_10
    assert not list(one.glob("experts-*"))
    config = read_json(two / "config.json")
    router = "noisy_topk" if case == "noisy_topk" else "batchwise"
    assert config["model"]["moe"]["router"] == router
    assert config["train"]["micro_batches"] == (2 if case == "micro_batches" else 1)


@pytest.mark.distributed
def test_two_ranks_decode_what_one_process_decodes(ranked):
    """eval.translate on 2 ranks (each decoding its share of the sentences, every decoder step
    an MoE call over both) writes the file one process writes from the same checkpoint."""
    two, one = ranked["trained_two"], ranked["trained_two_in_one"]
    assert hypotheses(two) == hypotheses(one)
    assert len(hypotheses(two)) == 100
    assert read_json(two / "eval" / "translate-test.json")["ranks"] == 2
    assert read_json(one / "eval" / "translate-test.json")["ranks"] == 1
    scores = [read_json(run / "eval" / "bleu.json")["sacrebleu"]["score"] for run in (two, one)]
    assert scores[0] == scores[1]


@pytest.mark.distributed
def test_a_checkpoint_of_two_ranks_is_the_model_one_process_trains(ranked, parallel_dataset):
    """The learner resumed at 2 ranks saved one expert shard per rank; eval.translate in one
    process reassembles them into the model that 1 process trained over the same steps."""
    two, one = ranked["trained_two"], ranked["trained_one"]
    assert sorted(p.name for p in two.glob("experts-*")) == [
        f"experts-step{STEPS + 10}-rank0-of2.pt",
        f"experts-step{STEPS + 10}-rank1-of2.pt",
    ]
    assert_same_metrics(two, one, range(STEPS + 1, STEPS + 11), train_keys=None, valid_keys=None)
    cpu = torch.device("cpu")
    model_two, _, _, _, step_two, _ = load_trained_model(two, cpu)
    model_one, _, _, _, step_one, _ = load_trained_model(one, cpu)
    assert step_two == step_one == STEPS + 10
    want = model_one.state_dict()
    for name, value in model_two.state_dict().items():
        torch.testing.assert_close(value, want[name], rtol=1e-5, atol=1e-6, msg=name)
    test = read_pairs(parallel_dataset, "test")
    nll_two = evaluate_pairs(model_two, test, cpu)["nll_per_token"]
    assert nll_two == pytest.approx(evaluate_pairs(model_one, test, cpu)["nll_per_token"], **TOL)
    assert hypotheses(ranked["trained_two_in_one"]) == hypotheses(one)
