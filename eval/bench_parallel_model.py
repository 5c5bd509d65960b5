"""Benchmark: the all-to-all volume of whole language models trained with their experts sharded
over W gloo ranks (Shazeer et al. 2017, §3.1), by router: Switch top-1 under a capacity
(`switch-32`) against the 2017 noisy top-4, dropless (`moe-top4-32`), and the LSTM MoE-32.

For each world size the driver starts W processes; each builds every model of --models from
the same seed (so rank r holds experts [r·E/W, (r+1)·E/W) of every MoE layer of one model) and
trains it --steps steps on its own uniform random tokens (--batch-size sequences of --bptt):
forward, the LM loss plus the auxiliary losses, backward, the replicated gradients summed over
ranks, an Adam step. torch.distributed.all_to_all_single is wrapped in each worker
(bench_parallel.AllToAllMeter), and so is the dispatch (lstm_moe.moe.parallel.mix_experts),
to read how many of this rank's rows went to which rank; neither module is changed.

What one step sends. In each MoE layer, rank r sends the rows of its own tokens kept for an
expert held by another rank (out_r), gets back their outputs, and returns the outputs of the
rows others sent it (in_r); the backward sends the gradients of both along the same routes.
That is four calls per MoE layer and 2·(out_r + in_r) rows of D float32 values, 4·D bytes each;
rows for the rank's own experts are a local copy and are not counted. Over the ranks
Σ out_r = Σ in_r, so per rank and token, summed over the L MoE layers:

    bytes per token = 4 calls · 4·D bytes · ρ · φ · L

ρ: rows kept per token and layer, exactly k when dropless, 1 − (dropped fraction) for top-1
under a capacity; φ: the share of kept rows whose expert is on another rank, (W − 1)/W in
expectation when routing is balanced (as near initialisation). Hence at equal D and L

    k=1 / k=4 = (ρ₁ / ρ₄) · (φ₁ / φ₄) = (1 − dropped₁)/4 · φ₁/φ₄ ≈ 0.25 · (1 − dropped₁).

Dropped pairs are never sent, and the capacity pads nothing: the split sizes are the exact
counts, so of a rank's T tokens top-1 at capacity factor 1.25 dispatches at most T rows a
layer, where dropless top-4 dispatches exactly 4T (a layout of fixed [E, C, D] buffers, as
GShard's, would exchange E·C ≈ 1.25·T rows whatever is kept). With --dropless no layer has a
capacity, and ρ₁/ρ₄ is exactly 1/4.

Measured, per step, for each model and W:
  a2a calls         all_to_all_single calls per step and rank: 4 per MoE layer, 0 at W = 1.
  bytes_sent_per_rank   bytes a rank sends through them, averaged over ranks and steps.
  bytes_per_token   that over the rank's tokens (--batch-size · --bptt).
  rows_per_token    ρ, from the MoE layers' own statistics (rows each expert computed, over
                    the global batch), averaged over layers and steps; dropped likewise.
  off_rank_share    φ, from the dispatch: Σ out_r over the rows kept.
  matches_routing   every rank's bytes at every step equal 4·D·2·(out_r + in_r) summed over
                    its MoE layers, from the dispatch's counts.
Not counted: the all-gather of token counts, the routers' all-reduces, the gradient all-reduce
of the replicated weights (collectives other than the all-to-all). No times: this measures
volume; eval.bench_parallel times the layer.

    python -m eval.bench_parallel_model --json bench/bench_parallel_model.json \\
        --markdown bench/bench_parallel_model.md

Exit status: 2 for a bad option (checked before any rank starts), 1 if a world size failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from eval.bench_moe import check_output_paths
from eval.bench_parallel import AllToAllMeter, launch_ranks, run_bench
from lstm_moe.engine.ranks import rank_seed, split_parameters, sum_replicated_grads
from lstm_moe.engine.trainer import adam
from lstm_moe.lm import LanguageModel
from lstm_moe.moe import ParallelGroup, parallel
from lstm_moe.presets import PRESETS as LSTM_PRESETS
from lstm_moe.runtime import enable_cpu_hugepages
from switch.presets import TRANSFORMER_LM_PRESETS
from switch.transformer import TransformerLM

DEFAULT_MODELS = ("switch-32", "moe-top4-32", "MoE-32")
# The language models with MoE layers, by preset name (the two families share no name).
MODEL_PRESETS = {
    **{name: c for name, c in TRANSFORMER_LM_PRESETS.items() if c.moe_layers},
    **{name: c for name, c in LSTM_PRESETS.items() if "moe" in c.layers},
}

# ----------------------------------------------------------------------------- models


def model_config(name: str, vocab: int, d_model: int | None, dropless: bool = False):
    """The preset at `vocab` words with the full softmax (the sampled one's candidates would
    not change the all-to-alls), its widths scaled to `d_model` when given, its MoE layers
    without a capacity when `dropless`."""
    config = dataclasses.replace(MODEL_PRESETS[name], vocab_size=vocab, softmax="full")
    if dropless:
        moe = dataclasses.replace(config.moe, capacity_factor=None, eval_capacity_factor=None)
        config = dataclasses.replace(config, moe=moe)
    if d_model is None or d_model == config.d_model:
        return config
    scale = d_model / config.d_model

    def scaled(width: int) -> int:
        return max(1, round(width * scale))

    moe = dataclasses.replace(
        config.moe, d_model=d_model, expert_hidden=scaled(config.moe.expert_hidden)
    )
    if name in TRANSFORMER_LM_PRESETS:
        return dataclasses.replace(
            config, d_model=d_model, ffn_hidden=scaled(config.ffn_hidden), moe=moe
        )
    return dataclasses.replace(
        config, d_model=d_model, lstm_hidden=scaled(config.lstm_hidden), moe=moe
    )


def build_model(name: str, config, process_group: dist.ProcessGroup) -> nn.Module:
    if name in TRANSFORMER_LM_PRESETS:
        return TransformerLM(config, process_group)
    return LanguageModel(config, process_group)


def moe_layer_count(name: str, config) -> int:
    if name in TRANSFORMER_LM_PRESETS:
        return len(config.moe_layers)
    return config.layers.count("moe")


# ----------------------------------------------------------------------------- one rank


class DispatchRecorder:
    """Wraps lstm_moe.moe.parallel.mix_experts in this process and records, for each call, the
    width of a row in bytes, the rows of this rank's tokens sent to other ranks' experts (out)
    and the rows of other ranks' tokens its own experts received (in). MoELayer looks the
    function up on the module at every call, so replacing the module attribute is enough."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.original = parallel.mix_experts

    def __enter__(self) -> DispatchRecorder:
        original = self.original

        def recorded(tokens, expert_index, gates, experts, n_experts, group, *args, **kwargs):
            output, dispatch = original(
                tokens, expert_index, gates, experts, n_experts, group, *args, **kwargs
            )
            first, last = group.expert_range(n_experts)
            mine = dispatch.plan.rows_per_expert  # [E] this rank's kept rows, by expert
            local = int(mine[first:last].sum())
            self.calls.append(
                {
                    "row_bytes": tokens.shape[-1] * tokens.element_size(),
                    "out": int(mine.sum()) - local,
                    "in": int(dispatch.rows_per_expert[first:last].sum()) - local,
                    "routed": int(dispatch.routed_per_expert.sum()),  # over the global batch
                }
            )
            return output, dispatch

        parallel.mix_experts = recorded
        return self

    def __exit__(self, *exc) -> None:
        parallel.mix_experts = self.original


