"""Benchmark: the MoE layer with its experts sharded over 1, 2, 4 ... ranks (Shazeer et al.
2017, §3.1), forward + backward, weak scaling.

On a 2-core machine 4 ranks oversubscribe the CPU, so the figures show correctness and
communication volume, not speed-up. Run it with `--backend nccl --device cuda` on a machine
with one GPU per rank for speed figures.

For each world size W the driver starts W processes (gloo on CPU by default), each builds
MoELayer(D, E, H, k, process_group=...) from the same seed (so rank r holds experts
[r·E/W, (r+1)·E/W) of the one model) and routes its own b = --tokens-per-rank tokens: the
global batch is b·W tokens and grows with the ranks, as in §3.1, where each expert's batch is
k·b·d/n for d devices and n experts. The gate is the noisy top-k gate at its zero
initialisation (the state training starts from), in training mode, so routing is random and
roughly balanced, or with --router switch the Switch router at its reduced initialisation;
the layer is dropless unless --capacity-factor is given.

Measured, per step (one forward + backward of (output · projection).sum() + aux_loss):
  ms              median over --repeats steps, after --warmup steps, of the slowest rank's
                  step time; every rank waits at a barrier before each step.
  tokens_per_s    global tokens / that time.
  all_to_all_ms   time inside torch.distributed.all_to_all_single (the two all-to-alls of
                  the forward and the two of the backward), averaged over ranks, median over
                  steps; the call is wrapped in each worker process, parallel.py is unchanged.
                  It includes waiting for the slowest rank to arrive. Zero at W = 1, where
                  the layer makes no collective call.
  bytes_sent_per_rank   bytes a rank sends to other ranks through those four calls (rows for
                  its own rank are a local copy and not counted), averaged over ranks and steps.
  tokens_per_expert_*   rows each expert computes per step, over the global batch: the mean,
                  smallest and largest over experts (averaged over the timed steps), next to
                  the paper's k·b·d/n. Dropless, the mean equals it exactly.
Not included: the small all-gather of token counts and the all-reduces of the gate's batch
statistics (they are inside `ms`), and the data-parallel gradient all-reduce of the router's
weights, which belongs to the training loop, not to the layer.

    python -m eval.bench_parallel --json bench/bench_parallel.json \
        --markdown bench/bench_parallel.md

Exit status: 2 for a bad option (checked before any rank starts), 1 if a world size failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from eval.bench_moe import check_output_paths, write_report
from lstm_moe.moe import MoELayer
from lstm_moe.runtime import enable_cpu_hugepages
from switch import SwitchRouter

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTE = (
    "On a 2-core machine 4 ranks oversubscribe the CPU, so the figures show correctness and "
    "communication volume, not speed-up."
)

# ----------------------------------------------------------------------------- one rank


class AllToAllMeter:
    """Wraps torch.distributed.all_to_all_single in this process: time spent in each call and
    bytes sent to other ranks. parallel.py looks the function up on the module at every call,
    so replacing the module attribute is enough."""

    def __init__(self, rank: int, device: torch.device) -> None:
        self.rank, self.device = rank, device
        self.seconds, self.bytes_sent, self.calls = 0.0, 0, 0
        self.original = dist.all_to_all_single

    def reset(self) -> None:
        self.seconds, self.bytes_sent, self.calls = 0.0, 0, 0

    def __enter__(self) -> AllToAllMeter:
        original = self.original

        def timed(output, rows, output_split_sizes=None, input_split_sizes=None, **kwargs):
            row_bytes = rows[0].numel() * rows.element_size() if rows.shape[0] else 0
            if input_split_sizes is None:  # equal blocks
                world = dist.get_world_size(kwargs.get("group"))
                input_split_sizes = [rows.shape[0] // world] * world
            self.bytes_sent += row_bytes * (sum(input_split_sizes) - input_split_sizes[self.rank])
            self.calls += 1
            _synchronize(self.device)
            start = time.perf_counter()
            work = original(output, rows, output_split_sizes, input_split_sizes, **kwargs)
            _synchronize(self.device)
            self.seconds += time.perf_counter() - start
            return work

        dist.all_to_all_single = timed
        return self

    def __exit__(self, *exc) -> None:
        dist.all_to_all_single = self.original


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_worker(args: argparse.Namespace) -> dict:
    """One rank: time --repeats steps of the sharded layer; returns this rank's raw figures
    (step and all-to-all seconds per timed step, bytes sent, rows per expert summed over the
    timed steps)."""
    enable_cpu_hugepages()
    torch.set_num_threads(args.threads)
    rank, world = args.rank, args.world
    if args.device == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device(args.device)
    dist.init_process_group(
        args.backend,
        init_method=f"tcp://127.0.0.1:{args.port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=args.timeout),
    )
    try:
        torch.manual_seed(0)  # the same model at any W: rank r draws its experts only
        router = args.router
        if router == "switch":
            router = SwitchRouter(args.d_model, args.experts, args.k)
        layer = MoELayer(
            args.d_model,
            args.experts,
            args.hidden,
            args.k,
            router,
            capacity_factor=args.capacity_factor,
            process_group=dist.group.WORLD,
        ).to(device)
        layer.train()
        torch.manual_seed(1 + rank)  # each rank its own tokens and its own gate noise
        x = torch.randn(args.tokens_per_rank, args.d_model, device=device, requires_grad=True)
        projection = torch.randn(args.tokens_per_rank, args.d_model, device=device)

        def step():
            layer.zero_grad(set_to_none=True)
            x.grad = None
            result = layer(x)
            ((result.output * projection).sum() + result.aux_loss).backward()
            return result.stats.tokens_per_expert

        step_s, a2a_s, bytes_sent = [], [], []
        rows_per_expert = torch.zeros(args.experts, dtype=torch.int64)
        with AllToAllMeter(rank, device) as meter:
            for i in range(args.warmup + args.repeats):
                dist.barrier()
                _synchronize(device)
                meter.reset()
                start = time.perf_counter()
                rows = step()
                _synchronize(device)
                elapsed = time.perf_counter() - start
                if i >= args.warmup:
                    step_s.append(elapsed)
                    a2a_s.append(meter.seconds)
                    bytes_sent.append(meter.bytes_sent)
                    rows_per_expert += rows.to("cpu", torch.int64)
            calls = meter.calls
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return {
        "rank": rank,
        "step_s": step_s,
        "all_to_all_s": a2a_s,
        "bytes_sent": bytes_sent,
        "all_to_all_calls_per_step": calls,
        "rows_per_expert": rows_per_expert.tolist(),
    }


# ----------------------------------------------------------------------------- driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_command(args: argparse.Namespace, rank: int, world: int, port: int) -> list[str]:
    command = [
        sys.executable, "-m", "eval.bench_parallel", "--worker",
        "--rank", str(rank), "--world", str(world), "--port", str(port),
        "--tokens-per-rank", str(args.tokens_per_rank), "--experts", str(args.experts),
        "--d-model", str(args.d_model), "--hidden", str(args.hidden), "--k", str(args.k),
        "--warmup", str(args.warmup), "--repeats", str(args.repeats),
        "--timeout", str(args.timeout), "--threads", str(args.threads),
        "--backend", args.backend, "--device", args.device, "--router", args.router,
    ]  # fmt: skip
    if args.capacity_factor is not None:
        command += ["--capacity-factor", str(args.capacity_factor)]
    return command


def launch_ranks(
    command_of_rank: Callable[[int, int], list[str]], world: int, timeout: float
) -> tuple[list[dict] | None, str]:
    """Start `world` ranks, rank r as command_of_rank(r, port), and wait for all of them; if one
    fails or `timeout` (plus a minute of start-up) passes, stop the others. Each rank prints
    its figures as one JSON line last. Returns (each rank's figures, "") or (None, why). A
    port taken between choosing it and binding it is retried once on another."""
    ranks, why = _launch_once(command_of_rank, world, timeout)
    if ranks is None and "Address already in use" in why:
        ranks, why = _launch_once(command_of_rank, world, timeout)
    return ranks, why


def _launch_once(
    command_of_rank: Callable[[int, int], list[str]], world: int, timeout: float
) -> tuple[list[dict] | None, str]:
    port = free_port()
    procs = [
        subprocess.Popen(
            command_of_rank(rank, port),
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world)
    ]
    # Start-up (imports, rendezvous) comes on top of the collectives' own timeout.
    deadline = time.monotonic() + timeout + 60
    why = ""
    while any(p.poll() is None for p in procs):
        failed = [p for p in procs if p.returncode not in (None, 0)]
        if failed or time.monotonic() > deadline:
            why = "a rank failed" if failed else f"timed out after {timeout + 60} s"
            break
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            p.kill()
    outputs = [p.communicate() for p in procs]
    if why or any(p.returncode != 0 for p in procs):
        for rank, (p, (_, err)) in enumerate(zip(procs, outputs, strict=True)):
            if p.returncode != 0:
                tail = err.strip().splitlines()[-1:] or ["no output"]
                why = why or "a rank failed"
                why += f"; rank {rank} exit {p.returncode}: {tail[0]}"
        return None, why
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs], ""


def summarise(args: argparse.Namespace, world: int, ranks: list[dict]) -> dict:
    """One table row from every rank's raw figures."""
    global_tokens = args.tokens_per_rank * world
    n_steps = len(ranks[0]["step_s"])
    # A step ends when its slowest rank ends.
    step_s = [max(r["step_s"][i] for r in ranks) for i in range(n_steps)]
    a2a_s = [statistics.mean(r["all_to_all_s"][i] for r in ranks) for i in range(n_steps)]
    ms = statistics.median(step_s) * 1e3
    rows = ranks[0]["rows_per_expert"]  # [E] over the global batch, the same on every rank
    total_rows = sum(rows)
    expected = args.k * args.tokens_per_rank * world / args.experts  # k·b·d/n (§3.1)
    bytes_sent = statistics.mean(b for r in ranks for b in r["bytes_sent"])
    return {
        "ranks": world,
        "tokens_per_rank": args.tokens_per_rank,
        "global_tokens": global_tokens,
        "n_experts": args.experts,
        "k": args.k,
        "ms": ms,
        "tokens_per_s": global_tokens / (ms / 1e3),
        "all_to_all_ms": statistics.median(a2a_s) * 1e3,
        "all_to_all_calls_per_step": ranks[0]["all_to_all_calls_per_step"],
        "bytes_sent_per_rank": bytes_sent,
        # Integer totals over the timed steps divided once: exact when dropless.
        "tokens_per_expert_mean": total_rows / (args.experts * n_steps),
        "tokens_per_expert_min": min(rows) / n_steps,
        "tokens_per_expert_max": max(rows) / n_steps,
        "expected_tokens_per_expert": expected,
        "expert_rows_per_step": total_rows / n_steps,
        "step_ms_by_rank": [statistics.median(r["step_s"]) * 1e3 for r in ranks],
    }


def _device_name(args: argparse.Namespace) -> str:
    if args.device == "cuda":
        return f"{torch.cuda.get_device_name(0)} ×{torch.cuda.device_count()}, {args.backend}"
    cpu = platform.processor() or platform.machine()
    return f"{cpu} CPU, {os.cpu_count()} cores, {args.threads} thread(s) per rank, {args.backend}"


def header(report: dict) -> str:
    factor = report["capacity_factor"]
    routing = "dropless" if factor is None else f"capacity factor {factor}"
    return (
        f"Expert-parallel MoE layer forward+backward, {report['device']}: "
        f"{report['tokens_per_rank']} tokens per rank, E={report['n_experts']}, "
        f"D={report['d_model']}, H={report['hidden']}, {report['router']} router, "
        f"k={report['k']}, {routing} "
        f"(median of {report['repeats']} after {report['warmup']} warm-up).\n{NOTE}"
    )


def markdown_table(report: dict) -> str:
    lines = [
        header(report),
        "",
        "| ranks | global tokens | ms | tokens/s | all-to-all ms | MB sent/rank | "
        "tokens/expert mean | min | max | k·b·d/n | mean / k·b·d/n |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        if row.get("failed"):
            lines.append(f"| {row['ranks']} | failed: {row['failed']} |" + " |" * 9)
            continue
        lines.append(
            f"| {row['ranks']} | {row['global_tokens']} | {row['ms']:.1f} | "
            f"{row['tokens_per_s']:.0f} | {row['all_to_all_ms']:.1f} | "
            f"{row['bytes_sent_per_rank'] / 1e6:.2f} | {row['tokens_per_expert_mean']:.1f} | "
            f"{row['tokens_per_expert_min']:.1f} | {row['tokens_per_expert_max']:.1f} | "
            f"{row['expected_tokens_per_expert']:.1f} | "
            f"{row['tokens_per_expert_mean'] / row['expected_tokens_per_expert']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def run_driver(args: argparse.Namespace) -> dict:
    print(NOTE, flush=True)
    rows = []
    for world in args.ranks:
        ranks, why = launch_ranks(
            lambda rank, port, world=world: _worker_command(args, rank, world, port),
            world,
            args.timeout,
        )
        if ranks is None:
            print(f"ranks={world}: failed: {why}", file=sys.stderr, flush=True)
            rows.append({"ranks": world, "failed": why})
            continue
        row = summarise(args, world, ranks)
        rows.append(row)
        print(f"ranks={world}: {row['ms']:.1f} ms, "
              f"all-to-all {row['all_to_all_ms']:.1f} ms", flush=True)  # fmt: skip
    return {
        "device": _device_name(args),
        "backend": args.backend,
        "torch": torch.__version__,
        "note": NOTE,
        "world_sizes": list(args.ranks),
        "tokens_per_rank": args.tokens_per_rank,
        "n_experts": args.experts,
        "d_model": args.d_model,
        "hidden": args.hidden,
        "router": args.router,
        "k": args.k,
        "capacity_factor": args.capacity_factor,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "rows": rows,
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eval.bench_parallel",
        description="Time the expert-parallel MoE layer over 1, 2, 4 ... ranks (weak scaling): "
        "tokens/s, all-to-all time and bytes, tokens per expert against k·b·d/n. " + NOTE,
    )
    parser.add_argument("--json", type=Path, help="write the report here (JSON)")
    parser.add_argument("--markdown", type=Path, help="write the table here (markdown)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="world sizes")
    parser.add_argument("--tokens-per-rank", type=int, default=2048, help="b, tokens per rank")
    parser.add_argument("--experts", type=int, default=16, help="n, experts in all")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512, help="expert hidden width")
    parser.add_argument("--k", type=int, default=4, help="experts per token")
    parser.add_argument(
        "--router", default="noisy_topk", choices=["noisy_topk", "switch"],
        help="the 2017 noisy top-k gate, or switch.SwitchRouter (e.g. --router switch --k 1)",
    )  # fmt: skip
    parser.add_argument(
        "--capacity-factor", type=float, default=None, help="default: dropless"
    )  # fmt: skip
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--timeout", type=float, default=120.0,
        help="seconds: the process group's timeout, and (plus 60 s for start-up) the limit "
        "for each world size",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    for world in args.ranks:
        if world < 1 or args.experts % world:
            parser.error(f"--experts ({args.experts}) must be a multiple of every --ranks value")
    if not 1 <= args.k <= args.experts:
        parser.error(f"--k must be in [1, --experts], got {args.k}")
    if args.repeats < 1 or args.warmup < 0 or args.tokens_per_rank < 1:
        parser.error("--repeats and --tokens-per-rank must be >= 1, --warmup >= 0")
    if min(args.d_model, args.hidden, args.threads) < 1 or args.timeout <= 0:
        parser.error("--d-model, --hidden and --threads must be >= 1, --timeout > 0")
    if args.capacity_factor is not None and args.capacity_factor <= 0:
        parser.error(f"--capacity-factor must be > 0, got {args.capacity_factor}")
    if (args.backend == "nccl") != (args.device == "cuda"):
        parser.error("use --backend nccl with --device cuda, and gloo with cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch build sees no CUDA device")
    check_output_paths(parser, args.json, args.markdown)
    return args


def run_bench(args, run_worker, run_driver, markdown_table) -> int:
    """A worker prints its rank's figures as JSON; the driver starts the ranks, prints and
    writes the report. Exit status 1 when a world size failed (shared by bench_parallel_model)."""
    if args.worker:
        print(json.dumps(run_worker(args)))
        return 0
    report = run_driver(args)
    table = markdown_table(report)
    print()
    print(table)
    write_report(report, table, args.json, args.markdown)
    return 1 if any(row.get("failed") for row in report["rows"]) else 0


def main(argv=None) -> int:
    return run_bench(parse_args(argv), run_worker, run_driver, markdown_table)


if __name__ == "__main__":
    sys.exit(main())
