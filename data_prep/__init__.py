"""Data pipelines: lm1b, any plain-text corpus such as WikiText (`text`) and the generated
corpus (`synthetic`), written as binarized splits with their meta.json; and for translation,
any line-aligned parallel corpus (`parallel`, with its shared `wordpieces`), WMT'14 (`wmt14`)
and a generated parallel corpus (`synthetic_parallel`), written in the format of
lstm_moe.pairs."""