def train_model(args: argparse.Namespace, name: str, group: ParallelGroup) -> dict:
    """This rank's figures for --steps training steps of one model: per step, the bytes the
    meter counted, the bytes the dispatch's counts predict, the off-rank rows it sent, and, over
    the global batch, the rows kept and routed per MoE layer."""
    config = model_config(name, args.vocab, args.d_model, args.dropless)
    torch.manual_seed(args.seed)  # the same model at any W: rank r draws its experts only
    model = build_model(name, config, group.process_group).train()
    replicated, experts = split_parameters(model)
    optimizer = adam(replicated + experts, lr=1e-4, betas=(0.9, 0.98))
    torch.manual_seed(rank_seed(args.seed, group.rank))  # dropout and gate noise: its own
    tokens = torch.Generator().manual_seed(rank_seed(args.seed + 1, group.rank))
    n_targets = args.batch_size * args.bptt
    steps = []
    with AllToAllMeter(group.rank, torch.device("cpu")) as meter, DispatchRecorder() as record:
        for _ in range(args.steps):
            ids = torch.randint(args.vocab, (args.bptt + 1, args.batch_size), generator=tokens)
            meter.reset()
            record.calls.clear()
            out = model(ids[:-1])  # [T, B] inputs
            nll = model.nll(out.hidden, ids[1:])  # [T·B]
            # The engine's per-rank loss (lstm_moe/engine/ranks.py): Σ over ranks is the
            # one-process loss of the global batch.
            loss = nll.sum() / (n_targets * group.world_size) + out.aux_loss / group.world_size
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            sum_replicated_grads(replicated, group)
            optimizer.step()
            steps.append(
                {
                    "bytes_sent": meter.bytes_sent,
                    "calls": meter.calls,
                    # Forward: out rows sent, in rows returned; the backward the same again.
                    "expected_bytes": sum(
                        2 * c["row_bytes"] * (c["out"] + c["in"]) for c in record.calls
                    ),
                    "out_rows": sum(c["out"] for c in record.calls),
                    # Over the global batch: the rows the experts computed, by the layers'
                    # own statistics, and the (token, expert) pairs routed before capacity.
                    "kept_rows": [int(r.stats.tokens_per_expert.sum()) for r in out.moe],
                    "routed_rows": [c["routed"] for c in record.calls],
                    "row_bytes": record.calls[0]["row_bytes"],
                }
            )
    return {
        "model": name,
        "router": config.moe.router,
        "k": config.moe.experts_per_token,
        "capacity_factor": config.moe.capacity_factor,
        "n_experts": config.moe.n_experts,
        "d_model": config.d_model,
        "moe_layers": moe_layer_count(name, config),
        "steps": steps,
    }


