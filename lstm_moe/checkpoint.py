"""Checkpoints that survive `kill -9` and never execute pickled code.

A checkpoint is written to `<name>.tmp`, flushed to disk, then renamed over the previous one,
so at every instant the folder holds one complete checkpoint. Loading uses
`torch.load(weights_only=True)`: only tensors and plain containers are accepted, so a checkpoint
from elsewhere cannot run code. Configs are stored as plain dicts for the same reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def save_checkpoint(path: Path, payload: dict) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    # Make the rename itself durable.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError) as error:  # truncated or not a checkpoint
        raise ValueError(f"{path} is not a readable checkpoint: {error}") from None


def load_trained_model(run_dir: Path, device: torch.device):
    """The model of a run folder (config.json + checkpoint.pt) and its dataset's folder and
    meta.json, after checking that they belong together. Returns (model, data_dir, meta,
    run_config, checkpoint step, tokens trained)."""
    import json

    from data_prep.binarize import read_meta
    from lstm_moe.config import LMConfig, config_from_dict
    from lstm_moe.lm import LanguageModel

    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: is {run_dir} a training run?")
    run_config = json.loads(config_path.read_text())
    model_config = config_from_dict(LMConfig, run_config["model"])
    data_dir = Path(run_config["data"]["path"])
    meta = read_meta(data_dir)
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    if config_from_dict(LMConfig, ckpt["model_config"]) != model_config:
        raise ValueError(f"{run_dir}: config.json and checkpoint.pt describe different models")
    if ckpt["vocab_sha256"] != meta["vocab"]["sha256"]:
        raise ValueError(f"{data_dir}'s vocabulary is not the one {run_dir} was trained with")
    model = LanguageModel(model_config)
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    return model, data_dir, meta, run_config, ckpt["step"], ckpt["tokens"]


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    # RNG states are CPU byte tensors whatever device the checkpoint was mapped to.
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
