"""moe-repro core: the sparsely-gated Mixture-of-Experts layer of Shazeer et al. 2017.

`lstm_moe.moe` holds the layer (router -> dispatcher -> experts); the LSTM language and
translation models built on it live beside it.
"""
