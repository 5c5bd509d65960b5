"""Evaluation: the test perplexity of a trained run (`perplexity`), a side-by-side report of
evaluated runs (`report`), and benchmarks of the MoE layer (`bench_moe`, `bench_parallel`)."""
