"""Translate a split of a translation run's dataset with beam search, and score it with BLEU.

    python -m eval.translate runs/NAME [--split test] [--beam 4] [--alpha 0.6] [--beta 0.0]
    python -m eval.translate runs/NAME --data data/OTHER         # another folder, same vocabulary
    torchrun --nproc_per_node=2 -m eval.translate runs/NAME      # each rank decodes its share

The sources are the split's binarized word pieces (exactly what training read); the
hypotheses are decoded back to text with the dataset's sentencepiece model and scored against
the split's untouched reference text (eval.bleu: sacreBLEU with its signature, and the papers'
tokenized BLEU). Writes, in runs/NAME/eval/:
  <split>.hyp.<lang>         one detokenized translation per source line
  translate-<split>.json     the search's settings, sentences/s, the checkpoint's step
  bleu.json                  (bleu-<split>.json for other splits) both BLEU scores
With --data, the split is read from another prepared folder whose wordpiece model is the
run's (same sha256: e.g. the same training corpus with another test set), and the files are
named after that folder (<split>-<folder>.hyp.<lang>, bleu-<split>-<folder>.json, ...).
Under torchrun the experts are spread over the ranks as in training; every rank steps the
decoder together until the last rank's sentences are done (eval.beam_search), and the output
is one process's.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import sentencepiece
import torch

from eval.beam_search import ALPHA, BEAM, BETA, MAX_LEN_A, MAX_LEN_B, translate_ids
from eval.bleu import print_scores, score_files
from lstm_moe.engine.ranks import join_ranks
from lstm_moe.files import BOS_ID, EOS_ID, PATH_ERRORS, write_json_atomic, write_text_atomic
from lstm_moe.pairs import read_pairs, read_parallel_meta
from lstm_moe.runtime import enable_cpu_hugepages, resolve_device
from lstm_moe.tasks.translation import load_trained_model


def detokenize(processor: sentencepiece.SentencePieceProcessor, ids: list[int]) -> str:
    """Word pieces back to text (BOS/EOS never printed)."""
    return processor.decode([i for i in ids if i not in (BOS_ID, EOS_ID)])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eval.translate",
        description="Beam-search translation of a run's test split, scored with BLEU.",
    )
    parser.add_argument("run", type=Path, help="run folder written by lstm_moe.train")
    parser.add_argument("--split", default="test", help="split of the run's dataset (test)")
    parser.add_argument(
        "--data", type=Path, help="read the split from this prepared folder (same vocabulary)"
    )
    parser.add_argument("--beam", type=int, default=BEAM, help=f"beam width ({BEAM})")
    parser.add_argument(
        "--alpha", type=float, default=ALPHA, help=f"length penalty α, GNMT §7 ({ALPHA})"
    )
    parser.add_argument(
        "--beta", type=float, default=BETA, help=f"coverage penalty β, GNMT §7 ({BETA})"
    )
    parser.add_argument(
        "--max_len_a", type=float, default=MAX_LEN_A, help="max length a·|X| + b: a"
    )
    parser.add_argument("--max_len_b", type=float, default=MAX_LEN_B, help="... and b")
    parser.add_argument("--batch_size", type=int, default=64, help="sentences per batch")
    parser.add_argument("--limit", type=int, help="translate only the first N sentences")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--bf16", action="store_true", help="bfloat16 autocast (the routers stay in float32)"
    )
    parser.add_argument("--no_bleu", action="store_true", help="write the translations only")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    enable_cpu_hugepages()  # huge pages for large CPU tensors (runtime.py)
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    group = join_ranks(device, timeout_s=600.0)
    try:
        try:
            model, data_dir, meta, _, step, tokens = load_trained_model(args.run, device, group)
            if args.data is not None:
                other = read_parallel_meta(args.data)
                if other["vocab"]["sha256"] != meta["vocab"]["sha256"]:
                    raise ValueError(
                        f"{args.data}'s wordpiece model is not the one {args.run} was trained "
                        f"with ({data_dir}): its ids would mean other pieces"
                    )
                if (other["src_lang"], other["tgt_lang"]) != (meta["src_lang"], meta["tgt_lang"]):
                    raise ValueError(
                        f"{args.data} is {other['src_lang']}→{other['tgt_lang']}, {args.run} "
                        f"translates {meta['src_lang']}→{meta['tgt_lang']}"
                    )
                data_dir, meta = args.data, other
            split = read_pairs(data_dir, args.split, meta)
            entry = meta["splits"][args.split]
            processor = sentencepiece.SentencePieceProcessor(
                model_file=str(data_dir / meta["vocab"]["file"])
            )
            reference = entry.get("raw", {}).get("tgt")
            if not args.no_bleu and reference is None:
                raise ValueError(
                    f"{data_dir}: split {args.split!r} keeps no reference text to score against"
                    " (use --no_bleu)"
                )
        except (*PATH_ERRORS, ValueError, KeyError) as error:
            group.print(f"error: {error}", file=sys.stderr)
            return 2
        count = len(split) if args.limit is None else min(args.limit, len(split))
        sources = [np.asarray(split.source(i), dtype=np.int64) for i in range(count)]
        autocast = torch.autocast(device.type, torch.bfloat16) if args.bf16 else nullcontext()
        start = time.perf_counter()
        with autocast:
            translations = translate_ids(
                model,
                sources,
                device,
                args.beam,
                alpha=args.alpha,
                beta=args.beta,
                max_len_a=args.max_len_a,
                max_len_b=args.max_len_b,
                batch_size=args.batch_size,
                group=group,
                progress=not args.quiet and sys.stderr.isatty(),
            )
        seconds = time.perf_counter() - start
        if not group.is_main:
            return 0
        lang = meta["tgt_lang"]
        out = args.run / "eval"
        out.mkdir(parents=True, exist_ok=True)
        name = args.split if args.data is None else f"{args.split}-{Path(args.data).name}"
        hyp_path = out / f"{name}.hyp.{lang}"
        lines = [detokenize(processor, list(t.tokens)) for t in translations]
        write_text_atomic(hyp_path, "".join(line + "\n" for line in lines))
        summary = {
            "split": args.split,
            "sentences": count,
            "beam": args.beam,
            "alpha": args.alpha,
            "beta": args.beta,
            "max_len": [args.max_len_a, args.max_len_b],
            "seconds": seconds,
            "sentences_per_s": count / max(seconds, 1e-9),
            "ranks": group.world_size,
            "device": str(device),
            "bf16": args.bf16,
            "step": step,
            "tokens_trained": tokens,
            "hypotheses": str(hyp_path),
        }
        summary["data"] = str(data_dir)
        write_json_atomic(out / f"translate-{name}.json", summary)
        print(
            f"translated {count} sentences of {args.split} in {seconds:.1f} s "
            f"({summary['sentences_per_s']:.1f} sentences/s, beam {args.beam})"
        )
        print(f"wrote {hyp_path}")
        if args.no_bleu:
            return 0
        ref_path = data_dir / reference
        if args.limit is not None:  # score against the same first sentences
            ref_lines = ref_path.read_text(encoding="utf-8").split("\n")[:count]
            ref_path = out / f"{name}.ref-first-{count}.{lang}"
            write_text_atomic(ref_path, "".join(line + "\n" for line in ref_lines))
        result = score_files(hyp_path, ref_path, lang)
        result.update({"step": step, "beam": args.beam, "alpha": args.alpha, "beta": args.beta})
        bleu_path = out / ("bleu.json" if name == "test" else f"bleu-{name}.json")
        write_json_atomic(bleu_path, result)
        print_scores(result)
        print(f"wrote {bleu_path}")
        return 0
    finally:
        group.close()


if __name__ == "__main__":
    raise SystemExit(main())
