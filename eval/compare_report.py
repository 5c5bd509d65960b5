"""The comparison's report: routers side by side, per task, from run folders only.

    python -m eval.compare_report runs/compare/* --out runs/compare

(eval.compare writes it after training its grid.) OUT/report.md holds, per task, one table
of every backbone × router × number of experts (quality, speed, size, routing balance and
communication), k=1 against k=4 in one line per backbone, and PNGs: validation quality
against training tokens and against training seconds (one line per router), test quality
against training cost, and the per-expert load of each sparse run. OUT/summary.json holds
the same numbers. Runs trained on other data, for another budget, or scored on another
evaluation set than the others of their task are refused with one line (eval.report's
check_comparable).

With several seeds a row is their mean, ± half their range, and a difference to the dense
model counts as beyond the seeds' spread when the two ranges do not overlap.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

from lstm_moe.files import PATH_ERRORS, read_json, write_json_atomic, write_text_atomic

from .compare_grid import DENSE, K1_VS_K4, ROUTERS, run_label
from .report import check_comparable, plain_log_ticks, read_run

FLOAT32_BYTES = 4


def expert_params(moe: dict) -> int:
    """Parameters of one expert of an MoE config (App. C.1: a ReLU hidden layer and an output
    layer; GEGLU adds a gate matrix; biases where expert_bias)."""
    d, h = moe["d_model"], moe["expert_hidden"]
    matrices = 3 if moe.get("expert_activation") == "geglu" else 2
    return matrices * d * h + ((h + d) if moe.get("expert_bias") else 0)


def experts_per_token(moe: dict) -> float:
    """Expert slots a token fills: k, k_groups·k for the hierarchical gate, c on average for
    expert choice (every expert takes c·T/E tokens)."""
    if moe["router"] == "expert_choice":
        return moe["capacity_factor"] or 2.0
    if moe["router"] == "hierarchical":
        return moe["k_groups"] * moe["k"]
    return moe["k"]


def active_params(row: dict, model: dict) -> int:
    """Parameters a token is computed with: all but the experts it does not use."""
    if not row["moe_layers"]:
        return row["total_params"]
    moe = model["moe"]
    unused = moe["n_experts"] - experts_per_token(moe)
    return round(row["total_params"] - len(row["moe_layers"]) * unused * expert_params(moe))


def all_to_all_bytes(row: dict, model: dict, world_size: int) -> float:
    """Bytes one token sends through the all-to-alls of a forward pass under expert
    parallelism on world_size ranks: every kept (token, expert) row of each MoE layer goes to
    its expert's rank and comes back (2 transfers of d_model float32), and a share
    (W-1)/W of them leaves the rank when experts are spread evenly. The backward sends as
    much again."""
    if not row["moe_layers"] or world_size <= 1:
        return 0.0
    moe = model["moe"]
    kept = sum(experts_per_token(moe) * (1 - m["fraction_dropped"]) for m in row["moe_layers"])
    return kept * moe["d_model"] * FLOAT32_BYTES * 2 * (world_size - 1) / world_size


def read_compared_run(run: Path) -> dict:
    """eval.report's row of a run, with what the comparison adds: its place in the grid
    (compare.json, or the run's config for a folder trained by hand), sizes, balance."""
    row = read_run(run)
    config = read_json(run / "config.json")
    record = read_json(run / "compare.json") if (run / "compare.json").is_file() else {}
    model = config["model"]
    spec = record.get("spec") or {
        "task": row["task"],
        "arch": config.get("arch", "lstm"),
        "router": model["moe"]["router"] if row["moe_layers"] else DENSE,
        "n_experts": model["moe"]["n_experts"] if row["moe_layers"] else 0,
        "seed": config["train"]["seed"],
    }
    world_size = record.get("nproc", 1)
    moe = model.get("moe") if row["moe_layers"] else None
    steps_seconds = row["wall_seconds"]
    row.update(
        arch=spec["arch"],
        router=spec["router"],
        n_experts=spec["n_experts"],
        seed=spec["seed"],
        teacher=spec.get("teacher"),
        label=run_label(spec["router"], spec["n_experts"], spec.get("teacher")),
        experts_per_token=experts_per_token(moe) if moe else None,
        expert_hidden=moe["expert_hidden"] if moe else None,
        active_params=active_params(row, model),
        world_size=world_size,
        all_to_all_bytes=all_to_all_bytes(row, model, world_size),
        all_to_all_bytes_w8=all_to_all_bytes(row, model, 8),
        fraction_dropped=_mean([m["fraction_dropped"] for m in row["moe_layers"]]),
        cv_load=_mean([m["cv_load"] for m in row["moe_layers"]]),
        max_over_mean_load=max((m["max_over_mean_load"] for m in row["moe_layers"]), default=None),
        stage_seconds=record.get("seconds", {}),
        train_step_seconds=steps_seconds,
        quality=row["sacrebleu"] if row["task"] == "translation" else row["test_perplexity"],
        test_nll=read_json(run / "eval" / "perplexity.json")["nll_per_token"],
        experts=_read_experts(run),
    )
    row["mi_bits"], row["mi_fraction"] = _mutual_information(row["experts"])
    return row


def _read_experts(run: Path) -> dict | None:
    """eval.experts' analysis of the run, where it was made."""
    path = run / "eval" / "experts.json"
    return read_json(path) if path.is_file() else None


def _mutual_information(experts: dict | None) -> tuple[float | None, float | None]:
    """I(topic; expert) averaged over the MoE layers, in bits and as a fraction of its
    maximum; None where the corpus has no topics."""
    if not experts or not experts.get("topics_available"):
        return None, None
    layers = [layer["topics"] for layer in experts["layers"] if layer["topics"] is not None]
    if not layers:
        return None, None
    bits = statistics.fmean(t["mi_bits"] for t in layers)
    fractions = [t["mi_fraction"] for t in layers if t["mi_fraction"] is not None]
    return bits, statistics.fmean(fractions) if fractions else None


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


QUALITY = {"lm": ("test perplexity", False), "translation": ("sacreBLEU", True)}


def aggregate(rows: list[dict]) -> list[dict]:
    """One entry per (backbone, router, E): the seeds' mean and half-range of each number."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["arch"], row["label"]].append(row)
    entries = []
    for (arch, label), members in groups.items():
        entry = {"arch": arch, "label": label, "seeds": [m["seed"] for m in members]}
        for key in (
            "quality",
            "test_perplexity",
            "sacrebleu",
            "tokens_per_s",
            "wall_seconds",
            "fraction_dropped",
            "cv_load",
            "max_over_mean_load",
            "tokens_trained",
            "test_nll",
            "mi_bits",
            "mi_fraction",
        ):
            values = [m[key] for m in members if m[key] is not None]
            entry[key] = statistics.fmean(values) if values else None
            entry[key + "_range"] = (min(values), max(values)) if values else None
        first = members[0]
        for key in (
            "router",
            "teacher",
            "n_experts",
            "experts_per_token",
            "expert_hidden",
            "total_params",
            "active_params",
            "ops_per_timestep",
            "all_to_all_bytes",
            "all_to_all_bytes_w8",
            "world_size",
            "moe",
            "layers",
        ):
            entry[key] = first[key]
        entries.append(entry)
    return entries


def beyond_spread(a: dict, b: dict) -> bool:
    """True when the seeds' ranges of quality do not overlap (needs 2+ seeds on each side)."""
    if len(a["seeds"]) < 2 or len(b["seeds"]) < 2:
        return False
    (a_low, a_high), (b_low, b_high) = a["quality_range"], b["quality_range"]
    return a_high < b_low or b_high < a_low


def _fmt(value, spec: str, spread: tuple | None = None) -> str:
    if value is None:
        return "–"
    text = format(value, spec)
    if spread is not None and spread[1] > spread[0]:
        text += " ± " + format((spread[1] - spread[0]) / 2, spec)
    return text


def task_markdown(task: str, entries: list[dict], plots: dict[str, str], left_out: list[str]):
    quality_name, higher_better = QUALITY[task]
    many_seeds = any(len(e["seeds"]) > 1 for e in entries)
    world = entries[0]["world_size"]
    lines = [
        f"## {'Language modelling' if task == 'lm' else 'Translation'}",
        "",
        f"| backbone | router | E | experts/token × width | {quality_name} "
        + ("| test ppl " if task == "translation" else "")
        + "| tokens/s | train s | total params | active params | ops/timestep "
        f"| dropped | CV(load) | max/mean load | a2a bytes/token (W={world}) | (W=8) "
        "| I(topic; expert) |",
        "|---|---|---:|---:|---:|"
        + ("---:|" if task == "translation" else "")
        + "---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in entries:
        width = (
            "–"
            if e["router"] == DENSE
            else f"{_fmt(e['experts_per_token'], 'g')} × {e['expert_hidden']}"
        )
        quality_spec = ".2f"
        router = e["router"] if e["teacher"] is None else f"distilled ← {e['teacher']}"
        mi = None
        if e["mi_bits"] is not None:
            share = "" if e["mi_fraction"] is None else f" ({e['mi_fraction']:.0%})"
            mi = _fmt(e["mi_bits"], ".3f", e["mi_bits_range"]) + share
        cells = [
            e["arch"],
            router,
            "–" if e["router"] == DENSE else str(e["n_experts"]),
            width,
            "**" + _fmt(e["quality"], quality_spec, e["quality_range"]) + "**",
        ]
        if task == "translation":
            cells.append(_fmt(e["test_perplexity"], ".2f", e["test_perplexity_range"]))
        cells += [
            _fmt(e["tokens_per_s"], ",.0f", e["tokens_per_s_range"]),
            _fmt(e["wall_seconds"], ".1f"),
            f"{e['total_params'] / 1e6:.2f}M",
            f"{e['active_params'] / 1e6:.2f}M",
            f"{e['ops_per_timestep'] / 1e6:.3f}M",
            _fmt(e["fraction_dropped"], ".3f"),
            _fmt(e["cv_load"], ".3f"),
            _fmt(e["max_over_mean_load"], ".2f"),
            _fmt(e["all_to_all_bytes"], ",.0f"),
            _fmt(e["all_to_all_bytes_w8"], ",.0f"),
            "–" if mi is None else mi,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"{quality_name} on the test split ({'higher' if higher_better else 'lower'} is "
        "better); tokens/s and train s are measured over the training steps alone; active "
        "params leave out the experts a token does not use; ops/timestep are the multiply-adds "
        "a position costs (active FLOPs ÷ 2, the gating products and the softmax included); "
        "dropped, CV(load) and max/mean load are the test split's, averaged over the MoE "
        "layers (max: the busiest layer); a2a bytes/token are what one token sends through "
        "the forward pass's all-to-alls under expert parallelism on W ranks (the backward "
        "sends as much again), at the run's W and at 8; I(topic; expert) is the mutual "
        "information of the generated corpus's topic and the expert choice in bits "
        "(eval.experts, averaged over the MoE layers), with its share of the maximum.",
    ]
    if many_seeds:
        lines.append(
            "Seeds: mean ± half the range; **beyond spread** marks a difference to the dense "
            "model whose seed ranges do not overlap."
        )
    used = dict.fromkeys(e["router"] for e in entries if e["router"] in ROUTERS)
    lines += ["", "Routers: " + "; ".join(f"{r}: {ROUTERS[r].description}" for r in used) + "."]
    lines += ["", *kvk_lines(task, entries)]
    lines += [*left_out]
    for caption, name in plots.items():
        lines += ["", f"![{caption}]({name})"]
    lines.append("")
    return "\n".join(lines)


# Below this teacher-over-dense gain in test log-perplexity (nats) the kept share is the
# ratio of two noises (Switch Table 6's teacher is 0.19 nats ahead of its dense model).
MIN_TEACHER_GAIN = 0.01


def kvk_lines(task: str, entries: list[dict]) -> list[str]:
    """k=1 against k=4 (and each router against dense), one line per backbone."""
    quality_name, higher_better = QUALITY[task]
    lines = []
    for arch in dict.fromkeys(e["arch"] for e in entries):
        mine = {e["label"]: e for e in entries if e["arch"] == arch}
        dense = mine.get(DENSE)
        top1 = next((e for e in mine.values() if e["router"] == K1_VS_K4[0]), None)
        top4 = (
            next(
                (
                    e
                    for e in mine.values()
                    if e["router"] == K1_VS_K4[1] and e["n_experts"] == top1["n_experts"]
                ),
                None,
            )
            if top1
            else None
        )
        parts = []
        if top1 and top4:
            gain = top4["quality"] - top1["quality"]
            better = "top-4" if (gain > 0) == higher_better else "top-1"
            parts.append(
                f"k=1 vs k=4 at E={top1['n_experts']}: {quality_name} {top1['quality']:.2f} vs "
                f"{top4['quality']:.2f} ({better} ahead by {abs(gain):.2f}), top-1 trains at "
                f"{top1['tokens_per_s'] / top4['tokens_per_s']:.2f}× top-4's tokens/s"
            )
        if dense:
            ahead = [
                e["label"] + (" (beyond spread)" if beyond_spread(e, dense) else "")
                for e in mine.values()
                if e is not dense
                and (e["quality"] > dense["quality"]) == higher_better
                and e["quality"] != dense["quality"]
            ]
            parts.append(
                f"ahead of dense ({dense['quality']:.2f}): {', '.join(ahead) if ahead else 'none'}"
            )
        for student in (e for e in mine.values() if e["teacher"] is not None):
            teacher = mine.get(run_label(student["teacher"], student["n_experts"]))
            if not (dense and teacher):
                continue
            gain = dense["test_nll"] - teacher["test_nll"]
            nlls = (
                f"test log-perplexity {student['test_nll']:.3f} against dense "
                f"{dense['test_nll']:.3f} and teacher {teacher['test_nll']:.3f}"
            )
            if gain < MIN_TEACHER_GAIN:
                parts.append(
                    f"distilled from {teacher['label']}: {nlls}; the teacher is not "
                    f"{MIN_TEACHER_GAIN} nats ahead of dense, so it has no gain to keep"
                )
                continue
            share = (dense["test_nll"] - student["test_nll"]) / gain
            note = (
                " — more than the teacher's own gain: the student starts from non-expert "
                "weights already trained on these tokens, a head start a run this short does "
                "not wash out"
                if share > 1
                else ""
            )
            parts.append(
                f"distilled from {teacher['label']}: keeps {share:.0%} of its gain over dense "
                f"({nlls}; Switch Table 6: 29 %){note}"
            )
        if parts:
            lines.append(f"- **{arch}**: " + "; ".join(parts) + ".")
    return lines


def experts_sections(rows: list[dict], out: Path) -> list[str]:
    """What the experts of the k=1 and k=4 runs learned (eval.experts): per backbone, the
    first seed at the first experts count of the grid (the main one); the other runs' mutual
    information is in the table and their heat maps in their eval/ folders."""
    import os

    from .experts import markdown_section

    shown, sections = set(), []
    for r in rows:
        key = (r["arch"], r["router"])
        if r["experts"] is None or r["router"] not in K1_VS_K4 or key in shown:
            continue
        shown.add(key)
        images = os.path.relpath(Path(r["run"]) / "eval", out)
        sections.append(markdown_section(r["experts"], r["name"], images + "/"))
    return sections


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(path)


def plot_curves(task: str, rows: list[dict], path: Path, x_key: str, x_label: str) -> None:
    """Validation perplexity against training tokens or seconds, one panel per backbone,
    one line per router (the first seed of each)."""
    plt = _plt()
    archs = list(dict.fromkeys(r["arch"] for r in rows))
    fig, axes = plt.subplots(1, len(archs), figsize=(6 * len(archs), 4.2), dpi=110, squeeze=False)
    for ax, arch in zip(axes[0], archs, strict=True):
        seen = set()
        for r in rows:
            if r["arch"] != arch or r["label"] in seen or not r[x_key]:
                continue
            seen.add(r["label"])
            x, y = zip(*r[x_key], strict=True)
            style = {"color": "black", "linestyle": "--"} if r["router"] == DENSE else {}
            ax.plot(x, y, marker="o", markersize=3, label=r["label"], **style)
        ax.set_xlabel(x_label)
        ax.set_ylabel("validation perplexity")
        ax.set_yscale("log")
        plain_log_ticks(ax.yaxis)
        ax.set_title(f"{task}, {arch}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_cost(task: str, entries: list[dict], path: Path) -> None:
    """Test quality against training seconds for the budget, one point per run."""
    plt = _plt()
    quality_name, _ = QUALITY[task]
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=110)
    markers = {"lstm": "o", "transformer": "s"}
    for e in entries:
        if e["wall_seconds"] is None:
            continue
        color = "black" if e["router"] == DENSE else None
        ax.scatter(e["wall_seconds"], e["quality"], marker=markers.get(e["arch"], "o"), c=color)
        ax.annotate(f"{e['arch']} {e['label']}", (e["wall_seconds"], e["quality"]), fontsize=6)
    ax.set_xlabel("training seconds for the budget (cost)")
    ax.set_ylabel(f"test {quality_name}")
    ax.set_title(f"{task}: quality against cost (circles LSTM, squares Transformer)", fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_loads(task: str, rows: list[dict], path: Path) -> bool:
    """Each sparse run's tokens per expert on the test split over the mean, busiest first,
    one panel per run (first seed), one bar series per MoE layer. False if none is sparse."""
    sparse = []
    for r in rows:
        if r["tokens_per_expert"] and all(
            s["label"] != r["label"] or s["arch"] != r["arch"] for s in sparse
        ):
            sparse.append(r)
    if not sparse:
        return False
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    cols = min(4, len(sparse))
    n_rows = -(-len(sparse) // cols)
    fig, axes = plt.subplots(
        n_rows, cols, figsize=(3.2 * cols, 2.4 * n_rows), dpi=100, squeeze=False
    )
    for ax in axes.flat[len(sparse) :]:
        ax.axis("off")
    for ax, r in zip(axes.flat, sparse, strict=False):
        for layer, counts in enumerate(r["tokens_per_expert"]):
            mean = sum(counts) / len(counts) if counts else 0
            shares = sorted((c / mean if mean else 0.0 for c in counts), reverse=True)
            # one filled step outline per layer: a bar per expert is one artist each, which
            # at E = 256 and a dozen panels costs seconds to draw
            ax.stairs(shares, range(len(shares) + 1), fill=True, alpha=0.5, label=f"layer {layer}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        if len(r["tokens_per_expert"]) > 1:
            ax.legend(fontsize=6)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{r['arch']} {r['label']}", fontsize=8)
        ax.set_xlabel("experts, busiest first", fontsize=7)
        ax.set_ylabel("load / mean", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def comparison_cost(rows: list[dict], report_seconds: float | None = None) -> dict:
    """What the comparison spent beyond training steps: evaluation (validation along
    training, the test split, beam search, the experts' analysis), checkpoints, start-up,
    plotting and bookkeeping. Summed over the stages each run recorded in its compare.json
    (a resumed run's train stage adds up every attempt), plus writing this report: the same
    figure whether the grid ran in one invocation or was resumed and reused in several."""
    costed = [r for r in rows if r["stage_seconds"]]
    steps = sum(r["train_step_seconds"] or 0.0 for r in costed)
    stages: dict[str, float] = defaultdict(float)
    for r in costed:
        for stage, seconds in r["stage_seconds"].items():
            stages[stage] += seconds
    if report_seconds is not None:
        stages["report"] += report_seconds
    total = sum(stages.values())
    return {
        "runs": len(costed),
        "training_step_seconds": steps,
        "stage_seconds": dict(stages),
        "total_seconds": total,
        "overhead_fraction": 1 - steps / total if steps and total else None,
    }


def write_comparison(runs: list[Path], out: Path, title: str, grid=None) -> dict:
    """Read every run folder, check that each task's runs are comparable, write the report,
    the PNGs and summary.json (last). grid: the GridConfig the runs came from, if any."""
    started = time.perf_counter()
    rows = []
    for run in map(Path, runs):
        try:
            rows.append(read_compared_run(run))
        except KeyError as error:
            raise ValueError(
                f"{run}: a run file has no field {error}; was it written by another version?"
            ) from None
    out.mkdir(parents=True, exist_ok=True)
    from .compare_grid import left_out

    absent = [f"Left out — {line}." for line in left_out(grid)] if grid else []
    sections, tasks_summary = [f"# {title}", ""], {}
    for task in dict.fromkeys(r["task"] for r in rows):
        task_rows = [r for r in rows if r["task"] == task]
        check_comparable(task_rows)
        entries = aggregate(task_rows)
        plots = {
            "validation perplexity against training tokens": f"valid-tokens-{task}.png",
            "validation perplexity against training seconds": f"valid-seconds-{task}.png",
            "test quality against training cost": f"cost-{task}.png",
        }
        plot_curves(
            task, task_rows, out / plots[next(iter(plots))], "valid_curve", "training tokens"
        )
        plot_curves(
            task,
            task_rows,
            out / f"valid-seconds-{task}.png",
            "valid_curve_seconds",
            "seconds of training steps",
        )
        plot_cost(task, entries, out / f"cost-{task}.png")
        if plot_loads(task, task_rows, out / f"load-{task}.png"):
            plots["per-expert load on the test split"] = f"load-{task}.png"
        mine = [line for line in absent if line.startswith(f"Left out — {task}/")]
        sections.append(task_markdown(task, entries, plots, mine))
        sections += experts_sections(task_rows, out)
        tasks_summary[task] = {"entries": entries, "plots": list(plots.values())}
    cost = comparison_cost(rows, time.perf_counter() - started)
    if cost["overhead_fraction"] is not None:
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in cost["stage_seconds"].items())
        sections += [
            "## What the comparison cost",
            "",
            f"{cost['total_seconds']:.0f} s over the {cost['runs']} runs' stages and this "
            f"report, {cost['training_step_seconds']:.0f} s of them training steps: overhead "
            f"(start-up, validation, checkpoints, test evaluation, beam search, the experts' "
            f"analysis, plots) {100 * cost['overhead_fraction']:.1f} % (stages: {stages}). "
            "Summed from each run's compare.json, so reused and resumed runs count what they "
            "cost when they were trained.",
            "",
        ]
    write_text_atomic(out / "report.md", "\n".join(sections))
    summary = {
        "title": title,
        "tasks": tasks_summary,
        "runs": [
            {
                k: r[k]
                for k in (
                    "name",
                    "run",
                    "task",
                    "arch",
                    "router",
                    "n_experts",
                    "seed",
                    "quality",
                    "test_perplexity",
                    "sacrebleu",
                    "tokens_trained",
                    "tokens_per_s",
                    "wall_seconds",
                    "total_params",
                    "active_params",
                    "ops_per_timestep",
                    "fraction_dropped",
                    "cv_load",
                    "max_over_mean_load",
                    "all_to_all_bytes",
                    "world_size",
                    "tokens_per_expert",
                    "valid_curve",
                )
            }
            for r in rows
        ],
        "cost": cost,
    }
    write_json_atomic(out / "summary.json", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eval.compare_report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("runs", nargs="+", type=Path, help="evaluated run folders")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--title", default="Routers side by side")
    args = parser.parse_args(argv)
    try:
        summary = write_comparison(args.runs, args.out, args.title)
    except (KeyError, ValueError, *PATH_ERRORS) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out / 'report.md'} ({len(summary['runs'])} runs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
