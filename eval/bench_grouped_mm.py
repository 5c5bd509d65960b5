"""Benchmark: the experts' grouped product against one dense GEMM of the same FLOPs.

N rows split evenly over E experts, each block times its expert's [D, H] weight
(lstm_moe.moe.experts.grouped_matmul, as the layer calls it: torch._grouped_mm for bf16 on
CUDA, sm90 and newer), against the same N rows times one [D, H] matrix (torch.mm: cuBLAS on
CUDA). Both do 2·N·D·H FLOPs forward and twice that backward (the gradients of the rows and
of the weights), so the ratio of their throughputs is the grouped product's efficiency: how
much of the dense GEMM's speed survives the split into E blocks. MegaBlocks (Gale et al.
2022) reports 98.6% of cuBLAS for its block-sparse products.

Reported per shape (N, D, H) and E: forward and forward + backward TFLOP/s of each, and
grouped over dense. The dense GEMM does not depend on E and is timed once per shape. Times
are medians of --repeats calls after --warmup, with CUDA events on CUDA.

    python -m eval.bench_grouped_mm --shape 32768,512,1024 --experts 8 64 512 \\
        --json bench/grouped_mm.json --markdown bench/grouped_mm.md

Index letters: N rows, D model width, H expert hidden width, E experts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from eval.bench_moe import check_device, check_output_paths, write_report
from lstm_moe.moe.experts import _grouped_mm_supported, _takes_balanced_bmm, grouped_matmul

# The layer benchmark's products (T = 8192 tokens, k = 4, D = 512, H = 1024), and one wide
# enough for the dense GEMM to approach the GPU's peak.
DEFAULT_SHAPES = ((32768, 512, 1024), (65536, 1024, 4096))
DEFAULT_EXPERTS = (8, 32, 128, 512, 1024)


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        n, d, h = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a shape is N,D,H (three integers), got {text!r}"
        ) from None
    if min(n, d, h) < 1:
        raise argparse.ArgumentTypeError(f"N, D and H must be >= 1, got {text!r}")
    return n, d, h


def balanced_counts(n_rows: int, n_experts: int) -> list[int]:
    """Rows per expert, as equal as N allows (the first N mod E experts take one more)."""
    base, extra = divmod(n_rows, n_experts)
    return [base + (expert < extra) for expert in range(n_experts)]


def product_path(rows: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> str:
    """Which of grouped_matmul's products these operands take (without autocast)."""
    if _grouped_mm_supported(rows, weight):
        return "grouped kernel"
    if rows.device.type != "cpu":
        return "padded bmm"
    return "one bmm" if _takes_balanced_bmm(counts, weight) else "per-expert GEMMs"


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def time_product(product, rows, weight, grad_out, device, warmup, repeats) -> dict[str, float]:
    """Forward alone, then forward + backward, of product(rows, weight) -> [N, H]."""

    def forward():
        with torch.no_grad():
            product(rows, weight)

    def forward_backward():
        rows.grad = weight.grad = None
        product(rows, weight).backward(grad_out)

    return {
        "forward_ms": median_ms(forward, device, warmup, repeats),
        "forward_backward_ms": median_ms(forward_backward, device, warmup, repeats),
    }


def tflops(flops: float, ms: float | None) -> float | None:
    return None if ms is None else flops / (ms * 1e-3) / 1e12


