"""Data pipelines: lm1b, WMT'14 and the generated corpus, written as binarized splits."""
