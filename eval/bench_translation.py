"""Translation speed: training tokens/s of the MoE model against the dense model of the same
ops/timestep, and beam search sentences/s at beam 1 and 4.

    python -m eval.bench_translation [--data DIR] [--d_model 64] [--json OUT] [--markdown OUT]

Both models are built at the same width from the presets (NMT-dense with a ReLU layer of
4 · expert_hidden units where NMT-MoE-32 routes each position to k = 4 experts of
expert_hidden, so both spend the same multiply-adds per position) and trained in one process
on the same batches of a prepared parallel folder (by default the generated corpus of
data_prep.synthetic_parallel), the two alternating in rounds so that a noisy machine slows
both alike; the median round is reported.
Decoding translates the first sentences of the valid split with each model (untrained
weights: the search runs to its length bound more often than a trained model's would, so
these are lower bounds on a trained model's sentences/s).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from eval.beam_search import translate_ids
from lstm_moe.engine.trainer import adam
from lstm_moe.fields import apply_overrides
from lstm_moe.files import write_json_atomic, write_text_atomic
from lstm_moe.pairs import read_pairs
from lstm_moe.presets import TRANSLATION_PRESETS
from lstm_moe.runtime import enable_cpu_hugepages
from lstm_moe.tasks.translation import TranslationTask, TranslationTaskConfig


def generated_corpus() -> Path:
    """The tiny generated parallel corpus, prepared (or found) under data/."""
    out = subprocess.run(
        [sys.executable, "-m", "data_prep.synthetic_parallel", "--out", "data", "--preset",
         "tiny", "--no-progress"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return Path(out.strip().splitlines()[-1])


def build(preset: str, data: Path, width: int, expert_hidden: int, batch_size: int, seed: int):
    """The model of a preset at a width, and its task on the data."""
    moe_width = {"expert_hidden": str(expert_hidden)}
    dense_width = {"ffn_hidden": str(4 * expert_hidden)}  # k = 4 experts of expert_hidden
    overrides = {
        "d_model": str(width),
        "lstm_hidden": str(width),
        "attention_hidden": str(width),
        "dropout": "0.1",
        "vocab_size": str(TranslationTask.dataset_overrides(data)["vocab_size"]),
        **(dense_width if preset == "NMT-dense" else moe_width),
    }
    config = apply_overrides(TRANSLATION_PRESETS[preset], overrides)
    task = TranslationTask(config, TranslationTaskConfig(batch_size=batch_size), data, seed=seed)
    torch.manual_seed(seed)
    model = task.build_model()
    return model, task


def train_round(model, task, first_step: int, steps: int) -> float:
    """Tokens/s of `steps` optimizer steps from first_step."""
    optimizer = adam(list(model.parameters()), lr=1e-3, betas=(0.9, 0.999))
    model.train()
    device = torch.device("cpu")
    targets = 0
    start = time.perf_counter()
    for step in range(first_step, first_step + steps):
        batch = task.train_batch(step, 0, 1)
        out = task.forward(model, batch, step, 0, device)
        loss = out.loss_sum / batch.n_targets + out.aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        targets += batch.n_targets
    return targets / (time.perf_counter() - start)


def decode_rate(model, data: Path, sentences: int, beam: int) -> float:
    split = read_pairs(data, "valid")
    count = min(sentences, len(split))
    sources = [np.asarray(split.source(i), dtype=np.int64) for i in range(count)]
    start = time.perf_counter()
    translate_ids(model, sources, torch.device("cpu"), beam, progress=False)
    return count / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    enable_cpu_hugepages()  # huge pages for large CPU tensors (runtime.py)
    parser = argparse.ArgumentParser(
        prog="python -m eval.bench_translation", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--data", type=Path, help="a prepared parallel folder")
    parser.add_argument("--d_model", type=int, default=64, help="width of both models (64)")
    parser.add_argument("--expert_hidden", type=int, default=128, help="experts' width (128)")
    parser.add_argument("--batch_size", type=int, default=64, help="pairs per step (64)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (5)")
    parser.add_argument("--steps", type=int, default=20, help="steps per round (20)")
    parser.add_argument("--sentences", type=int, default=200, help="decoded sentences (200)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = args.data or generated_corpus()
    presets = ("NMT-dense", "NMT-MoE-32")
    models = {
        p: build(p, data, args.d_model, args.expert_hidden, args.batch_size, 1) for p in presets
    }
    rates: dict[str, list[float]] = {p: [] for p in presets}
    for p in presets:  # warm-up
        train_round(*models[p], 0, 3)
    for round_ in range(args.rounds):
        for p in presets:
            rates[p].append(train_round(*models[p], round_ * args.steps, args.steps))
    decoding = {
        p: {beam: decode_rate(models[p][0], data, args.sentences, beam) for beam in (1, 4)}
        for p in presets
    }
    ops = {p: models[p][0].ops_per_timestep()["total"] for p in presets}
    median = {p: statistics.median(rates[p]) for p in presets}
    result = {
        "data": str(data),
        "d_model": args.d_model,
        "expert_hidden": args.expert_hidden,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "ops_per_timestep": ops,
        "train_tokens_per_s": median,
        "train_tokens_per_s_rounds": rates,
        "moe_over_dense": median["NMT-MoE-32"] / median["NMT-dense"],
        "decode_sentences_per_s": decoding,
    }
    lines = [
        f"Translation at width {args.d_model} (experts {args.expert_hidden}, k = 4), batches of "
        f"{args.batch_size} pairs, {torch.get_num_threads()} threads, {data.name}:",
        "",
        "| model | ops/timestep | train tokens/s | beam 1 sentences/s | beam 4 sentences/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for p in presets:
        lines.append(
            f"| {p} | {ops[p] / 1e6:.3f}M | {median[p]:,.0f} | {decoding[p][1]:,.1f} "
            f"| {decoding[p][4]:,.1f} |"
        )
    lines += ["", f"MoE / dense training tokens/s: {result['moe_over_dense']:.2f}", ""]
    print("\n".join(lines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.json, result)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.markdown, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
