"""Benchmark: the MoE layer as users run it — imported and called with its router, losses and
statistics, in a process with default settings — against the designs of other projects and a
dense FFN of the same active FLOPs, forward + backward.

Two tables, one per routing:
  k = 4, the 2017 layer: noisy top-k gating, dropless (router "noisy_topk").
      moe                this project's MoELayer.
      sparse_dispatcher  tensor2tensor's SparseDispatcher design (eval/moe_peers.py).
      dense              D -> 4·H -> D.
  k = 1, Switch: top-1, capacity factor 1.25 (router "switch").
      moe                this project's MoELayer.
      switch_loop        Hugging Face's Switch design (eval/moe_peers.py).
      one_hot            Mesh TensorFlow's and GShard's one-hot dispatch, every step an einsum
                         (eval/moe_peers.py); it needs a capacity: k = 1 only.
      transformers       transformers' own SwitchTransformersSparseMLP, where the package is
                         importable (a side environment; never a dependency of this project).
      dense              D -> H -> D.
The dense FFN does not depend on E: it is measured once per table and shown on every row.
Every layer is bias-free (App. C.1) and starts from its own initialisation (the 2017 gates at
zero: routing uniform at random; Switch routers at their reduced initialisation). The loss is
a fixed random projection of the output plus the layer's auxiliary loss. For moe the router's
own forward + backward is timed as well (router ms, part of moe ms).

Each contender runs in its own process, so that its peak memory (max RSS above the process's
baseline, parameters included, or CUDA max_memory_allocated) is its own and no contender runs
on memory another one left behind. It builds its layer on the device it runs on, so that
E = 1024 experts are drawn there instead of on the CPU and copied. Time is the median of
--repeats steps after --warmup steps; gradients are reset to None before each step, as
optimizer.zero_grad() does. Transparent huge pages stay as the system sets them unless
--hugepages is given. --max-seconds stops starting new sizes once that much time has passed
(the sizes left out are listed).

    python -m eval.bench_moe --json bench/bench_moe.json --markdown bench/bench_moe.md

Exit status: 2 for a bad option (checked before anything runs), 1 if this project's layer
failed at some size.
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
from torch import nn

from eval.moe_peers import DenseFFN, OneHotSwitchMoE, SparseDispatcherMoE, SwitchLoopMoE
from lstm_moe.moe import MoELayer
from lstm_moe.runtime import enable_cpu_hugepages

SWITCH_CAPACITY_FACTOR = 1.25
CONTENDERS = {
    4: ("moe", "sparse_dispatcher", "dense"),
    1: ("moe", "switch_loop", "one_hot", "transformers", "dense"),
}
ALL_CONTENDERS = ("moe", "sparse_dispatcher", "switch_loop", "one_hot", "transformers", "dense")
DEFAULT_EXPERTS = (4, 32, 256, 1024)


# ----------------------------------------------------------------------------- contenders


class TransformersSwitch(nn.Module):
    """transformers' SwitchTransformersSparseMLP on [1, T, D], float32 router, ReLU experts,
    capacity ceil(1.25·T/E). Its auxiliary losses are computed by the model around it, so the
    loss here is the output's alone. Its router applies the jitter to its input in place, so
    the input is a fresh copy, as the layer norm in front of it gives in the model."""

    def __init__(self, d_model: int, n_experts: int, hidden: int, capacity_factor: float):
        super().__init__()
        from transformers import SwitchTransformersConfig
        from transformers.models.switch_transformers.modeling_switch_transformers import (
            SwitchTransformersSparseMLP,
        )

        self.capacity_factor, self.n_experts = capacity_factor, n_experts
        self.config = SwitchTransformersConfig(
            d_model=d_model, d_ff=hidden, num_experts=n_experts, expert_capacity=1,
            router_bias=False, router_jitter_noise=0.01, router_dtype="float32",
            dense_act_fn="relu", dropout_rate=0.0,
        )  # fmt: skip
        self.mlp = SwitchTransformersSparseMLP(self.config)

    def forward(self, x):
        capacity = math.ceil(self.capacity_factor * x.shape[0] / self.n_experts)
        self.mlp.router.expert_capacity = capacity
        out = self.mlp(x.unsqueeze(0).clone())
        out = out[0] if isinstance(out, tuple) else out
        return out.squeeze(0), x.new_zeros(())


def transformers_available() -> bool:
    try:
        from transformers.models.switch_transformers import modeling_switch_transformers  # noqa: F401
    except Exception:
        return False
    return True


def build_contender(name: str, k: int, n_experts: int, d_model: int, hidden: int) -> nn.Module:
    """The contender `name` of the k table; forward(x [T, D]) -> (y, aux) or MoEOutput."""
    if name == "dense":
        return DenseFFN(d_model, k * hidden)
    if name == "moe":
        if k == 1:
            options = dict(router="switch", capacity_factor=SWITCH_CAPACITY_FACTOR)
            return MoELayer(d_model, n_experts, hidden, 1, **options)
        return MoELayer(d_model, n_experts, hidden, k)
    if name == "sparse_dispatcher":
        return SparseDispatcherMoE(d_model, n_experts, hidden, k)
    if name == "switch_loop":
        return SwitchLoopMoE(d_model, n_experts, hidden, SWITCH_CAPACITY_FACTOR)
    if name == "one_hot":
        return OneHotSwitchMoE(d_model, n_experts, hidden, SWITCH_CAPACITY_FACTOR)
    if name == "transformers":
        return TransformersSwitch(d_model, n_experts, hidden, SWITCH_CAPACITY_FACTOR)
    raise ValueError(f"unknown contender {name!r}")


def _output_and_loss(result) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(result, tuple):
        return result
    return result.output, result.aux_loss


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
    if args.hugepages:
        enable_cpu_hugepages()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.set_grad_enabled(True)
    baseline_mb = _max_rss_mb()
    torch.manual_seed(0)
    with device:  # parameters drawn where they live (GBs of experts at E = 1024)
        model = build_contender(
            args.worker, args.k, args.n_experts, args.d_model, args.expert_hidden
        )
    model = model.to(device=device, dtype=dtype).train()
    x = torch.randn(args.tokens, args.d_model, device=device, dtype=dtype, requires_grad=True)
    projection = torch.randn_like(x)
    result: dict = {}

    def step():
        model.zero_grad(set_to_none=True)
        x.grad = None
        out, aux = _output_and_loss(model(x))
        ((out * projection).sum() + aux).backward()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result["ms"] = _time_runs(step, device, args.warmup, args.repeats)
    if device.type == "cuda":
        result["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["peak_mb"] = _max_rss_mb() - baseline_mb
    if args.worker == "moe":

        def router_step():
            model.router.zero_grad(set_to_none=True)
            routing = model.router(x.detach())
            (routing.gates.sum() + routing.aux_loss).backward()

        result["router_ms"] = _time_runs(router_step, device, args.warmup, args.repeats)
    return result


# ----------------------------------------------------------------------------- driver


def _run_in_subprocess(args, contender: str, k: int, n_experts: int, hidden: int):
    command = [
        sys.executable, "-m", "eval.bench_moe", "--worker", contender, "--k", str(k),
        "--n-experts", str(n_experts), "--expert-hidden", str(hidden),
        "--tokens", str(args.tokens), "--d-model", str(args.d_model),
        "--warmup", str(args.warmup), "--repeats", str(args.repeats),
        "--device", args.device, "--dtype", args.dtype,
    ]  # fmt: skip
    if args.hugepages:
        command.append("--hugepages")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        print(f"  {contender} (k={k}) at E={n_experts} failed: {tail[0]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def _ratio(a, b):
    return None if a is None or b is None else a / b


def _fmt(value, pattern="{:.0f}"):
    return "n/a" if value is None else pattern.format(value)


ROUTING_TITLES = {
    4: "k = 4: noisy top-k gating (Shazeer et al. 2017), dropless",
    1: f"k = 1: Switch routing, capacity factor {SWITCH_CAPACITY_FACTOR}",
}


def markdown_table(report: dict) -> str:
    lines = [
        f"MoE layer with its router, forward + backward, {report['device']}, {report['dtype']}, "
        f"T={report['tokens']} tokens, D={report['d_model']} (median of {report['repeats']} "
        f"after {report['warmup']} warm-up; transparent huge pages "
        f"{'on' if report['hugepages'] else 'as the system sets them'}).",
    ]
    for table in report["tables"]:
        k, contenders = table["k"], table["contenders"]
        peers = [c for c in contenders if c not in ("moe", "dense")]
        header = ["E", "H", "moe ms", "router ms", *(f"{c} ms" for c in peers), "dense ms"]
        header += [f"{c}/moe" for c in peers] + ["dense/moe"]
        header += [f"{c} MB" for c in contenders]
        lines += ["", f"### {ROUTING_TITLES.get(k, f'k = {k}')}", ""]
        lines += ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
        for row in table["rows"]:
            ms, mb = row["ms"], row["peak_mb"]
            cells = [str(row["n_experts"]), str(row["expert_hidden"]), _fmt(ms.get("moe")),
                     _fmt(row.get("router_ms"))]  # fmt: skip
            cells += [_fmt(ms.get(c)) for c in peers] + [_fmt(ms.get("dense"))]
            cells += [_fmt(_ratio(ms.get(c), ms.get("moe")), "{:.2f}") for c in peers]
            cells += [_fmt(_ratio(ms.get("dense"), ms.get("moe")), "{:.2f}")]
            cells += [_fmt(mb.get(c)) for c in contenders]
            lines.append("| " + " | ".join(cells) + " |")
        missing = table.get("unavailable")
        if missing:
            lines += ["", f"Not run: {', '.join(missing)} (not importable here)."]
        skipped = table.get("skipped_experts")
        if skipped:
            shown = ", ".join(map(str, skipped))
            lines += ["", f"Not run: E = {shown} (past --max-seconds)."]
    return "\n".join(lines) + "\n"


def _measure_size(args, k: int, n_experts: int, contenders: list[str], dense: dict) -> dict:
    """One row of the k table: every contender at E = n_experts. dense holds the dense FFN's
    measurement per k once taken (the same D -> k·H -> D at every E)."""
    ms, peak_mb, router_ms = {}, {}, None
    for contender in contenders:
        if contender == "dense" and k in dense:
            measured = dense[k]
        else:
            measured = _run_in_subprocess(args, contender, k, n_experts, args.hidden)
            if contender == "dense":
                dense[k] = measured
        ms[contender] = measured["ms"] if measured else None
        peak_mb[contender] = measured["peak_mb"] if measured else None
        if measured and contender == "moe":
            router_ms = measured["router_ms"]
        shown = "failed" if ms[contender] is None else f"{ms[contender]:9.1f} ms"
        print(f"k={k} E={n_experts:5d} H={args.hidden:5d} {contender:18s} {shown}", flush=True)
    return {
        "n_experts": n_experts, "expert_hidden": args.hidden, "ms": ms, "peak_mb": peak_mb,
        "router_ms": router_ms,
        "ratios": {f"{c}_over_moe": _ratio(ms.get(c), ms.get("moe"))
                   for c in contenders if c != "moe"},
    }  # fmt: skip


def run_driver(args: argparse.Namespace) -> dict:
    have_transformers = transformers_available()
    tables = []
    for k in args.k:
        contenders = [c for c in CONTENDERS[k] if c in args.contenders]
        unavailable = [c for c in contenders if c == "transformers" and not have_transformers]
        table = {"k": k, "contenders": [c for c in contenders if c not in unavailable]}
        table["rows"] = []
        if unavailable:
            table["unavailable"] = unavailable
        tables.append(table)
    # Sizes outside, tables inside: a time limit then cuts the largest sizes of both tables,
    # not the whole of the last one.
    start, dense, skipped = time.perf_counter(), {}, []
    for n_experts in args.experts:
        if args.max_seconds is not None and time.perf_counter() - start > args.max_seconds:
            skipped.append(n_experts)
            continue
        for table in tables:
            row = _measure_size(args, table["k"], n_experts, table["contenders"], dense)
            table["rows"].append(row)
    for table in tables:
        if skipped:
            table["skipped_experts"] = skipped
    return {
        "device": _device_name(args.device),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "tokens": args.tokens,
        "d_model": args.d_model,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "hugepages": args.hugepages,
        "tables": tables,
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eval.bench_moe",
        description="Time the MoE layer, router included, against other projects' designs and "
        "a dense FFN of the same active FLOPs, for k = 4 (noisy top-k) and k = 1 (Switch).",
    )
    parser.add_argument("--json", type=Path, help="write the report here (JSON)")
    parser.add_argument("--markdown", type=Path, help="write the tables here (markdown)")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=1024, help="expert hidden width H")
    parser.add_argument("--experts", type=int, nargs="+", default=list(DEFAULT_EXPERTS))
    parser.add_argument(
        "--k", type=int, nargs="+", default=[4, 1], choices=sorted(CONTENDERS),
        help="which tables: 4 (noisy top-k, dropless) and/or 1 (Switch, capacity 1.25)",
    )  # fmt: skip
    parser.add_argument(
        "--contenders", nargs="+", default=list(ALL_CONTENDERS), choices=ALL_CONTENDERS
    )
    parser.add_argument(
        "--max-seconds", type=float,
        help="start no new size after this many seconds (the sizes left out are reported)",
    )  # fmt: skip
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16"],
        help="expert dtype (default: float32 on CPU, bfloat16 on CUDA; routers run in float32)",
    )  # fmt: skip
    parser.add_argument(
        "--hugepages", action="store_true",
        help="back large CPU tensors with transparent huge pages in every contender "
        "(THP_MEM_ALLOC_ENABLE=1); off by default, as in a user's process",
    )  # fmt: skip
    parser.add_argument("--worker", choices=ALL_CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--n-experts", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--expert-hidden", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.worker:
        args.k = args.k[0]
        return args
    # Bad values are refused here, with exit status 2, rather than by every worker in turn.
    if min(args.tokens, args.d_model, args.hidden, args.repeats, *args.experts) < 1:
        parser.error("--tokens, --d-model, --hidden, --experts and --repeats must be >= 1")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.max_seconds is not None and args.max_seconds <= 0:
        parser.error(f"--max-seconds must be > 0, got {args.max_seconds}")
    if min(args.experts) < max(args.k):
        parser.error(
            f"every --experts value must be >= --k ({max(args.k)}), got {min(args.experts)}"
        )
    if "moe" not in args.contenders:
        parser.error("--contenders must include moe (every ratio is against it)")
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
        print(json.dumps(run_worker(args)))
        return 0
    report = run_driver(args)
    table = markdown_table(report)
    print()
    print(table)
    write_report(report, table, args.json, args.markdown)
    failed = [r for t in report["tables"] for r in t["rows"] if r["ms"].get("moe") is None]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
