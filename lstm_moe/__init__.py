"""moe-repro core: the sparsely-gated Mixture-of-Experts layer of Shazeer et al. 2017.

`lstm_moe.moe` holds the layer (router -> dispatcher -> experts, and expert parallelism);
beside it are the paper's LSTM language model (`lm`, `softmax`) and its Table 7 presets, the
task-agnostic trainer (`engine`: budgets, schedule, accumulation, checkpoints, resume, ranks),
the tasks it trains (`tasks`: language modelling) and the command that runs it (`train`).
"""
