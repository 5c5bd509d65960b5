"""Per-word perplexity of a trained language model (or per-target-token perplexity of a
translation model), with the routing statistics of its MoE layers over the same text.

Perplexity is exp(Σ -log p(target) / N) over every target of the split, where N counts each
word plus one `</S>` per sentence: "sum over all words including the end of sentence symbol"
(Shazeer et al. 2017, §5.1, following Jozefowicz et al. 2016). It always uses the exact full
softmax, whatever the model trained with; the computation is the language-model task's
(lstm_moe.tasks.lm.evaluate), which validation during training runs too.

A translation run (config.json's task "translation") is scored the same way on its split's
pairs, teacher-forced: every target word piece and one EOS per sentence are the targets
(lstm_moe.tasks.translation.evaluate_pairs, which its validation runs too).

    python -m eval.perplexity runs/NAME [--split test]   # writes runs/NAME/eval/perplexity.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lstm_moe.data import LaneBatches
from lstm_moe.files import EOS_ID, PATH_ERRORS, read_json, read_split, write_json_atomic
from lstm_moe.pairs import read_pairs
from lstm_moe.runtime import enable_cpu_hugepages, resolve_device
from lstm_moe.tasks import lm, translation
from lstm_moe.tasks.common import run_architecture


def run_task(run: Path) -> str:
    """The task a run folder trained ("lm" when config.json predates the field)."""
    config_path = Path(run) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: is {run} a training run?")
    return read_json(config_path).get("task", "lm")


def _default_bptt(run_config: dict) -> int:
    """The LSTM's evaluation window (lm.VALID_BPTT), or the Transformer's training window."""
    if run_architecture(run_config) == "lstm":
        return lm.VALID_BPTT
    return run_config["task_config"]["bptt"]


def main(argv: list[str] | None = None) -> int:
    enable_cpu_hugepages()  # huge pages for large CPU tensors (runtime.py)
    parser = argparse.ArgumentParser(
        prog="python -m eval.perplexity",
        description="Test perplexity (per word, </S> included, exact softmax) of a run folder.",
    )
    parser.add_argument("run", type=Path, help="run folder written by lstm_moe.train")
    parser.add_argument("--split", default="test", help="split of the run's dataset (test)")
    parser.add_argument(
        "--batch_size", type=int, default=16, help="parallel lanes (sentence pairs: 64)"
    )
    parser.add_argument(
        "--bptt",
        type=int,
        help="time steps per window (LM): 50 for an LSTM, whose state carries from window to "
        "window; a Transformer's training window (its context) by default",
    )
    parser.add_argument(
        "--max_tokens",
        type=int,
        help="LM: score only the first N tokens of the split (the whole split by default), "
        "whatever the model's window and lanes, so every model scores the same tokens",
    )
    parser.add_argument(
        "--max_pairs", type=int, help="translation: score only the first N pairs of the split"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = parser.parse_args(argv)
    for name in ("max_tokens", "max_pairs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        task = run_task(args.run)
        if task == translation.TranslationTask.name:
            model, data_dir, meta, run_config, step, tokens_trained = (
                translation.load_trained_model(args.run, device)
            )
            pairs = read_pairs(data_dir, args.split, meta)
            split_tokens = meta["splits"][args.split]["tgt_tokens"]
        else:
            model, data_dir, meta, run_config, step, tokens_trained = lm.load_trained_model(
                args.run, device
            )
            ids = read_split(data_dir, args.split, meta)[: args.max_tokens]
            bptt = args.bptt or _default_bptt(run_config)
            batches = LaneBatches(ids, args.batch_size, bptt, EOS_ID, keep_remainder=True)
            split_tokens = meta["splits"][args.split]["tokens"]
    except (*PATH_ERRORS, ValueError, KeyError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    # Always float32: the reported perplexity is the exact one, whatever training used.
    progress = sys.stderr.isatty()
    if task == translation.TranslationTask.name:
        batch_size = 64 if args.batch_size == parser.get_default("batch_size") else args.batch_size
        result = translation.evaluate_pairs(
            model, pairs, device, batch_size, max_pairs=args.max_pairs, progress=progress
        )
    else:
        result = lm.evaluate(model, batches, device, progress=progress)
    result.update(
        {
            "split": args.split,
            "task": task,
            "split_tokens_in_meta": split_tokens,
            "dataset": run_config["data"],
            "step": step,
            "tokens_trained": tokens_trained,
            "seconds": time.perf_counter() - start,
        }
    )
    if "entropy_floor" in meta:
        result["entropy_floor"] = meta["entropy_floor"]
    out = args.run / "eval" / "perplexity.json"
    if args.split != "test":
        out = args.run / "eval" / f"perplexity-{args.split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)
    print(f"{args.split} perplexity {result['perplexity']:.2f} over {result['tokens']} tokens")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
