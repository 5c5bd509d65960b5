"""Evaluation: the test perplexity of a trained run (`perplexity`), a side-by-side report of
evaluated runs (`report`), benchmarks of the MoE layer (`bench_moe`, `bench_grouped_mm`,
`bench_parallel`), and the one-GPU check that runs the CUDA tests, trainings and benchmarks
(`gpu_check`)."""
