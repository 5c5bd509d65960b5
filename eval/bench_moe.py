"""Benchmark: the MoE layer's dispatch + experts against a dense FFN of the same active FLOPs,
a per-expert loop, and one-hot (GShard-style) dispatch, forward + backward.

Every contender gets the same routing (a noisy top-k gate at its zero initialisation, the
state training starts from, drawn from a fixed seed) and computes y = Σ_k gate · expert(x)
for it, so the table compares the cost of moving tokens to experts and computing them. The
gate's own cost, identical for every sparse contender, is reported separately (router_ms).

  (moe)    this project: stable sort by expert, grouped matmul over [E, D, H] weights.
  (dense)  x -> Linear(D, k·H) -> ReLU -> Linear(k·H, D): the FLOPs the MoE spends per token.
  (loop)   for each expert: boolean mask, its own Linear-ReLU-Linear module, index_add back.
  (onehot) [T, E, C] dispatch and combine tensors with einsum, capacity factor 1.25.

Every contender's layers are bias-free, like the paper's experts (App. C.1).

Each contender runs in its own process so that its peak memory (max RSS above the process's
baseline after start-up, or CUDA max_memory_allocated) is its own. Time is the median of
--repeats runs after --warmup runs; parameter gradients are reset to None before each run, as
optimizer.zero_grad() does, so every run allocates its weight gradients afresh.

    python -m eval.bench_moe --json bench/bench_moe.json --markdown bench/bench_moe.md

Exit status: 2 for a bad option (checked before anything runs), 1 if a contender failed.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lstm_moe.moe import MoELayer, NoisyTopKRouter
from lstm_moe.runtime import enable_cpu_hugepages

CONTENDERS = ("moe", "dense", "loop", "onehot")
ONEHOT_CAPACITY_FACTOR = 1.25
# (n_experts, expert_hidden) of the paper-scale table: T=8192, D=512, k=4.
DEFAULT_SIZES = ((4, 1024), (32, 1024), (256, 1024), (1024, 1024), (4096, 256))


# ----------------------------------------------------------------------------- contenders


class DenseFFN(nn.Module):
    """D -> k·H -> D: the per-token FLOPs of k experts of width H."""

    def __init__(self, d_model: int, hidden: int, bias: bool = False):
        super().__init__()
        self.inner = nn.Linear(d_model, hidden, bias=bias)
        self.outer = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: Tensor, expert_index: Tensor, gates: Tensor) -> Tensor:
        return self.outer(torch.relu(self.inner(x)))


class LoopMoE(nn.Module):
    """The per-expert loop used by most MoE ports: one module per expert, a boolean mask to
    find its tokens, and index_add to put the gated outputs back."""

    def __init__(self, n_experts: int, d_model: int, hidden: int, bias: bool = False):
        super().__init__()
        self.experts = nn.ModuleList(
            nn.Sequential(
                nn.Linear(d_model, hidden, bias=bias),
                nn.ReLU(),
                nn.Linear(hidden, d_model, bias=bias),
            )
            for _ in range(n_experts)
        )

    def forward(self, x: Tensor, expert_index: Tensor, gates: Tensor) -> Tensor:
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = (expert_index == e).nonzero(as_tuple=True)
            if token.numel() == 0:
                continue
            out = out.index_add(0, token, expert(x[token]) * gates[token, slot].unsqueeze(1))
        return out


class OneHotMoE(nn.Module):
    """GShard-style dispatch: dense one-hot [T, E, C] dispatch and combine tensors and einsum.
    Positions are given slot by slot (every token's first choice before any second choice),
    and pairs past the capacity C are dropped.

    Index letters: t token, k slot, e expert, c capacity slot, d model width, h hidden width.
    """

    def __init__(
        self, n_experts: int, d_model: int, hidden: int, capacity_factor: float, bias: bool = False
    ):
        super().__init__()
        self.n_experts, self.capacity_factor = n_experts, capacity_factor
        bound_in, bound_out = 1 / math.sqrt(d_model), 1 / math.sqrt(hidden)
        self.w_in = nn.Parameter(
            torch.empty(n_experts, d_model, hidden).uniform_(-bound_in, bound_in)
        )
        self.b_in = nn.Parameter(torch.zeros(n_experts, hidden)) if bias else None
        self.w_out = nn.Parameter(
            torch.empty(n_experts, hidden, d_model).uniform_(-bound_out, bound_out)
        )
        self.b_out = nn.Parameter(torch.zeros(n_experts, d_model)) if bias else None

    def forward(self, x: Tensor, expert_index: Tensor, gates: Tensor) -> Tensor:
        n_tokens, k = expert_index.shape
        n_experts = self.n_experts
        capacity = math.ceil(self.capacity_factor * n_tokens * k / n_experts)
        one_hot = F.one_hot(expert_index.t().reshape(-1), n_experts)  # [K*T, E], slot-major
        position = (one_hot.cumsum(0) - 1).mul(one_hot).sum(-1)  # [K*T]
        position = position.view(k, n_tokens).t()  # [T, K]
        keep = position < capacity  # [T, K]
        column = (expert_index * capacity + position.clamp(max=capacity - 1)).masked_fill(~keep, 0)
        dispatch = x.new_zeros(n_tokens, n_experts * capacity)
        dispatch = dispatch.scatter(1, column, keep.to(x.dtype)).view(n_tokens, n_experts, capacity)
        combine = x.new_zeros(n_tokens, n_experts * capacity)
        combine = combine.scatter(1, column, gates * keep).view(n_tokens, n_experts, capacity)
        expert_in = torch.einsum("tec,td->ecd", dispatch, x)  # [E, C, D]
        hidden = torch.einsum("ecd,edh->ech", expert_in, self.w_in)  # [E, C, H]
        if self.b_in is not None:
            hidden = hidden + self.b_in[:, None]
        expert_out = torch.einsum("ech,ehd->ecd", torch.relu(hidden), self.w_out)  # [E, C, D]
        if self.b_out is not None:
            expert_out = expert_out + self.b_out[:, None]
        return torch.einsum("tec,ecd->td", combine, expert_out)  # [T, D]


class ProjectMoE(nn.Module):
    """This project's layer, fed the shared routing (its router is not used here)."""

    def __init__(self, n_experts: int, d_model: int, hidden: int, k: int, bias: bool = False):
        super().__init__()
        self.layer = MoELayer(d_model, n_experts, hidden, k, expert_bias=bias)
        del self.layer.router

    def forward(self, x: Tensor, expert_index: Tensor, gates: Tensor) -> Tensor:
        return self.layer.mix_experts(x, expert_index, gates)[0]


def build_contender(name: str, n_experts: int, d_model: int, hidden: int, k: int) -> nn.Module:
    if name == "moe":
        return ProjectMoE(n_experts, d_model, hidden, k)
    if name == "dense":
        return DenseFFN(d_model, k * hidden)
    if name == "loop":
        return LoopMoE(n_experts, d_model, hidden)
    return OneHotMoE(n_experts, d_model, hidden, ONEHOT_CAPACITY_FACTOR)


# ----------------------------------------------------------------------------- one process


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_runs(step, device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        step()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_worker(args: argparse.Namespace) -> dict:
    """Time one contender at one size; returns {"ms", "peak_mb", "router_ms"?}."""
    enable_cpu_hugepages()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.set_grad_enabled(True)
    baseline_mb = _max_rss_mb()
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.d_model, device=device)
    router = NoisyTopKRouter(args.d_model, args.n_experts, args.k).to(device).train()
    routing = router(x)  # zero-initialised gate: the routing training starts from
    expert_index = routing.expert_index.detach()
    gates = routing.gates.detach().to(dtype).requires_grad_()
    x = x.to(dtype).requires_grad_()
    grad_out = torch.randn_like(x)
    result: dict = {}

    if args.contender == "moe":

        def router_step():
            router.zero_grad(set_to_none=True)
            out = router(x)
            (out.gates.sum() + out.aux_loss).backward()

        result["router_ms"] = _time_runs(router_step, device, args.warmup, args.repeats)

    torch.manual_seed(1)
    model = build_contender(
        args.contender, args.n_experts, args.d_model, args.expert_hidden, args.k
    )
    model = model.to(device=device, dtype=dtype)

    def step():
        model.zero_grad(set_to_none=True)
        x.grad = gates.grad = None
        model(x, expert_index, gates).backward(grad_out)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result["ms"] = _time_runs(step, device, args.warmup, args.repeats)
    if device.type == "cuda":
        result["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["peak_mb"] = _max_rss_mb() - baseline_mb
    return result


# ----------------------------------------------------------------------------- driver


def _run_in_subprocess(args: argparse.Namespace, contender: str, n_experts: int, hidden: int):
    command = [
        sys.executable, "-m", "eval.bench_moe", "--worker", contender,
        "--n-experts", str(n_experts), "--expert-hidden", str(hidden),
        "--tokens", str(args.tokens), "--d-model", str(args.d_model), "--k", str(args.k),
        "--warmup", str(args.warmup), "--repeats", str(args.repeats),
        "--device", args.device, "--dtype", args.dtype,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        print(f"  {contender} at E={n_experts} failed: {tail[0]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def markdown_table(report: dict) -> str:
    lines = [
        f"MoE layer forward+backward, {report['device']}, {report['dtype']}, "
        f"T={report['tokens']} tokens, D={report['d_model']}, k={report['k']} "
        f"(median of {report['repeats']} after {report['warmup']} warm-up).",
        "",
        "| E | H | moe ms | dense ms | loop ms | one-hot ms | router ms | moe/dense | "
        "dense/moe | loop/moe | one-hot/moe | moe peak MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def fmt(value, pattern="{:.0f}"):
        return "n/a" if value is None else pattern.format(value)

    for row in report["rows"]:
        ratios = row["ratios"]
        lines.append(
            f"| {row['n_experts']} | {row['expert_hidden']} | {fmt(row['moe_ms'])} | "
            f"{fmt(row['dense_ms'])} | {fmt(row['loop_ms'])} | {fmt(row['onehot_ms'])} | "
            f"{fmt(row['router_ms'])} | {fmt(ratios['moe_over_dense'], '{:.2f}')} | "
            f"{fmt(ratios['dense_over_moe'], '{:.2f}')} | "
            f"{fmt(ratios['loop_over_moe'], '{:.1f}')} | "
            f"{fmt(ratios['onehot_over_moe'], '{:.1f}')} | {fmt(row['peak_mb'])} |"
        )
    scaling = report.get("moe_time_ratio_largest_over_smallest_E_at_same_H")
    if scaling is not None:
        lines += ["", f"time(E={scaling['large_E']}) / time(E={scaling['small_E']}) at "
                      f"H={scaling['expert_hidden']}: {scaling['ratio']:.2f}"]  # fmt: skip
    return "\n".join(lines) + "\n"


def _ratio(a, b):
    return None if a is None or b is None else a / b


def run_driver(args: argparse.Namespace) -> dict:
    rows = []
    sizes = list(zip(args.experts, args.hidden, strict=True))
    for n_experts, hidden in sizes:
        measured = {}
        for contender in args.contenders:
            measured[contender] = _run_in_subprocess(args, contender, n_experts, hidden)
            ms = measured[contender]["ms"] if measured[contender] else None
            print(f"E={n_experts:5d} H={hidden:5d} {contender:7s} "
                  f"{'failed' if ms is None else f'{ms:9.1f} ms'}", flush=True)  # fmt: skip
        ms = {c: (measured.get(c) or {}).get("ms") for c in CONTENDERS}
        moe = measured.get("moe") or {}
        rows.append({
            "n_experts": n_experts, "expert_hidden": hidden, "tokens": args.tokens,
            "d_model": args.d_model, "k": args.k,
            "moe_ms": ms["moe"], "dense_ms": ms["dense"], "loop_ms": ms["loop"],
            "onehot_ms": ms["onehot"], "router_ms": moe.get("router_ms"),
            "peak_mb": moe.get("peak_mb"),
            "peak_mb_by_contender": {c: (measured.get(c) or {}).get("peak_mb") for c in CONTENDERS},
            "ratios": {
                "moe_over_dense": _ratio(ms["moe"], ms["dense"]),
                "dense_over_moe": _ratio(ms["dense"], ms["moe"]),
                "loop_over_moe": _ratio(ms["loop"], ms["moe"]),
                "onehot_over_moe": _ratio(ms["onehot"], ms["moe"]),
            },
        })  # fmt: skip
    report = {
        "device": _device_name(args.device),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "tokens": args.tokens,
        "d_model": args.d_model,
        "k": args.k,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "rows": rows,
    }
    same_h = [r for r in rows if r["expert_hidden"] == rows[0]["expert_hidden"] and r["moe_ms"]]
    if len(same_h) >= 2:
        small, large = (
            min(same_h, key=lambda r: r["n_experts"]),
            max(same_h, key=lambda r: r["n_experts"]),
        )
        report["moe_time_ratio_largest_over_smallest_E_at_same_H"] = {
            "small_E": small["n_experts"], "large_E": large["n_experts"],
            "expert_hidden": small["expert_hidden"], "ratio": large["moe_ms"] / small["moe_ms"],
        }  # fmt: skip
    return report


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eval.bench_moe",
        description="Time the MoE layer against dense, per-expert-loop and one-hot contenders.",
    )
    parser.add_argument("--json", type=Path, help="write the report here (JSON)")
    parser.add_argument("--markdown", type=Path, help="write the table here (markdown)")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--experts", type=int, nargs="+", default=[e for e, _ in DEFAULT_SIZES])
    parser.add_argument(
        "--hidden", type=int, nargs="+", default=[h for _, h in DEFAULT_SIZES],
        help="expert hidden width for each --experts entry",
    )  # fmt: skip
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16"],
        help="expert dtype (default: float32 on CPU, bfloat16 on CUDA; the router is float32)",
    )  # fmt: skip
    parser.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--n-experts", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--expert-hidden", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if len(args.hidden) == 1:
        args.hidden = args.hidden * len(args.experts)
    if len(args.hidden) != len(args.experts):
        parser.error("--hidden takes one value, or one per --experts entry")
    if args.worker:
        return args
    # Bad values are refused here, with exit status 2, rather than by every worker in turn.
    if min(args.tokens, args.d_model, args.k, args.repeats, *args.experts, *args.hidden) < 1:
        parser.error("--tokens, --d-model, --k, --experts, --hidden and --repeats must be >= 1")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if min(args.experts) < args.k:
        parser.error(f"every --experts value must be >= --k ({args.k}), got {min(args.experts)}")
    check_device(parser, args.device)
    check_output_paths(parser, args.json, args.markdown)
    return args


def check_device(parser: argparse.ArgumentParser, name: str) -> None:
    try:
        device = torch.device(name)
    except RuntimeError:
        parser.error(f"--device {name!r} is not a device (cpu, cuda, cuda:1 ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {name}: this torch build sees no CUDA device")


def check_output_paths(parser: argparse.ArgumentParser, *paths: Path | None) -> None:
    """Refuse report paths that could not be written before measuring, not after."""
    for path in paths:
        if path is None:
            continue
        if path.is_dir():
            parser.error(f"{path} is a folder; give the report's file name")
        existing = next(parent for parent in path.parents if parent.exists())
        if not existing.is_dir():
            parser.error(f"cannot write {path}: {existing} is not a folder")


def write_report(report: dict, table: str, json_path: Path | None, markdown_path: Path | None):
    """Write a benchmark's report as JSON and its table as markdown, where paths are given."""
    for path, text in ((json_path, json.dumps(report, indent=2)), (markdown_path, table)):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n")
            print(f"wrote {path}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        args.contender = args.worker
        print(json.dumps(run_worker(args)))
        return 0
    report = run_driver(args)
    table = markdown_table(report)
    print()
    print(table)
    write_report(report, table, args.json, args.markdown)
    failed = [r for r in report["rows"] if r["moe_ms"] is None]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