def run_worker(args: argparse.Namespace) -> list[dict]:
    enable_cpu_hugepages()
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{args.port}",
        rank=args.rank,
        world_size=args.world,
        timeout=datetime.timedelta(seconds=args.timeout),
    )
    try:
        group = ParallelGroup(dist.group.WORLD)
        figures = [train_model(args, name, group) for name in args.models]
        group.barrier()
    finally:
        dist.destroy_process_group()
    return figures


# ----------------------------------------------------------------------------- driver


def _worker_command(args: argparse.Namespace, rank: int, world: int, port: int) -> list[str]:
    command = [
        sys.executable, "-m", "eval.bench_parallel_model", "--worker",
        "--rank", str(rank), "--world", str(world), "--port", str(port),
        "--models", *args.models, "--batch-size", str(args.batch_size), "--bptt", str(args.bptt),
        "--steps", str(args.steps), "--vocab", str(args.vocab), "--seed", str(args.seed),
        "--timeout", str(args.timeout), "--threads", str(args.threads),
    ]  # fmt: skip
    if args.d_model is not None:
        command += ["--d-model", str(args.d_model)]
    if args.dropless:
        command.append("--dropless")
    return command


def summarise(world: int, tokens_per_rank: int, ranks: list[dict]) -> dict:
    """One table row from every rank's figures for one model."""
    first = ranks[0]
    steps = [step for r in ranks for step in r["steps"]]
    n_steps = len(first["steps"])
    layers = first["moe_layers"]
    # Global figures (the same on every rank): rank 0's.
    kept = sum(sum(step["kept_rows"]) for step in first["steps"])
    routed = sum(sum(step["routed_rows"]) for step in first["steps"])
    global_tokens = tokens_per_rank * world
    out_rows = sum(step["out_rows"] for step in steps)
    bytes_sent = sum(step["bytes_sent"] for step in steps) / len(steps)
    return {
        "model": first["model"],
        "router": first["router"],
        "k": first["k"],
        "capacity_factor": first["capacity_factor"],
        "n_experts": first["n_experts"],
        "d_model": first["d_model"],
        "moe_layers": layers,
        "ranks": world,
        "tokens_per_rank": tokens_per_rank,
        "all_to_all_calls_per_step": first["steps"][0]["calls"],
        "bytes_sent_per_rank": bytes_sent,
        "bytes_per_token": bytes_sent / tokens_per_rank,
        "row_bytes": first["steps"][0]["row_bytes"],
        "rows_per_token": kept / (global_tokens * layers * n_steps),
        "fraction_dropped": 1 - kept / routed if routed else 0.0,
        "off_rank_share": out_rows / kept if kept else 0.0,
        "off_rank_rows_per_rank": out_rows / len(steps),
        "matches_routing": all(step["bytes_sent"] == step["expected_bytes"] for step in steps),
    }


