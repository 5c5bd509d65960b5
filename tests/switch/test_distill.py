"""Distillation (switch/distill.py; Switch §4.2, Table 6): the mixed loss on a hand-worked
case, against plain NLL and an analytic gradient; the initialisation from the teacher's
non-expert weights; the kept share on Table 6's numbers, and its refusals."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lstm_moe.softmax
from lstm_moe.lm import LanguageModel
from lstm_moe.moe import MoEConfig
from lstm_moe.presets import PRESETS
from lstm_moe.softmax import Softmax
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
