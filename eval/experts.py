"""What the experts learned: the tokens each expert of each MoE layer is routed most often, and,
on the generated corpora whose topics are known, how much expert choice says about the topic
(Shazeer et al. 2017, Table 9 shows the contexts routed to a few experts of a translation
model's encoder; here every expert's are counted, and their topic structure is measured).

    python -m eval.experts runs/NAME [--split test] [--max_tokens 20000] [--top 10]

writes runs/NAME/eval/experts.json and, where topics are known, one heat map per MoE layer,
runs/NAME/eval/experts-topics-layer<i>.png (topics × experts). It reads the model as
evaluation does (eval.perplexity), on the first max_tokens tokens of the split (the first
pairs holding that many target tokens, for translation), and the routing through a hook on
each router (eval.expert_routing): the model computes exactly what it always does.

Top tokens. For every (token, expert) pair the router chose (all k of a top-k router, before
any capacity), the token at that position: a language model's input token there, a
translation encoder's source token (and its context, the token with a word on each side,
`w0012 [w0040] w0007`), a decoder's input token (BOS, then the target's words). Counts are of
routed pairs; an expert's load is its number of routed pairs.

Topics. data_prep.synthetic stores the topic of each valid and test sentence, and
data_prep.synthetic_parallel that of each pair (`<split>.topic`, meta.json's split extras);
a token's topic is its sentence's. Real corpora (lm1b, WMT) have none: the output then says so
and has no mutual information.

Mutual information. Over the routed pairs of a layer, each token's pairs weigh 1/(its number
of pairs), so every routed token weighs 1 whether it went to one expert or to k (top-1 and
top-k layers are comparable, and a token routed to no expert counts for nothing). Summed by
(topic of the token, expert), these weights are the joint counts C[t, e]; with p = C / ΣC,

    I(topic; expert) = Σ_{t,e} p(t, e) log2( p(t, e) / (p(t) p(e)) )   bits,

0 when expert choice is independent of the topic. It is at most min(H(topic), H(expert)) <=
min(log2 #topics, log2 E), the maximum the fraction is reported against (#topics: the topics
of the evaluated tokens). A top-k layer whose k experts share a token's weight reaches at most
log2(E / k) even when its experts are perfectly topic-specific.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from eval.expert_routing import (
    LayerRouting,
    TokenTable,
    lm_routing,
    lm_tokens,
    pair_routing,
    pair_tokens,
)
from lstm_moe.files import PATH_ERRORS, read_json, read_split, read_split_extra, write_json_atomic
from lstm_moe.pairs import read_pairs
from lstm_moe.runtime import enable_cpu_hugepages, resolve_device
from lstm_moe.tasks import lm, translation
from lstm_moe.tasks.common import run_architecture

MAX_TOKENS = 20_000
TOP = 10
LM_LANES = 16  # eval.perplexity's default lanes
PAIR_BATCH = 64  # and its sentence pairs per batch
NO_TOPICS = (
    "the dataset stores no topics (only the generated corpora do, since data_prep.synthetic's "
    "markov-topics/2): no mutual information"
)


# ----------------------------------------------------------------------------- the measures


def mutual_information_bits(joint_counts: Tensor) -> float:
    """I(topic; expert) in bits of the joint distribution p = joint_counts / Σ joint_counts:

        I = Σ_{t,e} p(t, e) log2( p(t, e) / (p(t) p(e)) ),  p(t) = Σ_e p(t, e), p(e) = Σ_t p(t, e)

    joint_counts: [topics, E] float, >= 0. Here C[t, e] sums, over the routed (token, expert)
    pairs of a layer whose token has topic t and whose expert is e, the weight 1 / (the number
    of pairs of that token), so each routed token weighs 1 (top-k and top-1 comparable).
    0 log 0 = 0; an all-zero matrix has 0 bits. The result lies in [0, min(log2 #topics,
    log2 E)] (max_mutual_information_bits): 0 when expert choice is independent of the
    topic, log2 E when E topics each go to their own expert."""
    joint = torch.as_tensor(joint_counts, dtype=torch.float64)
    if joint.dim() != 2:
        raise ValueError(f"joint_counts must be [topics, E], got shape {tuple(joint.shape)}")
    if (joint < 0).any():
        raise ValueError("joint_counts must be >= 0")
    total = joint.sum()
    if total <= 0:
        return 0.0
    p = joint / total  # [topics, E]
    independent = p.sum(1, keepdim=True) * p.sum(0, keepdim=True)  # p(t) p(e), [topics, E]
    used = p > 0  # where p(t, e) > 0, p(t) p(e) > 0 too
    bits = (p[used] * (p[used] / independent[used]).log2()).sum()
    return max(0.0, float(bits))  # rounding can leave -1e-17 for independent routing


def max_mutual_information_bits(n_topics: int, n_experts: int) -> float:
    """min(log2 #topics, log2 E): the bound of I(topic; expert) (module docstring)."""
    return min(math.log2(max(n_topics, 1)), math.log2(max(n_experts, 1)))


def pair_weights(token: np.ndarray) -> np.ndarray:
    """[P] float64: 1 / (the number of pairs of each pair's token), so each token weighs 1."""
    if token.size == 0:
        return np.zeros(0)
    _, inverse, counts = np.unique(token, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse]


def topic_expert_counts(
    topic: np.ndarray, expert: np.ndarray, weight: np.ndarray, n_topics: int, n_experts: int
) -> np.ndarray:
    """[n_topics, n_experts] float64: Σ weight of the pairs of each (topic, expert)."""
    flat = np.bincount(topic * n_experts + expert, weights=weight, minlength=n_topics * n_experts)
    return flat.reshape(n_topics, n_experts)


def top_counts(
    expert: np.ndarray, keys: np.ndarray, n_experts: int, top: int
) -> list[list[tuple[tuple[int, ...], int]]]:
    """For each expert, its `top` most frequent keys with their counts, most frequent first
    (ties: the smaller key first). expert: [P]; keys: [P, C] int64, one key (a token id, or
    a context of ids) per routed pair."""
    rows = np.concatenate([expert[:, None], keys], axis=1)  # [P, 1 + C]
    found: list[list[tuple[tuple[int, ...], int]]] = [[] for _ in range(n_experts)]
    if len(rows) == 0:
        return found
    unique, counts = np.unique(rows, axis=0, return_counts=True)  # sorted by expert, then key
    for e in range(n_experts):
        mine = np.flatnonzero(unique[:, 0] == e)
        order = mine[np.argsort(-counts[mine], kind="stable")][:top]
        found[e] = [(tuple(unique[i, 1:].tolist()), int(counts[i])) for i in order]
    return found


# ----------------------------------------------------------------------------- one layer


def read_words(data_dir: Path, meta: dict) -> list[str]:
    """Each id's word (LM datasets: vocab["file"], `word<TAB>count`) or word piece (parallel
    datasets: vocab["text"], `piece<TAB>score`, beside the sentencepiece model's vocab["file"])."""
    vocab = meta["vocab"]
    name = vocab.get("text", vocab["file"])
    lines = (Path(data_dir) / name).read_text(encoding="utf-8").splitlines()
    return [line.rpartition("\t")[0] for line in lines]


def _word(words: list[str], token: int) -> str:
    return words[token] if 0 <= token < len(words) else f"<{token}>"


def _context(words: list[str], left: int, token: int, right: int) -> str:
    parts = [_word(words, left)] if left >= 0 else []
    parts.append(f"[{_word(words, token)}]")
    if right >= 0:
        parts.append(_word(words, right))
    return " ".join(parts)


def analyse_layer(
    layer: LayerRouting, table: TokenTable, words: list[str], top: int, index: int
) -> dict:
    """One MoE layer's entry of experts.json (see analyse_run)."""
    token, expert = layer.pairs()  # [P] each
    E = layer.n_experts
    load = np.bincount(expert, minlength=E)  # [E] routed pairs
    ids = table.ids[token]  # [P]
    by_token = top_counts(expert, ids[:, None], E, top)
    by_context = None
    if layer.side == "encoder":
        context = np.stack([table.left[token], ids, table.right[token]], axis=1)  # [P, 3]
        by_context = top_counts(expert, context, E, top)
    experts = []
    for e in range(E):
        entry = {
            "expert": e,
            "load": int(load[e]),
            "top_tokens": [[_word(words, key[0]), count] for key, count in by_token[e]],
        }
        if by_context is not None:
            entry["top_contexts"] = [[_context(words, *key), count] for key, count in by_context[e]]
        experts.append(entry)
    result = {
        "layer": index,
        "name": layer.name,
        "side": layer.side,
        "n_experts": E,
        "experts_per_token": layer.experts_per_token,
        "tokens": int(np.unique(token).size),
        "pairs": int(token.size),
        "load": load.tolist(),
        "experts": experts,
        "topics": None,
    }
    if table.topic is not None and token.size:
        topic = table.topic[token]  # [P]
        n_rows = int(table.topic.max()) + 1
        joint = topic_expert_counts(topic, expert, pair_weights(token), n_rows, E)
        present = np.flatnonzero(joint.sum(1) > 0)  # the topics of the evaluated tokens
        joint = joint[present]
        bits = mutual_information_bits(torch.from_numpy(joint))
        bound = max_mutual_information_bits(len(present), E)
        result["topics"] = {
            "mi_bits": bits,
            "max_bits": bound,
            "mi_fraction": bits / bound if bound > 0 else None,
            "n_topics": len(present),
            "n_experts": E,
            "topic_ids": present.tolist(),
            "joint_counts": joint.tolist(),  # [topics, E], rows in topic_ids' order
            "heatmap": heatmap_name(index),
        }
    return result


def heatmap_name(index: int) -> str:
    return f"experts-topics-layer{index}.png"


# ----------------------------------------------------------------------------- one run


def _topics(data_dir: Path, split: str, meta: dict) -> np.ndarray | None:
    lines = read_split_extra(data_dir, split, "topic", meta)
    if lines is None:
        return None
    try:
        return np.array([int(line) for line in lines], dtype=np.int64)
    except ValueError:
        raise ValueError(f"{data_dir}: the {split} topics are not integers") from None


def analyse_run(
    run: Path,
    split: str = "test",
    max_tokens: int = MAX_TOKENS,
    top: int = TOP,
    device: torch.device | str = "auto",
) -> dict:
    """What experts.json holds for a run folder (lstm_moe.train writes one).

    Returns {run, task, arch, dataset, split, step, tokens_trained, tokens (evaluated), seconds,
    topics_available, topics_note (where unavailable), layers: one dict per MoE layer, in the
    order of the model's MoE results: layer, name (the module), side ("lm", "encoder",
    "decoder"), n_experts, experts_per_token, tokens, pairs, load [E] (routed pairs),
    experts: [{expert, load, top_tokens: [[word, count], ...], top_contexts (encoder
    layers)}], topics: None or {mi_bits, max_bits, mi_fraction, n_topics, n_experts,
    topic_ids, joint_counts [topics][E], heatmap}}.
    Bad input (no such run or split, a malformed file) raises FileNotFoundError, ValueError or
    KeyError."""
    run = Path(run)
    if max_tokens < 1 or top < 1:
        raise ValueError(f"max_tokens and top must be >= 1, got {max_tokens} and {top}")
    if isinstance(device, str):
        device = resolve_device(device)
    config_path = run / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: is {run} a training run?")
    task = read_json(config_path).get("task", "lm")
    start = time.perf_counter()
    if task == translation.TranslationTask.name:
        model, data_dir, meta, run_config, step, tokens_trained = translation.load_trained_model(
            run, device
        )
        pairs = read_pairs(data_dir, split, meta)
        topics = _topics(data_dir, split, meta)
        # The fewest first pairs that hold max_tokens target tokens (or all of them).
        reach = np.cumsum(pairs.tgt_lengths)
        n_pairs = min(len(pairs), int(np.searchsorted(reach, max_tokens)) + 1)
        tables = pair_tokens(pairs, n_pairs, topics)
        layers = pair_routing(model, pairs, n_pairs, device, PAIR_BATCH)
        n_tokens = int(reach[n_pairs - 1])
    else:
        model, data_dir, meta, run_config, step, tokens_trained = lm.load_trained_model(run, device)
        ids = np.asarray(read_split(data_dir, split, meta)[:max_tokens], dtype=np.int64)
        topics = _topics(data_dir, split, meta)
        tables = {"lm": lm_tokens(ids, topics)}
        bptt = lm.VALID_BPTT
        if run_architecture(run_config) != "lstm":
            bptt = run_config["task_config"]["bptt"]  # a Transformer's context
        layers = lm_routing(model, ids, device, LM_LANES, bptt)
        n_tokens = len(ids)
    if not layers:
        raise ValueError(f"{run} has no MoE layer (a dense model): there are no experts to analyse")
    words = read_words(data_dir, meta)
    result = {
        "run": str(run),
        "task": task,
        "arch": run_architecture(run_config),
        "dataset": run_config["data"],
        "split": split,
        "step": step,
        "tokens_trained": tokens_trained,
        "tokens": n_tokens,
        "topics_available": topics is not None,
        "layers": [
            analyse_layer(layer, tables[layer.side], words, top, i)
            for i, layer in enumerate(layers)
        ],
    }
    if topics is None:
        result["topics_note"] = NO_TOPICS
    result["seconds"] = time.perf_counter() - start
    return result


# ----------------------------------------------------------------------------- outputs


def topic_order(joint: np.ndarray) -> np.ndarray:
    """Rows of a [topics, E] matrix sorted so that block structure shows: by each topic's
    most used expert, then by how much of the topic goes there (most first)."""
    share = joint / np.maximum(joint.sum(1, keepdims=True), 1e-300)
    best = share.argmax(1)
    return np.lexsort((-share.max(1), best))


def plot_heatmap(layer: dict, path: Path, title: str) -> None:
    """Topic × expert heat map of one layer's entry: colour = the share of the topic's routed
    pairs (weighted as for the mutual information) that go to each expert."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    topics = layer["topics"]
    joint = np.asarray(topics["joint_counts"], dtype=np.float64)  # [topics, E]
    order = topic_order(joint)
    share = joint[order] / np.maximum(joint[order].sum(1, keepdims=True), 1e-300)
    n_topics, E = share.shape
    size = (max(5.0, min(12.0, 3 + 0.12 * E)), max(3.5, min(10.0, 2 + 0.12 * n_topics)))
    fig, ax = plt.subplots(figsize=size, dpi=120)
    image = ax.imshow(share, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0)
    ax.set_xlabel("expert")
    if E <= 32:
        ax.set_xticks(range(E), [str(e) for e in range(E)], fontsize=7)
    ax.set_ylabel("topic (by its top expert)")
    if n_topics <= 32:
        ax.set_yticks(range(n_topics), [str(topics["topic_ids"][i]) for i in order], fontsize=7)
    fraction = topics["mi_fraction"]
    ax.set_title(
        f"{title}\nI(topic; expert) = {topics['mi_bits']:.3f} bits"
        + (f" ({fraction:.1%} of {topics['max_bits']:.2f})" if fraction is not None else ""),
        fontsize=9,
    )
    fig.colorbar(image, ax=ax, label="share of the topic's routed pairs", fraction=0.05, pad=0.02)
    # Fixed margins rather than tight_layout, which measures every tick label's text and
    # costs more than drawing the map (a comparison draws one map per MoE layer per run).
    width, height = size
    fig.subplots_adjust(
        left=0.7 / width, right=1 - 0.95 / width, bottom=0.55 / height, top=1 - 0.6 / height
    )
    fig.savefig(path, format="png")
    plt.close(fig)


def write_outputs(run: Path, result: dict, heatmaps: bool = True) -> list[Path]:
    """Write RUN/eval/experts.json and, with heatmaps, each layer's heat map (where topics
    are known) atomically; returns the paths written. Without, experts.json names no map."""
    out = Path(run) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for layer in result["layers"]:
        if layer["topics"] is None:
            continue
        if not heatmaps:
            layer["topics"]["heatmap"] = None
            continue
        path = out / layer["topics"]["heatmap"]
        tmp = path.with_name(path.name + ".tmp")
        title = (
            f"{Path(result['run']).name}: MoE layer {layer['layer']} ({layer['name']}), "
            f"{result['split']} split"
        )
        plot_heatmap(layer, tmp, title)
        tmp.replace(path)
        written.append(path)
    path = out / "experts.json"
    write_json_atomic(path, result)
    return [path, *written]


def _markdown_text(text: str) -> str:
    """A word as markdown shows it literally: `</S>` is not a tag, `|` not a column."""
    for char, escaped in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("|", "\\|")):
        text = text.replace(char, escaped)
    return text


def markdown_section(result: dict, run_name: str, image_prefix: str, experts: int = 4) -> str:
    """A short markdown section for a report: per MoE layer, a table of the `experts` busiest
    experts' top tokens (contexts for encoder layers), the mutual information line and the
    heat map (at image_prefix + its file name)."""
    lines = [f"### What the experts of {run_name} learned", ""]
    lines.append(
        f"Routing of {result['tokens']:,} {result['split']} tokens; for the {experts} busiest "
        "experts of each layer, the tokens routed to them most often, with counts."
    )
    if not result["topics_available"]:
        lines += ["", f"No topic analysis: {result.get('topics_note', NO_TOPICS)}."]
    for layer in result["layers"]:
        column = "top_contexts" if layer["side"] == "encoder" else "top_tokens"
        lines += [
            "",
            f"MoE layer {layer['layer']} (`{layer['name']}`, {layer['side']}, "
            f"{layer['n_experts']} experts):",
            "",
            f"| expert | load | most routed {column.removeprefix('top_')} |",
            "|---:|---:|---|",
        ]
        busiest = sorted(layer["experts"], key=lambda entry: -entry["load"])[:experts]
        for entry in busiest:
            shown = ", ".join(f"{_markdown_text(text)} ({n})" for text, n in entry[column][:5])
            lines.append(f"| {entry['expert']} | {entry['load']:,} | {shown} |")
        topics = layer["topics"]
        if topics is not None:
            fraction = topics["mi_fraction"]
            share = f" ({fraction:.1%} of the maximum)" if fraction is not None else ""
            lines += [
                "",
                f"I(topic; expert) = **{topics['mi_bits']:.3f} bits**{share}, the maximum "
                f"being min(log2 {topics['n_topics']} topics, log2 {topics['n_experts']} "
                f"experts) = {topics['max_bits']:.2f} bits.",
            ]
            if topics["heatmap"]:
                lines += [
                    "",
                    f"![topics × experts, layer {layer['layer']}]"
                    f"({image_prefix}{topics['heatmap']})",
                ]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- command


def main(argv: list[str] | None = None) -> int:
    enable_cpu_hugepages()  # huge pages for large CPU tensors (runtime.py)
    parser = argparse.ArgumentParser(
        prog="python -m eval.experts",
        description="The tokens routed to each expert of a run's MoE layers and, on the "
        "generated corpora, the mutual information of topic and expert choice.",
    )
    parser.add_argument("run", type=Path, help="run folder written by lstm_moe.train")
    parser.add_argument("--split", default="test", help="split of the run's dataset (test)")
    parser.add_argument(
        "--max_tokens",
        type=int,
        default=MAX_TOKENS,
        help=f"tokens of the split read, from its start ({MAX_TOKENS}; target tokens of the "
        "first pairs, for translation)",
    )
    parser.add_argument("--top", type=int, default=TOP, help=f"tokens shown per expert ({TOP})")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--no_heatmaps", action="store_true", help="write experts.json only, no topic heat maps"
    )
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
        result = analyse_run(args.run, args.split, args.max_tokens, args.top, device)
    except (*PATH_ERRORS, ValueError, KeyError, RuntimeError) as error:  # as eval.perplexity
        print(f"error: {error}", file=sys.stderr)
        return 2
    paths = write_outputs(args.run, result, heatmaps=not args.no_heatmaps)
    for layer in result["layers"]:
        topics = layer["topics"]
        text = f"MoE layer {layer['layer']} ({layer['name']}): {layer['tokens']:,} tokens"
        if topics is not None:
            fraction = topics["mi_fraction"]
            text += f", I(topic; expert) = {topics['mi_bits']:.3f} bits"
            if fraction is not None:
                text += f" ({fraction:.1%} of {topics['max_bits']:.2f})"
        print(text)
    if not result["topics_available"]:
        print(f"no topics: {result['topics_note']}")
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
