"""Per-word perplexity of a trained language model, with the routing statistics of its MoE
layers over the same text.

Perplexity is exp(Σ -log p(target) / N) over every target of the split, where N counts each
word plus one `</S>` per sentence: "sum over all words including the end of sentence symbol"
(Shazeer et al. 2017, §5.1, following Jozefowicz et al. 2016). It always uses the exact full
softmax, whatever the model trained with.

    python -m eval.perplexity runs/NAME [--split test]   # writes runs/NAME/eval/perplexity.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from lstm_moe.checkpoint import load_trained_model
from lstm_moe.data import LaneBatches
from lstm_moe.distributed import Distributed
from lstm_moe.files import EOS_ID, read_split, write_json_atomic
from lstm_moe.lm import LanguageModel, detach_state
from lstm_moe.runtime import resolve_device


@torch.no_grad()
def evaluate(
    model: LanguageModel,
    batches: LaneBatches,
    device: torch.device,
    max_windows: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    ranks: Distributed | None = None,
) -> dict:
    """Exact negative log-likelihood over the windows of `batches` (all, or the first
    `max_windows`). Returns nll, tokens, perplexity and per-MoE-layer routing statistics.

    ranks: every rank evaluates its lanes of the same layout (batches.lanes) with its share of
    the experts, and the sums are taken over ranks; the routing statistics already are."""
    was_training = model.training
    model.eval()
    n_windows = len(batches) if max_windows is None else min(max_windows, len(batches))
    nll_sum, n_tokens = 0.0, 0
    state = None
    routed: list[torch.Tensor] = []
    importance: list[torch.Tensor] = []
    dropped: list[float] = []
    windows = range(n_windows)
    if progress:
        windows = tqdm(windows, desc="evaluate", unit="window", leave=False)
    try:
        for index in windows:
            window = batches.window(index)
            inputs, targets = window.inputs.to(device), window.targets.to(device)
            mask = window.mask.to(device)
            if window.first:
                state = None
            with torch.autocast(device.type, autocast_dtype, enabled=autocast_dtype is not None):
                out = model(inputs, state)
            state = detach_state(out.state)
            nll = model.nll(out.hidden, targets).view_as(targets)  # [T, B]
            nll_sum += float(nll[mask].double().sum())
            n_tokens += int(mask.sum())
            for layer, result in enumerate(out.moe):
                if len(routed) <= layer:
                    routed.append(
                        torch.zeros_like(result.stats.tokens_per_expert, dtype=torch.float64)
                    )
                    importance.append(
                        torch.zeros_like(result.stats.importance, dtype=torch.float64)
                    )
                    dropped.append(0.0)
                routed[layer] += result.stats.tokens_per_expert.double()
                importance[layer] += result.stats.importance.double()
                dropped[layer] += float(result.stats.fraction_dropped)
    finally:
        model.train(was_training)
    if ranks is not None and ranks.world_size > 1:
        totals = ranks.sum(torch.tensor([nll_sum, n_tokens], dtype=torch.float64, device=device))
        nll_sum, n_tokens = float(totals[0]), int(totals[1])
    mean_nll = nll_sum / max(n_tokens, 1)
    return {
        "nll_per_token": mean_nll,
        "perplexity": math.exp(mean_nll),
        "tokens": n_tokens,
        "moe_layers": [
            routing_summary(r, i, d / max(n_windows, 1))
            for r, i, d in zip(routed, importance, dropped, strict=True)
        ],
    }


def _cv(values: torch.Tensor) -> float:
    mean = values.mean()
    return float(values.std(unbiased=False) / mean) if mean > 0 else 0.0


def routing_summary(
    tokens_per_expert: torch.Tensor, importance: torch.Tensor, fraction_dropped: float
) -> dict:
    """Balance of one MoE layer over a whole evaluation (Load here counts routed tokens).
    The counts include the padded positions of the last window, which the perplexity leaves
    out (the layer routes every position; at most batch_size · bptt of them).
    fraction_dropped is the mean over windows."""
    return {
        "tokens_per_expert": tokens_per_expert.long().tolist(),
        "cv_load": _cv(tokens_per_expert),
        "cv_importance": _cv(importance),
        "max_over_mean_load": float(tokens_per_expert.max() / tokens_per_expert.mean())
        if tokens_per_expert.mean() > 0
        else 0.0,
        "unused_experts": int((tokens_per_expert == 0).sum()),
        "fraction_dropped": fraction_dropped,
    }


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
        return 1
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
