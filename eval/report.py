"""Side-by-side report of trained models: a table, a plot of validation perplexity against
training tokens, and a machine-readable summary. It reads only run folders (their
config.json, metrics.jsonl, eval/perplexity.json and, for translation, eval/bleu.json),
never the models.

    python -m eval.report runs/demo/dense runs/demo/moe --out runs/demo --title "..."

writes OUT/report.md, OUT/valid_perplexity.png and OUT/summary.json. Runs of several tasks
(language models and translation models) get a section each, compared within their task, with
a plot each (valid_perplexity-<task>.png). A run folder that is missing, incomplete or
malformed, or runs of one task evaluated on different data, are one `error: ...` line and exit
status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lstm_moe.files import PATH_ERRORS, read_json, write_json_atomic, write_text_atomic


def plain_log_ticks(axis) -> None:
    """Perplexities as plain numbers on a log axis (215, 250, 300), not as 2.5 × 10^2; call
    after plotting. The minor ticks are labelled only where the axis spans under a decade
    (else they would crowd it)."""
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    low, high = axis.get_view_interval()
    axis.set_major_formatter(FormatStrFormatter("%g"))
    narrow = low > 0 and high / low < 10
    axis.set_minor_formatter(FormatStrFormatter("%g") if narrow else NullFormatter())


def read_run(run: Path) -> dict:
    """Everything the report needs from one run folder."""
    config_path = run / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} not found: {run} is not a run folder (lstm_moe.train writes one)"
        )
    config = read_json(config_path)
    metrics = []
    for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a last line cut short by a kill
        if isinstance(entry, dict):
            metrics.append(entry)
    evaluation_path = run / "eval" / "perplexity.json"
    if not evaluation_path.is_file():
        raise FileNotFoundError(
            f"{evaluation_path} not found: run `python -m eval.perplexity {run}` first"
        )
    evaluation = read_json(evaluation_path)
    task = config.get("task", "lm")
    bleu = None
    if task == "translation":
        bleu_path = run / "eval" / "bleu.json"
        if not bleu_path.is_file():
            raise FileNotFoundError(
                f"{bleu_path} not found: run `python -m eval.translate {run}` first"
            )
        bleu = read_json(bleu_path)
    train = [m for m in metrics if m["kind"] == "train"]
    valid = [m for m in metrics if m["kind"] == "valid"]
    last = train[-1] if train else {}
    model = config["model"]
    ops = config["ops_per_timestep"]
    return {
        "name": run.name,
        "run": str(run),
        "task": task,
        "preset": config.get("preset"),
        "layers": _describe_layers(model),
        "moe": _describe_moe(model),
        # Experts per token (k; k_groups·k for the hierarchical gate) and the router's name.
        "router": model["moe"]["router"] if _has_moe(model) else None,
        "experts_per_token": _experts_per_token(model["moe"]) if _has_moe(model) else None,
        # A translation model counts an encoder and a decoder position (lstm_moe.nmt).
        "ops_per_timestep": ops["total"] if isinstance(ops, dict) else ops,
        "params_excl_embedding_softmax": config["params_excl_embedding_softmax"],
        "total_params": config["total_params"],
        "tokens_trained": evaluation["tokens_trained"],
        "wall_seconds": last.get("elapsed"),
        "tokens_per_s": last["tokens"] / last["elapsed"] if last.get("elapsed") else None,
        "valid_curve": [(m["tokens"], m["valid_ppl"]) for m in valid],
        # The same points against seconds of training steps (validation not counted).
        "valid_curve_seconds": [(m["elapsed"], m["valid_ppl"]) for m in valid if "elapsed" in m],
        "test_perplexity": evaluation["perplexity"],
        "test_tokens": evaluation["tokens"],
        "moe_layers": [
            {k: v for k, v in layer.items() if k != "tokens_per_expert"}
            for layer in evaluation["moe_layers"]
        ],
        "tokens_per_expert": [layer["tokens_per_expert"] for layer in evaluation["moe_layers"]],
        "entropy_floor": evaluation.get("entropy_floor"),
        "sacrebleu": bleu["sacrebleu"]["score"] if bleu else None,
        "sacrebleu_signature": bleu["sacrebleu"]["signature"] if bleu else None,
        "tokenized_bleu": bleu["tokenized"]["score"] if bleu else None,
        # What the runs trained on and for how long: compared only if these agree too.
        "trained_for": {
            "recipe_id": config["data"].get("recipe_id"),
            **{
                name: config.get("train", {}).get(name)
                for name in ("max_tokens", "max_steps", "max_seconds")
            },
        },
        # What the test scores were measured on: runs are compared only if these agree.
        "evaluated_on": {
            "task": task,
            "recipe_id": config["data"].get("recipe_id"),
            "vocab_sha256": config["data"].get("vocab_sha256"),
            "split": evaluation.get("split"),
            "tokens": evaluation["tokens"],
            **({"bleu_sentences": bleu["sentences"]} if bleu else {}),
        },
    }


def check_comparable(rows: list[dict]) -> None:
    """Runs are put side by side only when they trained on the same data for the same budget
    (tokens, steps or seconds) and were scored on the same dataset, vocabulary, split, number
    of tokens (and BLEU sentences); else a ValueError names the first difference."""
    first = rows[0]
    for row in rows[1:]:
        for key, what in (("trained_for", "trained"), ("evaluated_on", "evaluated")):
            if row[key] != first[key]:
                differ = sorted(k for k in row[key] if row[key].get(k) != first[key].get(k))
                details = ", ".join(f"{k} {row[key].get(k)} vs {first[key].get(k)}" for k in differ)
                raise ValueError(
                    f"{row['run']} and {first['run']} were not {what} alike ({details}): "
                    "their results are not comparable"
                )


def _describe_layers(model: dict) -> str:
    if "layers" in model:
        return "-".join(model["layers"])
    if "n_layers" in model:  # a Transformer LM (switch.config)
        return _transformer_stack(
            model["n_layers"], model["moe_layers"], model.get("attention_moe_layers", [])
        )
    if isinstance(model["encoder_layers"], int):  # an encoder-decoder Transformer
        encoder = _transformer_stack(
            model["encoder_layers"],
            model["encoder_moe_layers"],
            model.get("encoder_attention_moe_layers", []),
        )
        decoder = _transformer_stack(
            model["decoder_layers"],
            model["decoder_moe_layers"],
            model.get("decoder_attention_moe_layers", []),
        )
        return f"enc {encoder}, dec {decoder}"
    return "enc " + "-".join(model["encoder_layers"]) + ", dec " + "-".join(model["decoder_layers"])


def _transformer_stack(
    n_layers: int, moe_layers: list[int], attention_moe_layers: list[int] = ()
) -> str:
    """A Transformer stack as its feed-forward layers, "+qkv" where the attention's Q/K/V
    projection is routed to experts too: "ffn-moe-ffn-moe", "ffn-moe+qkv-ffn-moe+qkv"."""
    return "-".join(
        ("moe" if i in moe_layers else "ffn") + ("+qkv" if i in attention_moe_layers else "")
        for i in range(n_layers)
    )


def _has_moe(model: dict) -> bool:
    if "layers" in model:  # the LSTM LM
        return "moe" in model["layers"]
    if isinstance(model.get("encoder_layers"), list):  # the LSTM translation model
        return "moe" in (*model["encoder_layers"], *model["decoder_layers"])
    keys = (  # Transformers
        "moe_layers",
        "encoder_moe_layers",
        "decoder_moe_layers",
        "attention_moe_layers",
        "encoder_attention_moe_layers",
        "decoder_attention_moe_layers",
    )
    return any(model.get(key) for key in keys)


def _experts_per_token(moe: dict) -> float:
    if moe["router"] == "expert_choice":
        return moe.get("capacity_factor") or 2.0
    if moe["router"] == "hierarchical":
        return moe["k_groups"] * moe["k"]
    return moe["k"]


def k_table(rows: list[dict]) -> list[str]:
    """k=1 against k=4: the runs routing each token to one expert beside those routing it to
    four (none when the runs do not hold both), the dense runs as the baseline."""
    one = [r for r in rows if r["experts_per_token"] == 1]
    four = [r for r in rows if r["experts_per_token"] == 4]
    if not one or not four:
        return []
    dense = [r for r in rows if r["router"] is None]
    translation = rows[0]["task"] == "translation"
    lines = [
        "",
        "k=1 vs k=4 (the same data, tokens and ops/timestep):",
        "",
        "| model | router | k | MoE | test ppl |"
        + (" sacreBLEU |" if translation else "")
        + " tokens/s | vs dense tokens/s | dropped (test) | CV(load) |",
        "|---|---|---:|---|---:|" + ("---:|" if translation else "") + "---:|---:|---:|---:|",
    ]
    base = dense[0]["tokens_per_s"] if dense and dense[0]["tokens_per_s"] else None
    for r in [*one, *four, *dense]:
        layers = r["moe_layers"]
        dropped = max((m.get("fraction_dropped", 0.0) for m in layers), default=None)
        cv = sum(m["cv_load"] for m in layers) / len(layers) if layers else None
        speed = r["tokens_per_s"] / base if base and r["tokens_per_s"] else None
        lines.append(
            f"| {r['name']} | {r['router'] or 'dense'} | {_fmt(r['experts_per_token'], 'g')} "
            f"| {r['moe']} | {r['test_perplexity']:.2f} |"
            + (f" {r['sacrebleu']:.2f} |" if translation else "")
            + f" {_fmt(r['tokens_per_s'], ',.0f')} | {_fmt(speed, '.2f')} "
            f"| {_fmt(dropped, '.3f')} | {_fmt(cv, '.3f')} |"
        )
    return lines


def _describe_moe(model: dict) -> str:
    if not _has_moe(model):
        return "-"
    model = model["moe"]  # the MoE layer's config
    text = f"{model['n_experts']} experts × {model['expert_hidden']}, k={model['k']}"
    if model["router"] == "hierarchical":
        text = (
            f"{model['n_groups']} groups × {model['n_experts'] // model['n_groups']} experts × "
            f"{model['expert_hidden']}, k={model['k_groups']}·{model['k']}"
        )
    elif model["router"] != "noisy_topk":
        text += f" ({model['router']})"
    return text


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


TASK_TITLES = {"lm": "Language models", "translation": "Translation models"}


def markdown(rows: list[dict], title: str, floor: dict | None, plot_name: str, level: int) -> str:
    lines = [f"{'#' * level} {title}", ""]
    translation = rows[0]["task"] == "translation"
    bleu_head = " sacreBLEU | tok. BLEU |" if translation else ""
    lines += [
        "| model | layers | MoE | ops/timestep | params excl. emb./softmax | total params "
        f"| tokens trained | wall s | tokens/s | test ppl |{bleu_head}",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if translation else ""),
    ]
    for r in rows:
        bleu = f" **{r['sacrebleu']:.2f}** | {r['tokenized_bleu']:.2f} |" if translation else ""
        lines.append(
            f"| {r['name']} | {r['layers']} | {r['moe']} | {r['ops_per_timestep'] / 1e6:.3f}M "
            f"| {r['params_excl_embedding_softmax'] / 1e6:.2f}M | {r['total_params'] / 1e6:.2f}M "
            f"| {r['tokens_trained']:,} | {_fmt(r['wall_seconds'], '.0f')} "
            f"| {_fmt(r['tokens_per_s'], ',.0f')} | {r['test_perplexity']:.2f} |{bleu}"
        )
    if translation:
        lines += [
            "",
            "Translation: ops/timestep are an encoder plus a decoder position, softmax "
            "included; tokens are target word pieces; perplexity is per target word piece "
            "(teacher-forced); BLEU of beam search on the test split, sacreBLEU "
            f"`{rows[0]['sacrebleu_signature']}`, and Moses-tokenized BLEU as the paper reports.",
        ]
    if floor:
        lines += [
            "",
            f"Entropy floor of the corpus (no model that is not told the topic can beat it): "
            f"perplexity **{floor['perplexity']:.3f}**"
            + (
                "; the oracle's perplexity on this test split: "
                f"{floor['test_oracle_perplexity']:.3f}."
                if "test_oracle_perplexity" in floor
                else "."
            ),
        ]
    moe_rows = [(r["name"], i, m) for r in rows for i, m in enumerate(r["moe_layers"])]
    if moe_rows:
        lines += [
            "",
            "Routing on the test split (Load = routed tokens per expert):",
            "",
            "| model | MoE layer | CV(load) | CV(importance) | max/mean load | unused experts |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, i, m in moe_rows:
            lines.append(
                f"| {name} | {i} | {m['cv_load']:.3f} | {m['cv_importance']:.3f} "
                f"| {m['max_over_mean_load']:.2f} | {m['unused_experts']} |"
            )
    lines += k_table(rows)
    lines += ["", f"![validation perplexity against training tokens]({plot_name})", ""]
    return "\n".join(lines)


def plot(rows: list[dict], floor: dict | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for r in rows:
        if r["valid_curve"]:
            tokens, ppl = zip(*r["valid_curve"], strict=True)
            ax.plot(tokens, ppl, marker="o", markersize=3, label=f"{r['name']} ({r['moe']})")
    if floor:
        ax.axhline(floor["perplexity"], color="black", linestyle="--", linewidth=1)
        ax.annotate(
            f"entropy floor {floor['perplexity']:.2f}",
            (0.99, floor["perplexity"]),
            xycoords=("axes fraction", "data"),
            ha="right",
            va="bottom",
            fontsize=8,
        )
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    plain_log_ticks(ax.yaxis)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def write_report(runs: list[Path], out: Path, title: str) -> dict:
    rows = []
    for run in map(Path, runs):
        try:
            rows.append(read_run(run))
        except KeyError as error:
            raise ValueError(
                f"{run}: config.json, metrics.jsonl or eval/perplexity.json has no field"
                f" {error}; was the run written by another version of the code?"
            ) from None
    tasks = list(dict.fromkeys(r["task"] for r in rows))  # in the order given
    groups = {task: [r for r in rows if r["task"] == task] for task in tasks}
    for group in groups.values():
        check_comparable(group)
    out.mkdir(parents=True, exist_ok=True)
    sections, best = [], {}
    for task, group in groups.items():
        floor = next((r["entropy_floor"] for r in group if r["entropy_floor"]), None)
        plot_name = "valid_perplexity.png" if len(groups) == 1 else f"valid_perplexity-{task}.png"
        section_title = title if len(groups) == 1 else TASK_TITLES.get(task, task)
        plot(group, floor, out / (plot_name + ".tmp"), section_title)
        (out / (plot_name + ".tmp")).replace(out / plot_name)
        text = markdown(group, section_title, floor, plot_name, 1 if len(groups) == 1 else 2)
        if task == "translation":
            winner = max(group, key=lambda r: r["sacrebleu"])
            text += f"\nHighest sacreBLEU: **{winner['name']}** ({winner['sacrebleu']:.2f}).\n"
        else:
            winner = min(group, key=lambda r: r["test_perplexity"])
            text += (
                f"\nLowest test perplexity: **{winner['name']}** "
                f"({winner['test_perplexity']:.2f}).\n"
            )
        best[task] = winner["name"]
        sections.append(text)
    if len(groups) > 1:
        sections.insert(0, f"# {title}\n")
    write_text_atomic(out / "report.md", "\n".join(sections))
    floors = [r["entropy_floor"] for r in rows if r["entropy_floor"]]
    summary = {
        "title": title,
        "entropy_floor_perplexity": floors[0]["perplexity"] if floors else None,
        "models": [
            {
                "name": r["name"],
                "task": r["task"],
                "test_perplexity": r["test_perplexity"],
                "sacrebleu": r["sacrebleu"],
                "tokenized_bleu": r["tokenized_bleu"],
                "tokens_trained": r["tokens_trained"],
                "ops_per_timestep": r["ops_per_timestep"],
                "params_excl_embedding_softmax": r["params_excl_embedding_softmax"],
                "total_params": r["total_params"],
                "wall_seconds": r["wall_seconds"],
                "tokens_per_s": r["tokens_per_s"],
                "moe_layers": r["moe_layers"],
            }
            for r in rows
        ],
        "plots": [
            "valid_perplexity.png" if len(groups) == 1 else f"valid_perplexity-{t}.png"
            for t in groups
        ],
    }
    # The best run of the first task (the only one in a one-task report), and of each task.
    summary["best"] = best[tasks[0]]
    summary["best_by_task"] = best
    write_json_atomic(out / "summary.json", summary)  # written last
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eval.report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("runs", nargs="+", type=Path, help="evaluated run folders")
    parser.add_argument("--out", type=Path, required=True, help="folder for the report")
    parser.add_argument("--title", default="Models compared")
    args = parser.parse_args(argv)
    try:
        summary = write_report(args.runs, args.out, args.title)
    except (KeyError, ValueError, *PATH_ERRORS) as error:  # bad input
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the disk failed or is full
        print(f"error: {error}", file=sys.stderr)
        return 1
    for model in summary["models"]:
        bleu = f", sacreBLEU {model['sacrebleu']:.2f}" if model["sacrebleu"] is not None else ""
        print(f"{model['name']:>12}: test perplexity {model['test_perplexity']:.2f}{bleu}")
    if summary["entropy_floor_perplexity"]:
        print(f"{'floor':>12}: {summary['entropy_floor_perplexity']:.2f}")
    written = ("report.md", *summary["plots"], "summary.json")
    print("wrote " + ", ".join(str(args.out / name) for name in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
