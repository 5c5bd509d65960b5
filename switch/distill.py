"""Distilling a sparse model into its dense counterpart (Fedus et al. 2021, Switch §4.2,
Table 6), for either backbone (the LSTM models of lstm_moe, the Transformers of switch/) and
either task (language modelling, translation).

Two techniques of §4.2, both here:

1. "initializing the dense model with the non-expert weights" of the sparse teacher
   (copy_non_expert_weights): every teacher tensor whose name and shape match a student
   parameter or buffer is copied, unless it belongs to an MoE layer (an MoELayer or a routed
   projection, MoEProjection: its experts and its router are never copied).
2. "a mixture of 0.25 for the teacher probabilities and 0.75 for the ground truth label"
   (distillation_loss): the student is trained on the cross entropy against the soft target
   q = w·p_teacher + (1 - w)·onehot(y), w = teacher_weight = 0.25.

The share of the teacher's gain the student keeps (Table 6: 29 % at 1.1B → 223M parameters,
neg. log perplexity -1.580 against -1.636 for the dense model and -1.444 for the teacher) is
kept_share; kept_share_of_runs and `python -m switch.distill share` read it from three
evaluated run folders (eval.perplexity's eval/perplexity.json).

What the copy matches for each pair of presets (by name and shape; checked by
tests/switch/test_distill.py on small widths):
- Transformers (switch/presets.py: transformer-dense vs switch-8/-32, moe-top2-32,
  moe-top4-32; NMT-transformer-dense vs NMT-switch-32 ...): every layer name is shared, so
  everything but the MoE layers' feed-forward blocks is copied: embeddings (tied with the
  softmax), positions, every attention, every LayerNorm, the dense feed-forward layers of the
  layers that are dense in both, the softmax bias. The student's dense feed-forward layers in
  the teacher's MoE positions (layers.1.ffn.w_in ...) keep their initialisation. With
  attention experts (switch-32-attn) the routed Q/K/V projections are not copied either.
- LSTM language models (lstm_moe/presets.py): MoE-32 is embedding, blocks.0 (LSTM),
  blocks.1 (MoE), blocks.2 (LSTM), softmax. Its dense counterpart at equal compute, MoE-1-Wide
  (LSTM, FFN, LSTM), gets the embedding, both LSTMs and the softmax; its FFN (blocks.1.net)
  keeps its init. 4xLSTM-512 gets the embedding, the softmax and the LSTMs at blocks.0 and
  blocks.2 (the teacher's LSTM above the MoE becomes the student's third LSTM); blocks.1 and
  blocks.3 keep their init. Names and shapes match, but the layer at blocks.2 then reads
  another input than it was trained on: the copy is by name, not by function.
- LSTM translation models: NMT-MoE-32 and NMT-dense (its MoE layers replaced by FFNs at the
  same positions) share both embeddings, every LSTM, the attention and the softmax; the
  student's FFNs keep their init.

Index letters: N rows (target tokens), V vocabulary.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from lstm_moe.files import PATH_ERRORS, read_json, write_json_atomic
from lstm_moe.moe import MoELayer, MoEProjection, expert_tensor_names
from lstm_moe.softmax import Softmax

TEACHER_WEIGHT = 0.25  # Switch §4.2: "0.25 of the teacher probabilities"

__all__ = [
    "TEACHER_WEIGHT",
    "WeightCopy",
    "copy_non_expert_weights",
    "distillation_loss",
    "distillation_terms",
    "kept_share",
    "kept_share_of_runs",
    "main",
    "mix_terms",
    "moe_tensor_names",
    "softmax_distillation_terms",
]


# ----------------------------------------------------------------------------- the loss


def distillation_terms(
    log_probs: Tensor, targets: Tensor, teacher_probs: Tensor, label_smoothing: float = 0.0
) -> tuple[Tensor, Tensor]:
    """The two cross entropies the distillation loss mixes, per row.

    log_probs: [N, V] the student's log-probabilities (float32 or wider, with its graph);
    targets: [N] int64 ground-truth ids; teacher_probs: [N, V] the teacher's probabilities
    (no graph). Returns (nll [N], teacher_ce [N]):
      nll = -log p(y), or with label smoothing ε the cross entropy against (1 - ε)·onehot(y)
            + ε/V, as Softmax.nll computes it: -(1 - ε)·log p(y) - ε·mean_v log p(v);
      teacher_ce = -Σ_v p_teacher(v)·log p(v).
    """
    nll = -log_probs.gather(1, targets[:, None])[:, 0]  # [N]
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * log_probs.mean(dim=1)
    teacher_ce = -(teacher_probs.to(log_probs.dtype) * log_probs).sum(dim=1)  # [N]
    return nll, teacher_ce


def distillation_loss(
    log_probs: Tensor,
    targets: Tensor,
    teacher_probs: Tensor,
    teacher_weight: float = TEACHER_WEIGHT,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Switch §4.2's distillation loss per row: the cross entropy of the student against the
    soft target q = w·p_teacher + (1 - w)·onehot(y), "0.25 of the teacher probabilities and
    0.75 of the ground truth label" (w = teacher_weight = 0.25):

        loss = -Σ_v q(v)·log p(v) = (1 - w)·(-log p(y)) + w·(-Σ_v p_teacher(v)·log p(v))

    log_probs: [N, V] the student's log-probabilities; targets: [N] int64; teacher_probs:
    [N, V] the teacher's probabilities. Returns [N]. w = 0 is the plain NLL; label_smoothing
    ε smooths the ground-truth term only (distillation_terms), as the task does without a
    teacher.
    """
    nll, teacher_ce = distillation_terms(log_probs, targets, teacher_probs, label_smoothing)
    return mix_terms(nll, teacher_ce, teacher_weight)


