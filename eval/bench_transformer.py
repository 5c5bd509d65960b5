"""Transformer LM training speed: tokens/s of each sparse preset (switch/presets.py) against
the dense preset of the same active FLOPs per token, whole training steps (forward, backward,
fused Adam), in one process.

    python -m eval.bench_transformer [--presets transformer-dense switch-32 ...]
        [--batch_size 32] [--bptt 64] [--vocab 10000] [--json OUT] [--markdown OUT]

The models train on uniform random token ids (speed does not depend on what the tokens say),
with the full softmax over --vocab words and the presets' dropout. The table also gives each
preset's fraction of routed pairs that a capacity dropped (3-5 % for the untrained Switch
presets at capacity factor 1.25): a dropped pair costs nothing, so a preset that drops many
looks cheaper than it will be once its router balances the load; the dropless top-4 preset
is the like-for-like one. Transparent huge pages are on, as
in lstm_moe.train (runtime.enable_cpu_hugepages). The presets take turns, round after round,
so that a noisy machine slows all of them alike; the median round is reported, with each
preset's tokens/s over the dense one's.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

from lstm_moe.engine.trainer import adam
from lstm_moe.files import write_json_atomic, write_text_atomic
from lstm_moe.runtime import enable_cpu_hugepages
from switch.presets import TRANSFORMER_LM_PRESETS
from switch.transformer import TransformerLM

DENSE = "transformer-dense"


def build(preset: str, vocab: int, width: int | None, seed: int):
    """The preset at `vocab` words (and `width`, scaling its widths), with its optimizer."""
    config = dataclasses.replace(TRANSFORMER_LM_PRESETS[preset], vocab_size=vocab, softmax="full")
    if width is not None:
        scale = width / config.d_model
        config = dataclasses.replace(
            config,
            d_model=width,
            ffn_hidden=int(config.ffn_hidden * scale),
            moe=dataclasses.replace(
                config.moe, expert_hidden=int(config.moe.expert_hidden * scale)
            ),
        )
    torch.manual_seed(seed)
    model = TransformerLM(config).train()
    return model, adam(list(model.parameters()), lr=1e-4, betas=(0.9, 0.98))


def train_round(model, optimizer, batches: list[torch.Tensor], dropped: list[float] | None = None):
    """Seconds for one training step per batch; each step's fraction of routed pairs that a
    capacity dropped (mean over the MoE layers) is appended to `dropped`, when given."""
    start = time.perf_counter()
    for ids in batches:  # [T, B]
        out = model(ids)
        loss = model.nll(out.hidden, ids).mean() + out.aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if dropped is not None and out.moe:
            dropped.append(sum(float(r.stats.fraction_dropped) for r in out.moe) / len(out.moe))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    enable_cpu_hugepages()  # huge pages for large CPU tensors (runtime.py)
    parser = argparse.ArgumentParser(
        prog="python -m eval.bench_transformer",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "--presets", nargs="+", default=[DENSE, "switch-8", "switch-32", "moe-top2-32"]
    )
    parser.add_argument("--batch_size", type=int, default=32, help="sequences per step")
    parser.add_argument("--bptt", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--vocab", type=int, default=10_000)
    parser.add_argument("--width", type=int, help="d_model (widths scaled alike); the presets'")
    parser.add_argument("--steps", type=int, default=3, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    unknown = [p for p in args.presets if p not in TRANSFORMER_LM_PRESETS]
    if unknown or DENSE not in args.presets:
        print(
            f"error: --presets must include {DENSE} and name presets of "
            f"{list(TRANSFORMER_LM_PRESETS)}; got {args.presets}",
            file=sys.stderr,
        )
        return 2
    generator = torch.Generator().manual_seed(args.seed)
    batches = [
        torch.randint(args.vocab, (args.bptt, args.batch_size), generator=generator)
        for _ in range(args.steps)
    ]
    built = {name: build(name, args.vocab, args.width, args.seed) for name in args.presets}
    for model, optimizer in built.values():  # warm-up: allocator, first-call costs
        train_round(model, optimizer, batches[:1])
    seconds: dict[str, list[float]] = {name: [] for name in args.presets}
    dropped: dict[str, list[float]] = {name: [] for name in args.presets}
    for _ in range(args.rounds):
        for name, (model, optimizer) in built.items():
            seconds[name].append(train_round(model, optimizer, batches, dropped[name]))
    tokens = args.steps * args.batch_size * args.bptt
    rows = []
    for name, (model, _) in built.items():
        rate = tokens / statistics.median(seconds[name])
        rows.append(
            {
                "preset": name,
                "active_ops_per_token": model.ops_per_timestep(),
                "total_params": model.total_params(),
                "tokens_per_s": rate,
                # Dropped pairs compute nothing: a capacity that drops many makes a sparse
                # model look cheaper than it will be once its router balances the load.
                "fraction_dropped": statistics.mean(dropped[name]) if dropped[name] else 0.0,
            }
        )
    dense_rate = next(r["tokens_per_s"] for r in rows if r["preset"] == DENSE)
    for row in rows:
        row["over_dense"] = row["tokens_per_s"] / dense_rate
    lines = [
        f"Transformer LM training, {args.batch_size} × {args.bptt} tokens per step, "
        f"vocabulary {args.vocab}, {torch.get_num_threads()} threads, median of "
        f"{args.rounds} rounds of {args.steps} steps",
        "",
        "| preset | active ops/token | params | tokens/s | ÷ dense | dropped |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['preset']} | {row['active_ops_per_token'] / 1e6:.2f}M | "
            f"{row['total_params'] / 1e6:.1f}M | {row['tokens_per_s']:,.0f} | "
            f"{row['over_dense']:.2f} | {row['fraction_dropped']:.1%} |"
        )
    text = "\n".join(lines) + "\n"
    print(text, end="")
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "markdown")}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.json, {"settings": settings, "rows": rows})
        print(f"wrote {args.json}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.markdown, text)
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