def ratios(rows: list[dict]) -> list[dict]:
    """Bytes per token of each top-1 model over each k > 1 model of the same width and number
    of MoE layers, at each W > 1, split into its two factors: rows kept per token, and the
    share of them sent to another rank."""
    found = []
    measured = [row for row in rows if not row.get("failed") and row["ranks"] > 1]
    for one in (row for row in measured if row["k"] == 1):
        for many in measured:
            same = ("ranks", "d_model", "moe_layers")
            # A model that sent nothing (routing all on its own rank) has no ratio.
            if many["k"] == 1 or not many["bytes_per_token"] or not one["off_rank_share"]:
                continue
            if any(one[key] != many[key] for key in same):
                continue
            found.append(
                {
                    "ranks": one["ranks"],
                    "top1": one["model"],
                    "other": many["model"],
                    "other_k": many["k"],
                    "bytes_per_token_ratio": one["bytes_per_token"] / many["bytes_per_token"],
                    # (1 − dropped₁) / (k · (1 − dropped_k)): exactly 1/k less the drops.
                    "rows_per_token_ratio": one["rows_per_token"] / many["rows_per_token"],
                    # About 1 while routing is balanced: both near (W − 1)/W.
                    "off_rank_share_ratio": one["off_rank_share"] / many["off_rank_share"],
                }
            )
    return found