def mix_terms(nll: Tensor, teacher_ce: Tensor, teacher_weight: float = TEACHER_WEIGHT) -> Tensor:
    """(1 - w)·nll + w·teacher_ce: distillation_loss from the terms distillation_terms (or
    softmax_distillation_terms) returns, any shape."""
    if not 0.0 <= teacher_weight <= 1.0:
        raise ValueError(f"teacher_weight must be in [0, 1], got {teacher_weight}")
    return (1.0 - teacher_weight) * nll + teacher_weight * teacher_ce


def softmax_distillation_terms(
    softmax: Softmax,
    hidden: Tensor,
    teacher_softmax: Softmax,
    teacher_hidden: Tensor,
    targets: Tensor,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """distillation_terms over the full softmax of a student and of its teacher, in row
    chunks so that no [N, V] tensor of the whole batch exists at once (as Softmax.nll).

    hidden: [N, D] the student's softmax input; teacher_hidden: [N, D'] the teacher's (no
    graph); targets: [N]. Returns (nll [N], teacher_ce [N]) float32, differentiable in the
    student. The teacher's probabilities are float32 and carry no gradient.
    """
    chunk = softmax.rows_per_chunk
    nll, teacher_ce = [], []
    for h, t_h, y in zip(
        hidden.split(chunk), teacher_hidden.split(chunk), targets.split(chunk), strict=True
    ):
        with torch.no_grad():
            teacher_probs = teacher_softmax.log_probs(t_h.float()).exp()  # [n, V] float32
        log_probs = softmax.log_probs(h)  # [n, V]
        a, b = distillation_terms(log_probs, y, teacher_probs, label_smoothing)
        nll.append(a)
        teacher_ce.append(b)
    if not nll:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(nll), torch.cat(teacher_ce)


# ----------------------------------------------------------------------------- initialisation


@dataclass
class WeightCopy:
    """What copy_non_expert_weights did: copied, the student tensors now equal to the
    teacher's (state-dict names; a tied parameter under its first name); skipped, every other
    name of either model with the reason."""

    copied: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        return f"{len(self.copied)} tensors copied from the teacher, {len(self.skipped)} skipped"


def moe_tensor_names(model: nn.Module) -> set[str]:
    """State-dict names of every tensor inside an MoE layer of `model` (an MoELayer or a
    routed projection, MoEProjection: experts, router and whatever else they hold), and of
    every expert shard (expert_tensor_names)."""
    names = set(expert_tensor_names(model))
    state_names = list(model.state_dict(keep_vars=True))
    for prefix, module in model.named_modules():
        if isinstance(module, MoELayer | MoEProjection):
            start = f"{prefix}." if prefix else ""
            names.update(name for name in state_names if name.startswith(start))
    return names


def _vocab_size(model: nn.Module) -> int | None:
    return getattr(getattr(model, "config", None), "vocab_size", None)


@torch.no_grad()
def copy_non_expert_weights(teacher: nn.Module, student: nn.Module) -> WeightCopy:
    """Initialise `student` with the non-expert weights of `teacher` (Switch §4.2): each
    student parameter and buffer whose name has a tensor of the same shape in the teacher's
    state dict is overwritten with it, unless either model holds that name in an MoE layer
    (moe_tensor_names: expert and router weights are never copied). The student's own tensors
    that the teacher lacks (a dense feed-forward layer where the teacher has its MoE layer)
    keep their initialisation.

    Refuses (ValueError) models of different vocabularies, and a copy that would copy no
    weight matrix (nothing, or vectors only: a student of another family or width may share
    no more than the softmax's bias [V]). Returns the names copied and those skipped, with
    why.
    """
    if _vocab_size(teacher) != _vocab_size(student):
        raise ValueError(
            f"the teacher's vocabulary ({_vocab_size(teacher)} words) is not the student's "
            f"({_vocab_size(student)})"
        )
    source = teacher.state_dict()
    teacher_moe, student_moe = moe_tensor_names(teacher), moe_tensor_names(student)
    report = WeightCopy()
    # named_parameters lists a tied parameter once: it is copied once, under its first name.
    targets = [*student.named_parameters(), *student.named_buffers()]
    seen, matrices = set(), 0
    for name, tensor in targets:
        seen.add(name)
        if name in student_moe:
            report.skipped[name] = "in an MoE layer of the student"
        elif name not in source:
            report.skipped[name] = "not in the teacher"
        elif name in teacher_moe:
            report.skipped[name] = "in an MoE layer of the teacher"
        elif source[name].shape != tensor.shape:
            report.skipped[name] = (
                f"shape {tuple(source[name].shape)} in the teacher, {tuple(tensor.shape)} here"
            )
        else:
            tensor.copy_(source[name])
            report.copied.append(name)
            matrices += tensor.dim() > 1
    student_names = set(student.state_dict())
    for name in source:
        if name in seen or name in student_names:
            continue  # a tied alias of a tensor listed above
        reason = "in an MoE layer of the teacher" if name in teacher_moe else "not in the student"
        report.skipped[name] = reason
    if not matrices:
        raise ValueError(
            "no weight matrix of the teacher outside its MoE layers has the name and shape of "
            f"one of the student's (only {report.copied or 'nothing'} would be copied): the "
            "student is not a dense counterpart of the teacher (another family or width?)"
        )
    return report


# ----------------------------------------------------------------------------- kept share


def kept_share(student: float, dense: float, teacher: float) -> float:
    """The share of the teacher's quality gain over the dense model that the distilled student
    keeps (Switch Table 6, "Percent of Teacher Performance"): (student - dense) / (teacher -
    dense), each the log-perplexity (NLL per token) of the same test set, or its negation as
    Table 6 prints it: the ratio is the same either way. Table 6's 1.1B → 223M row: (-1.580 +
    1.636) / (-1.444 + 1.636) = 0.056 / 0.192 ≈ 0.29."""
    gain = teacher - dense
    if gain == 0:
        raise ValueError(
            f"the teacher ({teacher}) is no better than the dense model ({dense}): no gain to keep"
        )
    return (student - dense) / gain


def _evaluated(run: Path) -> dict:
    path = Path(run) / "eval" / "perplexity.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: evaluate it first (python -m eval.perplexity)")
    result = read_json(path)
    if "nll_per_token" in result:
        nll = float(result["nll_per_token"])
    elif "perplexity" in result:
        nll = math.log(float(result["perplexity"]))
    else:
        raise ValueError(f"{path} has neither nll_per_token nor perplexity")
    return {"path": str(path), "nll_per_token": nll, "result": result}


