"""Data pipelines: lm1b, any plain-text corpus such as WikiText (`text`) and the generated
corpus (`synthetic`), written as binarized splits with their meta.json."""