def markdown_table(report: dict) -> str:
    lines = [
        f"Whole language models trained with their experts sharded over gloo ranks, "
        f"{report['device']}: {report['batch_size']} × {report['bptt']} tokens per rank, "
        f"vocabulary {report['vocab']}, {report['steps']} steps (forward, LM + auxiliary "
        "loss, backward, Adam); figures per step, averaged over ranks and steps.",
        "",
        "| model | router, k | capacity | ranks | MoE layers | a2a calls/step | MB sent/rank | "
        "bytes/token | rows/token/layer | dropped | off-rank share | = 8·D·(out + in) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in report["rows"]:
        if row.get("failed"):
            lines.append(f"| {row['model']} | | | {row['ranks']} | failed: {row['failed']} |")
            continue
        factor = row["capacity_factor"]
        lines.append(
            f"| {row['model']} | {row['router']}, {row['k']} | "
            f"{'dropless' if factor is None else factor} | {row['ranks']} | "
            f"{row['moe_layers']} | {row['all_to_all_calls_per_step']} | "
            f"{row['bytes_sent_per_rank'] / 1e6:.3f} | {row['bytes_per_token']:.0f} | "
            f"{row['rows_per_token']:.4f} | {row['fraction_dropped']:.4f} | "
            f"{row['off_rank_share']:.4f} | {'yes' if row['matches_routing'] else 'NO'} |"
        )
    for ratio in report["ratios"]:
        lines.append(
            f"\nAt {ratio['ranks']} ranks, bytes per token of {ratio['top1']} (k=1) over "
            f"{ratio['other']} (k={ratio['other_k']}): **{ratio['bytes_per_token_ratio']:.4f}** "
            f"= rows per token {ratio['rows_per_token_ratio']:.4f} "
            f"× off-rank share {ratio['off_rank_share_ratio']:.4f}."
        )
    return "\n".join(lines) + "\n"


def run_driver(args: argparse.Namespace) -> dict:
    tokens_per_rank = args.batch_size * args.bptt
    rows = []
    for world in args.ranks:
        ranks, why = launch_ranks(
            lambda rank, port, world=world: _worker_command(args, rank, world, port),
            world,
            args.timeout,
        )
        if ranks is None:
            print(f"ranks={world}: failed: {why}", file=sys.stderr, flush=True)
            rows += [{"model": name, "ranks": world, "failed": why} for name in args.models]
            continue
        for index in range(len(args.models)):
            row = summarise(world, tokens_per_rank, [r[index] for r in ranks])
            rows.append(row)
            print(f"ranks={world} {row['model']}: {row['bytes_per_token']:.0f} bytes/token, "
                  f"{row['all_to_all_calls_per_step']} calls/step", flush=True)  # fmt: skip
    cpu = platform.processor() or platform.machine()
    return {
        "device": f"{cpu} CPU, {os.cpu_count()} cores, {args.threads} thread(s) per rank, gloo",
        "torch": torch.__version__,
        "world_sizes": list(args.ranks),
        "models": list(args.models),
        "batch_size": args.batch_size,
        "bptt": args.bptt,
        "tokens_per_rank": tokens_per_rank,
        "vocab": args.vocab,
        "d_model": args.d_model,
        "steps": args.steps,
        "dropless": args.dropless,
        "seed": args.seed,
        "rows": rows,
        "ratios": ratios(rows),
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eval.bench_parallel_model",
        description="All-to-all bytes per token of whole language models trained with their "
        "experts sharded over gloo ranks: top-1 under a capacity against top-4 dropless.",
    )
    parser.add_argument("--json", type=Path, help="write the report here (JSON)")
    parser.add_argument("--markdown", type=Path, help="write the table here (markdown)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="world sizes")
    parser.add_argument(
        "--models", nargs="+", default=list(DEFAULT_MODELS),
        help=f"presets with MoE layers, of {list(MODEL_PRESETS)}",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per rank")
    parser.add_argument("--bptt", type=int, default=32, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=3, help="training steps per model")
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument(
        "--d-model", type=int, default=None,
        help="every model's width, its other widths scaled alike (default: the presets')",
    )  # fmt: skip
    parser.add_argument(
        "--dropless", action="store_true",
        help="no capacity in any MoE layer (top-1 then keeps exactly a quarter of top-4's rows)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--timeout", type=float, default=300.0,
        help="seconds: the process group's timeout, and (plus 60 s for start-up) the limit "
        "for each world size",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    unknown = [name for name in args.models if name not in MODEL_PRESETS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {list(MODEL_PRESETS)}")
    for name in args.models:
        config = model_config(name, max(args.vocab, 1), None)
        for world in args.ranks:
            if world < 1 or config.moe.n_experts % world:
                parser.error(
                    f"{name} has {config.moe.n_experts} experts: not a multiple of {world} ranks"
                )
        heads = getattr(config, "n_heads", 1)
        if args.d_model is not None and args.d_model % heads:
            parser.error(f"--d-model must be a multiple of {name}'s {heads} heads")
    if min(args.batch_size, args.bptt, args.steps, args.vocab, args.threads) < 1:
        parser.error("--batch-size, --bptt, --steps, --vocab and --threads must be >= 1")
    if (args.d_model is not None and args.d_model < 1) or args.timeout <= 0:
        parser.error("--d-model must be >= 1, --timeout > 0")
    check_output_paths(parser, args.json, args.markdown)
    return args


def main(argv=None) -> int:
    return run_bench(parse_args(argv), run_worker, run_driver, markdown_table)


if __name__ == "__main__":
    sys.exit(main())
