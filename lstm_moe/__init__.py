"""moe-repro core: the sparsely-gated Mixture-of-Experts layer of Shazeer et al. 2017.

`lstm_moe.moe` holds the layer (router -> dispatcher -> experts, and expert parallelism);
beside it are the paper's LSTM language model (`lm`, `softmax`), its Table 7 presets, and the
resumable, multi-rank trainer (`train`, `distributed`, `checkpoint`).
"""