def measure_shape(shape, experts, device, dtype, warmup, repeats) -> list[dict]:
    """Rows for every E of one shape: the grouped product's times and the dense GEMM's."""
    n_rows, d_model, hidden = shape
    generator = torch.Generator(device).manual_seed(0)
    options = dict(device=device, dtype=dtype, generator=generator)
    rows = torch.randn(n_rows, d_model, **options).requires_grad_()
    grad_out = torch.randn(n_rows, hidden, **options)
    dense_weight = (torch.randn(d_model, hidden, **options) * d_model**-0.5).requires_grad_()
    dense = time_product(torch.mm, rows, dense_weight, grad_out, device, warmup, repeats)
    del dense_weight
    flops = {"forward": 2.0 * n_rows * d_model * hidden}
    flops["forward_backward"] = 3 * flops["forward"]
    results = []
    for n_experts in experts:
        row = {"n_rows": n_rows, "d_model": d_model, "hidden": hidden, "n_experts": n_experts}
        row["rows_per_expert"] = n_rows / n_experts
        try:
            weight = torch.randn(n_experts, d_model, hidden, **options) * d_model**-0.5
            weight.requires_grad_()
            counts = balanced_counts(n_rows, n_experts)
            row["path"] = product_path(rows, weight, counts)
            counts = torch.tensor(counts, device=device)

            def grouped(r, w, counts=counts):
                return grouped_matmul(r, w, counts)

            grouped_ms = time_product(grouped, rows, weight, grad_out, device, warmup, repeats)
            del weight
        except torch.OutOfMemoryError:
            grouped_ms, row["path"] = {}, "out of memory"
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for kind in ("forward", "forward_backward"):
            mine, theirs = grouped_ms.get(f"{kind}_ms"), dense[f"{kind}_ms"]
            row[f"grouped_{kind}_ms"], row[f"dense_{kind}_ms"] = mine, theirs
            row[f"grouped_{kind}_tflops"] = tflops(flops[kind], mine)
            row[f"dense_{kind}_tflops"] = tflops(flops[kind], theirs)
            row[f"{kind}_ratio"] = None if mine is None else theirs / mine
        results.append(row)
    return results


def _fmt(value, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def markdown_table(report: dict) -> str:
    lines = [
        f"Grouped expert product against one dense GEMM of the same FLOPs, {report['device']}, "
        f"{report['dtype']}, rows split evenly over E experts (median of {report['repeats']} "
        f"after {report['warmup']} warm-up). TFLOP/s counts 2·N·D·H forward, 6·N·D·H forward "
        "+ backward; ratio = grouped throughput / dense.",
        "",
        "| N | D | H | E | rows/expert | path | grouped fwd | dense fwd | fwd ratio "
        "| grouped fwd+bwd | dense fwd+bwd | fwd+bwd ratio |",
        "|" + "---:|" * 5 + "---|" + "---:|" * 6,
    ]
    for row in report["rows"]:
        cells = [str(row["n_rows"]), str(row["d_model"]), str(row["hidden"]),
                 str(row["n_experts"]), f"{row['rows_per_expert']:.0f}", row["path"]]  # fmt: skip
        for kind in ("forward", "forward_backward"):
            cells += [
                _fmt(row[f"grouped_{kind}_tflops"], "{:.1f}"),
                _fmt(row[f"dense_{kind}_tflops"], "{:.1f}"),
                _fmt(row[f"{kind}_ratio"], "{:.1%}"),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = []
    for shape in args.shape:
        rows += measure_shape(shape, args.experts, device, dtype, args.warmup, args.repeats)
        print(f"measured N,D,H = {','.join(map(str, shape))}", flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return {
        "device": name,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "rows": rows,
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eval.bench_grouped_mm",
        description="Throughput of the experts' grouped product against a dense GEMM of the "
        "same FLOPs, forward and forward + backward.",
    )
    parser.add_argument(
        "--shape", type=parse_shape, action="append",
        help="N,D,H: rows, model width, expert width (repeatable; default "
        f"{' and '.join(','.join(map(str, s)) for s in DEFAULT_SHAPES)})",
    )  # fmt: skip
    parser.add_argument("--experts", type=int, nargs="+", default=list(DEFAULT_EXPERTS))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16"],
        help="default: bfloat16 on CUDA (the grouped kernel's dtype), float32 on the CPU",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the report here (JSON)")
    parser.add_argument("--markdown", type=Path, help="write the table here (markdown)")
    args = parser.parse_args(argv)
    args.shape = args.shape or list(DEFAULT_SHAPES)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if min(args.experts) < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--experts and --repeats must be >= 1, --warmup >= 0")
    too_many = [(n, e) for n, _, _ in args.shape for e in args.experts if e > n]
    if too_many:
        parser.error(f"every expert needs a row: E > N in {too_many}")
    check_device(parser, args.device)
    check_output_paths(parser, args.json, args.markdown)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    report = run(args)
    table = markdown_table(report)
    print()
    print(table)
    write_report(report, table, args.json, args.markdown)
    failed = [row for row in report["rows"] if row["grouped_forward_ms"] is None]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
