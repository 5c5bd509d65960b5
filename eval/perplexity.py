"""Per-word perplexity of a trained language model, with the routing statistics of its MoE
layers over the same text.

Perplexity is exp(Σ -log p(target) / N) over every target of the split, where N counts each
word plus one `</S>` per sentence: "sum over all words including the end of sentence symbol"
(Shazeer et al. 2017, §5.1, following Jozefowicz et al. 2016). It always uses the exact full
softmax, whatever the model trained with; the computation is the language-model task's
(lstm_moe.tasks.lm.evaluate), which validation during training runs too.

    python -m eval.perplexity runs/NAME [--split test]   # writes runs/NAME/eval/perplexity.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lstm_moe.data import LaneBatches
from lstm_moe.files import EOS_ID, read_split, write_json_atomic
from lstm_moe.runtime import resolve_device
from lstm_moe.tasks.lm import evaluate, load_trained_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eval.perplexity",
        description="Test perplexity (per word, </S> included, exact softmax) of a run folder.",
    )
    parser.add_argument("run", type=Path, help="run folder written by lstm_moe.train")
    parser.add_argument("--split", default="test", help="split of the run's dataset (test)")
    parser.add_argument("--batch_size", type=int, default=16, help="parallel lanes")
    parser.add_argument("--bptt", type=int, default=50, help="time steps per window")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    try:
        model, data_dir, meta, run_config, step, tokens_trained = load_trained_model(
            args.run, device
        )
        ids = read_split(data_dir, args.split, meta)
        batches = LaneBatches(ids, args.batch_size, args.bptt, EOS_ID, keep_remainder=True)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    # Always float32: the reported perplexity is the exact one, whatever training used.
    result = evaluate(model, batches, device, progress=sys.stderr.isatty())
    result.update(
        {
            "split": args.split,
            "split_tokens_in_meta": meta["splits"][args.split]["tokens"],
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
