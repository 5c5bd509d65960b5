"""Evaluation: perplexity, BLEU, benchmarks and the k=1 vs k=4 comparison report."""
