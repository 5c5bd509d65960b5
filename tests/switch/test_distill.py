"""Distillation (switch/distill.py; Switch §4.2, Table 6): the mixed loss on a hand-worked
case, against plain NLL and an analytic gradient; the initialisation from the teacher's
non-expert weights; the kept share on Table 6's numbers; the refusals; and end to end from
the command line: a sparse teacher, a dense student distilled from it and resumed, evaluated,
and the share it keeps."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import lstm_moe.softmax
from eval.perplexity import main as perplexity_main
from lstm_moe.lm import LanguageModel
from lstm_moe.moe import MoEConfig
from lstm_moe.nmt import TranslationModel
from lstm_moe.presets import PRESETS, TRANSLATION_PRESETS
from lstm_moe.softmax import Softmax
from lstm_moe.tasks.lm import LanguageModelTask, LMTaskConfig, load_trained_model
from lstm_moe.train import main as train_main
from switch.config import TransformerLMConfig
from switch.distill import (
    copy_non_expert_weights,
    distillation_loss,
    distillation_terms,
    kept_share,
    kept_share_of_runs,
    softmax_distillation_terms,
)
from switch.distill import main as distill_main
from switch.transformer import TransformerLM
from tests.lm.conftest import make_dataset
from tests.ranks import free_port, run_commands
from tests.runs import assert_same_metrics, read_metrics

# ----------------------------------------------------------------------------- the loss


def test_the_mixture_on_a_hand_worked_example():
    # V = 3, one position, target y = 0. Student p = (1/2, 1/4, 1/4); teacher (0.2, 0.6, 0.2).
    #   -log p(y)        = ln 2                                       = 0.693147
    #   -Σ p_t log p     = 0.2 ln 2 + 0.6 · 2 ln 2 + 0.2 · 2 ln 2 = 1.8 ln 2 = 1.247665
    #   w = 0.25: 0.75 · ln 2 + 0.25 · 1.8 ln 2                  = 1.2 ln 2 = 0.831777
    # The same as the cross entropy against q = 0.25·p_t + 0.75·onehot = (0.8, 0.15, 0.05):
    #   0.8 ln 2 + 0.15 · 2 ln 2 + 0.05 · 2 ln 2 = 1.2 ln 2.
    log_probs = torch.tensor([[0.5, 0.25, 0.25]]).log()
    teacher = torch.tensor([[0.2, 0.6, 0.2]])
    target = torch.tensor([0])
    nll, teacher_ce = distillation_terms(log_probs, target, teacher)
    assert float(nll) == pytest.approx(0.693147, abs=1e-6)
    assert float(teacher_ce) == pytest.approx(1.247665, abs=1e-6)
    loss = distillation_loss(log_probs, target, teacher)  # teacher_weight 0.25 by default
    assert float(loss) == pytest.approx(1.2 * math.log(2), abs=1e-6)
    assert float(loss) == pytest.approx(0.831777, abs=1e-6)
    soft = torch.tensor([[0.8, 0.15, 0.05]])
    assert float(loss) == pytest.approx(float(-(soft * log_probs).sum()), abs=1e-6)
    assert float(distillation_loss(log_probs, target, teacher, 1.0)) == pytest.approx(1.247665)


def test_teacher_weight_zero_is_the_plain_nll_smoothed_or_not():
    torch.manual_seed(0)
    logits, targets = torch.randn(7, 11), torch.randint(11, (7,))
    teacher = torch.softmax(torch.randn(7, 11), dim=-1)
    log_probs = torch.log_softmax(logits, dim=-1)
    for smoothing in (0.0, 0.1):
        plain = F.cross_entropy(logits, targets, reduction="none", label_smoothing=smoothing)
        got = distillation_loss(log_probs, targets, teacher, 0.0, smoothing)
        torch.testing.assert_close(got, plain)
    with pytest.raises(ValueError, match="teacher_weight"):
        distillation_loss(log_probs, targets, teacher, 1.5)


def test_the_gradient_is_softmax_minus_the_soft_target():
    # ∂/∂logits of -Σ q log softmax(logits) is softmax(logits) - q, q = w·p_t + (1 - w)·onehot.
    torch.manual_seed(1)
    logits = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(9, (5,))
    teacher = torch.softmax(torch.randn(5, 9, dtype=torch.float64), dim=-1)
    loss = distillation_loss(torch.log_softmax(logits, -1), targets, teacher, 0.25).sum()
    (grad,) = torch.autograd.grad(loss, logits)
    soft = 0.25 * teacher + 0.75 * F.one_hot(targets, 9).double()
    torch.testing.assert_close(grad, torch.softmax(logits, -1).detach() - soft)

    def mixed(x):
        return distillation_loss(torch.log_softmax(x, -1), targets, teacher, 0.25, 0.1)

    assert torch.autograd.gradcheck(mixed, (logits,))


def test_the_chunked_softmax_terms_equal_the_whole_batch_and_the_softmax_nll(monkeypatch):
    torch.manual_seed(2)
    student, teacher = Softmax(6, 13), Softmax(8, 13)
    hidden, teacher_hidden = torch.randn(10, 6), torch.randn(10, 8)
    targets = torch.randint(13, (10,))
    log_probs = torch.log_softmax(student.logits(hidden), -1)
    teacher_probs = torch.softmax(teacher.logits(teacher_hidden), -1)
    want = distillation_terms(log_probs, targets, teacher_probs, 0.1)
    monkeypatch.setattr(lstm_moe.softmax, "_LOGITS_PER_CHUNK", 3 * 13)  # chunks of 3 rows
    assert student.rows_per_chunk == 3
    nll, teacher_ce = softmax_distillation_terms(
        student, hidden, teacher, teacher_hidden, targets, 0.1
    )
    torch.testing.assert_close(nll, want[0])
    torch.testing.assert_close(teacher_ce, want[1])
    torch.testing.assert_close(nll, student.nll(hidden, targets, 0.1))


# ----------------------------------------------------------------------------- the copy

VOCAB = 20


def transformer(moe_layers: tuple[int, ...], seed: int) -> TransformerLM:
    torch.manual_seed(seed)
    moe = MoEConfig(d_model=16, n_experts=4, expert_hidden=16, k=1, router="switch")
    config = TransformerLMConfig(
        vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2, ffn_hidden=16, moe=moe,
        moe_layers=moe_layers, softmax="full",
    )  # fmt: skip
    return TransformerLM(config)


def test_the_student_gets_every_non_expert_weight_and_keeps_its_own_ffn():
    teacher, student = transformer((1,), seed=0), transformer((), seed=1)
    fresh = {k: v.clone() for k, v in student.state_dict().items()}
    report = copy_non_expert_weights(teacher, student)
    source, now = teacher.state_dict(), student.state_dict()
    for name in report.copied:
        torch.testing.assert_close(now[name], source[name], rtol=0, atol=0)
    # Everything outside the FFN of layer 1 came from the teacher, tied embedding included.
    assert "embed.tokens.weight" in report.copied and "layers.0.ffn.w_in.weight" in report.copied
    assert {n for n in now if not n.startswith("layers.1.ffn.")} <= set(report.copied) | {
        "softmax.weight"  # tied to embed.tokens.weight, copied under that name
    }
    # The student's dense FFN where the teacher has its MoE layer keeps its initialisation.
    for name in ("layers.1.ffn.w_in.weight", "layers.1.ffn.w_out.weight"):
        torch.testing.assert_close(now[name], fresh[name], rtol=0, atol=0)
        assert report.skipped[name] == "not in the teacher"
    # Expert and router tensors are never copied: they are reported as the teacher's MoE's.
    moe = [n for n in source if n.startswith("layers.1.ffn.moe.")]
    assert any("router" in n for n in moe) and any("experts" in n for n in moe)
    assert all(report.skipped[n] == "in an MoE layer of the teacher" for n in moe)


def test_an_moe_layer_of_the_student_is_never_overwritten():
    teacher, student = transformer((1,), seed=0), transformer((1,), seed=1)
    fresh = {k: v.clone() for k, v in student.state_dict().items()}
    report = copy_non_expert_weights(teacher, student)
    for name, value in student.state_dict().items():
        if name.startswith("layers.1.ffn.moe."):
            assert name not in report.copied
            torch.testing.assert_close(value, fresh[name], rtol=0, atol=0)


def test_the_lstm_copy_matches_what_the_module_docstring_says():
    def small(name: str) -> LanguageModel:
        config = PRESETS[name]
        config = dataclasses.replace(
            config, vocab_size=VOCAB, d_model=8, lstm_hidden=8, ffn_hidden=(8,),
            moe=dataclasses.replace(config.moe, n_experts=4, expert_hidden=8),
        )  # fmt: skip
        return LanguageModel(config)

    teacher = small("MoE-32")
    four = copy_non_expert_weights(teacher, small("4xLSTM-512"))
    modules = {name.rsplit(".", 1)[0] for name in four.copied}
    assert modules == {"embedding", "blocks.0.lstm", "blocks.2.lstm", "softmax"}
    wide = copy_non_expert_weights(teacher, small("MoE-1-Wide"))
    assert {name.rsplit(".", 1)[0] for name in wide.copied} == modules
    assert wide.skipped["blocks.1.net.0.weight"] == "not in the teacher"
    # Translation: NMT-dense has an FFN where NMT-MoE-32 has each MoE layer; all else is shared.
    nmt = {}
    for name in ("NMT-MoE-32", "NMT-dense"):
        config = TRANSLATION_PRESETS[name]
        nmt[name] = TranslationModel(dataclasses.replace(
            config, vocab_size=VOCAB, d_model=8, lstm_hidden=8, attention_hidden=8,
            ffn_hidden=(8,), moe=dataclasses.replace(config.moe, n_experts=4, expert_hidden=8),
        ))  # fmt: skip
    report = copy_non_expert_weights(nmt["NMT-MoE-32"], nmt["NMT-dense"])
    kept = {n.rsplit(".", 1)[0] for n, why in report.skipped.items() if why == "not in the teacher"}
    assert kept == {"encoder.2.net.0", "encoder.2.net.2", "decoder.1.net.0", "decoder.1.net.2"}
    assert all(".moe." in n for n, why in report.skipped.items() if "teacher" in why and
               why != "not in the teacher")  # fmt: skip
    assert {"src_embedding.weight", "tgt_embedding.weight", "attention.v"} <= set(report.copied)


def test_the_copy_refuses_another_vocabulary_and_a_student_that_shares_nothing():
    teacher = transformer((1,), seed=0)
    other = TransformerLM(dataclasses.replace(teacher.config, vocab_size=VOCAB + 1))
    with pytest.raises(ValueError, match="vocabulary"):
        copy_non_expert_weights(teacher, other)
    # Another family and width: only the softmax's bias [V] has a name and shape in common.
    lstm = LanguageModel(dataclasses.replace(PRESETS["4xLSTM-512"], vocab_size=VOCAB, d_model=8))
    with pytest.raises(ValueError, match=r"only \['softmax\.bias'\].*not a dense counterpart"):
        copy_non_expert_weights(teacher, lstm)


# ----------------------------------------------------------------------------- kept share


def test_the_kept_share_of_switch_table_6():
    # Table 6, 1.1B teacher → 223M student: neg. log perplexity dense -1.636, teacher -1.444,
    # distilled -1.580: (-1.580 + 1.636) / (-1.444 + 1.636) = 0.056 / 0.192 = 0.2917 ("29%").
    assert kept_share(-1.580, -1.636, -1.444) == pytest.approx(0.056 / 0.192)
    assert kept_share(-1.580, -1.636, -1.444) == pytest.approx(0.29, abs=0.005)
    assert kept_share(1.580, 1.636, 1.444) == pytest.approx(0.2917, abs=1e-4)  # either sign
    with pytest.raises(ValueError, match="no gain"):
        kept_share(1.5, 1.6, 1.6)


def evaluated(folder: Path, nll: float, split: str = "test", recipe: str = "r") -> Path:
    (folder / "eval").mkdir(parents=True)
    result = {
        "nll_per_token": nll,
        "perplexity": math.exp(nll),
        "split": split,
        "dataset": {"recipe_id": recipe, "vocab_sha256": "v"},
    }
    (folder / "eval" / "perplexity.json").write_text(json.dumps(result))
    return folder


def test_the_kept_share_of_three_run_folders_and_its_command(tmp_path, capsys):
    student = evaluated(tmp_path / "student", 1.580)
    dense = evaluated(tmp_path / "dense", 1.636)
    teacher = evaluated(tmp_path / "teacher", 1.444)
    result = kept_share_of_runs(student, dense, teacher)
    assert result["kept_share"] == pytest.approx(0.2917, abs=1e-4)
    assert result["teacher"]["neg_log_perplexity"] == pytest.approx(-1.444)
    out = tmp_path / "share.json"
    argv = ["share", "--student", str(student), "--dense", str(dense), "--teacher", str(teacher)]
    assert distill_main([*argv, "--out", str(out)]) == 0
    assert "29.2%" in capsys.readouterr().out
    assert json.loads(out.read_text())["kept_share"] == pytest.approx(result["kept_share"])
    other = evaluated(tmp_path / "valid", 1.5, split="valid")
    assert distill_main(["share", "--student", str(other), *argv[3:]]) == 2
    assert "split" in capsys.readouterr().err
    elsewhere = evaluated(tmp_path / "elsewhere", 1.5, recipe="q")
    with pytest.raises(ValueError, match="another dataset"):
        kept_share_of_runs(student, elsewhere, teacher)
    assert distill_main(["share", "--student", str(tmp_path), *argv[3:]]) == 2


# ----------------------------------------------------------------------------- from the CLI

LSTM = ["--d_model=16", "--lstm_hidden=16", "--n_experts=4", "--k=2", "--expert_hidden=16",
        "--ffn_hidden=32", "--softmax=full", "--dropout=0.0", "--batch_size=8", "--bptt=10",
        "--warmup_steps=5", "--lr=0.01", "--eval_every=5", "--checkpoint_every=5",
        "--log_every=5", "--eval_tokens=200", "--quiet"]  # fmt: skip


def train(data: Path, run: Path, preset: str, *extra: str) -> int:
    return train_main(["--data", str(data), "--run", str(run), "--preset", preset, *LSTM, *extra])


@pytest.fixture(scope="module")
def teacher_run(tiny_dataset, tmp_path_factory) -> Path:
    """A tiny sparse LSTM language model (MoE-32 at width 16), trained for 30 steps."""
    run = tmp_path_factory.mktemp("teacher") / "teacher"
    assert train(tiny_dataset, run, "MoE-32", "--max_steps=30") == 0
    return run


def test_the_task_trains_on_the_mixture_and_reports_the_ground_truth_nll(tiny_dataset, teacher_run):
    config = dataclasses.replace(PRESETS["MoE-1-Wide"], softmax="full", dropout=0.0)
    config = dataclasses.replace(
        config, **LanguageModelTask.dataset_overrides(tiny_dataset), d_model=16,
        lstm_hidden=16, ffn_hidden=(32,), moe=dataclasses.replace(config.moe, d_model=16),
    )  # fmt: skip
    task = LanguageModelTask(
        config, LMTaskConfig(batch_size=8, bptt=10, teacher_run=str(teacher_run)), tiny_dataset
    )
    torch.manual_seed(0)
    student = task.build_model()
    teacher = load_trained_model(teacher_run, torch.device("cpu"))[0]
    for name in task.teacher.copy.copied:
        torch.testing.assert_close(student.state_dict()[name], teacher.state_dict()[name])
    batch = task.train_batch(0, 0, 1)
    out = task.forward(student.train(), batch, 0, 0, torch.device("cpu"))
    assert not task.teacher.model.training
    assert not any(p.requires_grad for p in task.teacher.model.parameters())
    # By hand: the student's and the teacher's full softmax on the same window.
    hidden = student(batch.inputs).hidden
    taught = teacher(batch.inputs).hidden
    log_probs = torch.log_softmax(student.softmax.logits(hidden.reshape(-1, 16)), -1)
    teacher_probs = torch.softmax(teacher.softmax.logits(taught.reshape(-1, 16)), -1)
    targets = batch.targets.reshape(-1)
    want = distillation_loss(log_probs, targets, teacher_probs, 0.25).sum().detach()
    torch.testing.assert_close(out.loss_sum, want)
    torch.testing.assert_close(out.reported_sum, student.nll(hidden, batch.targets).sum())
    assert float(out.stats["distill_loss"]) == pytest.approx(float(want) / targets.numel())
    assert task.state_dict()["teacher_lstm_state"] is not None  # carried like the student's


def test_distillation_refuses_a_sampled_softmax_and_another_dataset(
    tiny_dataset, teacher_run, tmp_path, capsys
):
    distil = f"--teacher_run={teacher_run}"
    assert train(tiny_dataset, tmp_path / "a", "MoE-1-Wide", "--softmax=sampled",
                 "--n_samples=8", distil, "--max_steps=1") == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "full softmax" in err and len(err.strip().splitlines()) == 1
    other = make_dataset(tmp_path / "other", seed=1)
    assert train(other, tmp_path / "b", "MoE-1-Wide", distil, "--max_steps=1") == 2
    err = capsys.readouterr().err
    assert "teacher run" in err and len(err.strip().splitlines()) == 1


def test_distil_resume_evaluate_and_the_kept_share(tiny_dataset, teacher_run, tmp_path, capsys):
    teacher_run = Path(shutil.copytree(teacher_run, tmp_path / "teacher"))  # trained on below
    distil = f"--teacher_run={teacher_run}"
    dense, whole, split = tmp_path / "dense", tmp_path / "whole", tmp_path / "split"
    assert train(tiny_dataset, dense, "MoE-1-Wide", "--max_steps=20") == 0
    assert train(tiny_dataset, whole, "MoE-1-Wide", distil, "--max_steps=20") == 0
    assert "11 tensors copied from the teacher, 6 skipped" in capsys.readouterr().err
    assert train(tiny_dataset, split, "MoE-1-Wide", distil, "--max_steps=10") == 0
    # The resume takes the teacher from the run's config, and continues exactly: the teacher's
    # LSTM state and the student's are in the checkpoint.
    assert train_main(["--run", str(split), "--resume", "--max_steps=20", "--quiet"]) == 0
    assert_same_metrics(split, whole, range(1, 21), train_keys=None)
    entry = read_metrics(whole)[-1]
    assert {"loss", "ppl", "distill_loss", "teacher_ce"} <= set(entry)
    assert entry["ppl"] == pytest.approx(math.exp(entry["loss"]))  # the ground-truth NLL's
    config = json.loads((whole / "config.json").read_text())
    assert config["task_config"]["teacher_run"] == str(teacher_run.resolve())
    assert "softmax.weight" in config["teacher"]["copied"]
    # Neither the teacher nor its weight can change on --resume.
    for change in ("--teacher_weight=0.5", f"--teacher_run={dense}"):
        assert train_main(["--run", str(split), "--resume", change, "--quiet"]) == 2
        assert "teacher" in capsys.readouterr().err
    # The teacher's run cannot change under a distillation: here, trained on.
    assert train_main(["--run", str(teacher_run), "--resume", "--max_steps=35", "--quiet"]) == 0
    assert train_main(["--run", str(split), "--resume", "--max_steps=25", "--quiet"]) == 2
    assert "distilled from its step 30" in capsys.readouterr().err
    for run in (dense, whole, teacher_run):
        assert perplexity_main([str(run)]) == 0
    result = kept_share_of_runs(whole, dense, teacher_run)
    assert math.isfinite(result["kept_share"]) and result["split"] == "test"


FAMILIES = {  # a sparse teacher and its dense counterpart, small
    "transformer-lm": (("switch-8", "transformer-dense"),
                       ["--d_model=16", "--n_heads=2", "--ffn_hidden=16", "--softmax=full",
                        "--batch_size=8", "--bptt=10", "--eval_tokens=200"]),
    "lstm-nmt": (("NMT-MoE-32", "NMT-dense"),
                 ["--d_model=16", "--lstm_hidden=16", "--attention_hidden=16", "--batch_size=8",
                  "--eval_pairs=20", "--label_smoothing=0.1", "--ffn_hidden=16"]),
    "transformer-nmt": (("NMT-switch-8", "NMT-transformer-dense"),
                        ["--d_model=16", "--n_heads=2", "--ffn_hidden=16", "--batch_size=8",
                         "--eval_pairs=20"]),
}  # fmt: skip
FAMILY_COMMON = ["--n_experts=4", "--expert_hidden=16", "--dropout=0.0", "--lr=0.01",
                 "--warmup_steps=2", "--log_every=1", "--eval_every=2", "--checkpoint_every=2",
                 "--quiet"]  # fmt: skip


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_distils_and_resumes(family, tiny_dataset, parallel_dataset, tmp_path):
    (sparse, dense), options = FAMILIES[family]
    data = parallel_dataset if family.endswith("nmt") else tiny_dataset
    teacher, student = tmp_path / "teacher", tmp_path / "student"

    def run(folder, preset, *extra):
        argv = ["--data", str(data), "--run", str(folder), "--preset", preset, *options]
        return train_main([*argv, *FAMILY_COMMON, *extra])

    assert run(teacher, sparse, "--max_steps=2") == 0
    assert run(student, dense, f"--teacher_run={teacher}", "--max_steps=2") == 0
    assert train_main(["--run", str(student), "--resume", "--max_steps=3", "--quiet"]) == 0
    entries = read_metrics(student)
    assert [e["step"] for e in entries] == [1, 2, 3]
    assert all(e["distill_loss"] > 0 and e["teacher_ce"] > 0 for e in entries)
    copied = json.loads((student / "config.json").read_text())["teacher"]["copied"]
    assert copied and not any(".moe." in name for name in copied)
    assert perplexity_main([str(student)]) == 0


def distil_worker(rank: int, world: int, port: int, jobs: list[list[str]]) -> None:
    run_commands(rank, world, port, [("lstm_moe.train", argv) for argv in jobs])


@pytest.mark.distributed
def test_two_ranks_distil_like_one_process(tiny_dataset, teacher_run, tmp_path):
    """Each rank runs the whole teacher on its lanes, its LSTM state carried per lane: 2 ranks
    equal one process, from the start and resumed from a one-process checkpoint (the
    teacher's state gathered, then cut again)."""
    distil = f"--teacher_run={teacher_run}"
    one, two, one_then_two = tmp_path / "one", tmp_path / "two", tmp_path / "one_then_two"
    assert train(tiny_dataset, one, "MoE-1-Wide", distil, "--max_steps=10") == 0
    assert train(tiny_dataset, one_then_two, "MoE-1-Wide", distil, "--max_steps=5") == 0
    jobs = [
        ["--data", str(tiny_dataset), "--run", str(two), "--preset", "MoE-1-Wide", *LSTM,
         distil, "--max_steps=10"],
        ["--run", str(one_then_two), "--resume", "--max_steps=10", "--quiet"],
    ]  # fmt: skip
    mp.spawn(distil_worker, args=(2, free_port(), jobs), nprocs=2, join=True)
    keys = ("loss", "distill_loss", "teacher_ce", "grad_norm")
    assert_same_metrics(two, one, range(1, 11), keys)
    assert_same_metrics(one_then_two, one, range(1, 11), keys)