def kept_share_of_runs(student: Path, dense: Path, teacher: Path) -> dict:
    """kept_share of three evaluated run folders (eval/perplexity.json, from eval.perplexity),
    refusing results of different splits or datasets. Returns {"kept_share", "split",
    "student", "dense", "teacher"}, each run's entry its path, nll_per_token, perplexity and
    neg_log_perplexity (Table 6's column)."""
    runs = {"student": student, "dense": dense, "teacher": teacher}
    results = {role: _evaluated(run) for role, run in runs.items()}
    first = results["student"]["result"]
    for role, entry in results.items():
        result = entry["result"]
        if result.get("split") != first.get("split"):
            raise ValueError(
                f"{entry['path']} is the {result.get('split')!r} split, "
                f"{results['student']['path']} the {first.get('split')!r} one"
            )
        for key in ("recipe_id", "vocab_sha256"):
            theirs = result.get("dataset", {}).get(key)
            if theirs != first.get("dataset", {}).get(key):
                raise ValueError(
                    f"the {role} ({runs[role]}) was evaluated on another dataset than the "
                    f"student ({student}): its {key} differs"
                )
    nll = {role: entry["nll_per_token"] for role, entry in results.items()}
    return {
        "kept_share": kept_share(nll["student"], nll["dense"], nll["teacher"]),
        "split": first.get("split"),
        **{
            role: {
                "run": str(runs[role]),
                "nll_per_token": value,
                "neg_log_perplexity": -value,
                "perplexity": math.exp(value),
            }
            for role, value in nll.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m switch.distill",
        description="Distillation (Switch §4.2): the share of the teacher's gain a student keeps. "
        "Distil with `python -m lstm_moe.train ... --teacher_run=RUN`.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    share = commands.add_parser(
        "share",
        help="(student - dense) / (teacher - dense) on log-perplexity (Switch Table 6)",
        description="The kept share of three run folders evaluated by eval.perplexity on the "
        "same split.",
    )
    share.add_argument("--student", type=Path, required=True, help="the distilled run")
    share.add_argument("--dense", type=Path, required=True, help="the dense model trained alone")
    share.add_argument("--teacher", type=Path, required=True, help="the sparse teacher run")
    share.add_argument("--out", type=Path, help="also write the result here (JSON)")
    args = parser.parse_args(argv)
    try:
        result = kept_share_of_runs(args.student, args.dense, args.teacher)
    except (*PATH_ERRORS, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for role in ("dense", "teacher", "student"):
        entry = result[role]
        print(
            f"{role:8s} {entry['run']}: neg. log perplexity {entry['neg_log_perplexity']:.4f} "
            f"(perplexity {entry['perplexity']:.3f})"
        )
    print(f"kept share of the teacher's gain: {result['kept_share']:.1%} ({result['split']} split)")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, result)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
