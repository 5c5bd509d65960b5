"""Switch Transformer routing and backbones (Fedus et al. 2021), built on `lstm_moe.moe`."""
