"""Checkpoints that survive `kill -9` and never execute pickled code.

A checkpoint is written to `<name>.tmp`, flushed to disk, then renamed over the previous one,
so at every instant the folder holds one complete checkpoint. Loading uses
`torch.load(weights_only=True)`: only tensors and plain containers are accepted, so a checkpoint
from elsewhere cannot run code. Configs are stored as plain dicts for the same reason.

A run trained on W > 1 ranks (lstm_moe.distributed) stores its experts in W shards: every rank
writes `experts-step{S}-rank{r}-of{W}.pt` (its expert tensors [E/W, ...], their Adam moments and
its random state), then rank 0 writes `checkpoint.pt` (everything replicated, with
`expert_shards: W`). A checkpoint is the `checkpoint.pt` plus the W shards of its step, which were
written before it; shards of other steps are removed only after it. `load_run_checkpoint`
reassembles the one-process state (expert tensors concatenated in rank order) for evaluation,
or gives a rank of a run on any number of ranks just its own experts, read from the shards
that hold them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import Tensor

from lstm_moe.moe.parallel import ParallelGroup, is_expert_tensor

SHARD_NAME = re.compile(r"experts-step(\d+)-rank(\d+)-of(\d+)\.pt(\.tmp)?")


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
    """The payload of one checkpoint file, memory-mapped: tensors are read from the file when
    they are used (a load_state_dict or a slice copies what it needs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except (RuntimeError, EOFError, OSError) as error:  # truncated or not a checkpoint
        raise ValueError(f"{path} is not a readable checkpoint: {error}") from None


def load_trained_model(run_dir: Path, device: torch.device):
    """The model of a run folder (config.json + checkpoint.pt) and its dataset's folder and
    meta.json, after checking that they belong together. Returns (model, data_dir, meta,
    run_config, checkpoint step, tokens trained)."""
    import json

    from lstm_moe.config import LMConfig, config_from_dict
    from lstm_moe.files import read_meta
    from lstm_moe.lm import LanguageModel

    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: is {run_dir} a training run?")
    run_config = json.loads(config_path.read_text())
    model_config = config_from_dict(LMConfig, run_config["model"])
    data_dir = Path(run_config["data"]["path"])
    meta = read_meta(data_dir)
    ckpt = load_run_checkpoint(run_dir, optimizer=False)
    if config_from_dict(LMConfig, ckpt["model_config"]) != model_config:
        raise ValueError(f"{run_dir}: config.json and checkpoint.pt describe different models")
    if ckpt["vocab_sha256"] != meta["vocab"]["sha256"]:
        raise ValueError(f"{data_dir}'s vocabulary is not the one {run_dir} was trained with")
    model = LanguageModel(model_config)
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    return model, data_dir, meta, run_config, ckpt["step"], ckpt["tokens"]


def shard_path(run_dir: Path, step: int, rank: int, world_size: int) -> Path:
    return Path(run_dir) / f"experts-step{step}-rank{rank}-of{world_size}.pt"


def remove_stale_shards(run_dir: Path, keep: set[Path]) -> None:
    """Delete expert shards (and half-written ones) that are not in `keep`."""
    for path in Path(run_dir).glob("experts-*"):
        if SHARD_NAME.fullmatch(path.name) and path not in keep:
            path.unlink(missing_ok=True)


def load_run_checkpoint(
    run_dir: Path,
    map_location="cpu",
    group: ParallelGroup | None = None,
    expert_ids: set[int] = frozenset(),
    optimizer: bool = True,
) -> dict:
    """checkpoint.pt of a run folder with its experts, whatever the number of ranks that saved
    it.

    group None: the one-process state, "model" and "optimizer" holding full expert tensors
    [E, ...]. A ParallelGroup: only the experts that rank holds at its world size, [E/W, ...],
    read from the shards (or the one-process file) that contain them, so that no rank ever
    holds every expert; expert_ids names the optimizer's entries for expert tensors (the
    one-process file does not tell them apart). Files are memory-mapped: a slice of a tensor
    reads only that slice, and shard 0, opened for its list of tensors, costs no more than
    that list when its experts are not needed.
    "rngs" maps each saving rank whose file was read to its random state; a rank of a run on
    as many ranks as saved it always finds its own. optimizer=False (evaluation) leaves the
    experts' optimizer moments unread.
    """
    run_dir = Path(run_dir)
    ckpt = load_checkpoint(run_dir / "checkpoint.pt", map_location)
    world = ckpt.get("expert_shards")
    if world is None:
        ckpt["rngs"] = {0: ckpt["rng"]}
        if group is not None:
            for name, value in ckpt["model"].items():
                if is_expert_tensor(name):
                    ckpt["model"][name] = value[slice(*group.expert_range(len(value)))].clone()
            for index in expert_ids & ckpt["optimizer"]["state"].keys():
                moments = ckpt["optimizer"]["state"][index]
                ckpt["optimizer"]["state"][index] = {
                    key: value[slice(*group.expert_range(len(value)))].clone()
                    if value.dim() > 0
                    else value  # Adam's step count
                    for key, value in moments.items()
                }
        return ckpt

    paths = [shard_path(run_dir, ckpt["step"], rank, world) for rank in range(world)]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(
                f"{run_dir}: checkpoint.pt of step {ckpt['step']} was saved by {world} ranks, "
                f"but the expert shard {path.name} is missing"
            )
    shards: dict[int, dict] = {}

    def shard(rank: int) -> dict:
        if rank not in shards:
            loaded = load_checkpoint(paths[rank], map_location)
            if (loaded["step"], loaded["rank"], loaded["world_size"]) != (
                ckpt["step"],
                rank,
                world,
            ):
                raise ValueError(f"{paths[rank]} does not belong to {run_dir}/checkpoint.pt")
            shards[rank] = loaded
        return shards[rank]

    def assemble(tensor_of) -> Tensor:
        """The experts this rank needs of one tensor, [E or E/W, ...]; tensor_of(shard) is
        that tensor in a shard, [E/W_saved, ...]."""
        per_shard = len(tensor_of(shard(0)))
        if group is None:
            first, last = 0, per_shard * world
        else:
            first, last = group.expert_range(per_shard * world)
        pieces = []
        for rank in range(first // per_shard, -(-last // per_shard)):
            start = rank * per_shard
            lo, hi = max(first, start) - start, min(last, start + per_shard) - start
            pieces.append(tensor_of(shard(rank))[lo:hi])
        return torch.cat(pieces)  # a copy: nothing stays mapped

    for name in shard(0)["model"]:
        ckpt["model"][name] = assemble(lambda s, name=name: s["model"][name])
    experts_moments = shard(0)["optimizer_state"] if optimizer else {}
    for index, moments in experts_moments.items():
        ckpt["optimizer"]["state"][index] = {
            key: assemble(lambda s, index=index, key=key: s["optimizer_state"][index][key])
            if value.dim() > 0
            else value  # Adam's step count, the same on every rank
            for key, value in moments.items()
        }
    if group is None:
        for rank in range(world):
            shard(rank)
    elif group.world_size == world:
        shard(group.rank)
    ckpt["rngs"] = {rank: loaded["rng"] for rank, loaded in shards.items()}
    return ckpt


def expert_parameter_indices(model: torch.nn.Module) -> set[int]:
    """Positions of the expert tensors among the trained parameters (the optimizer's ids)."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    return {i for i, name in enumerate(names) if is_expert_tensor(name)}


def rng_state(device: torch.device | None = None) -> dict:
    """This process's random state: the CPU stream and, on a CUDA device, that GPU's (a rank
    owns one GPU; a run may resume where fewer GPUs are visible)."""
    state = {"torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    # RNG states are CPU byte tensors whatever device the checkpoint was mapped to.
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is None or device is None or device.type != "cuda":
        return
    if isinstance(cuda, list):  # every visible GPU's, as older checkpoints stored it
        index = torch.device(device).index or 0
        if index >= len(cuda):
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda.cpu(), device)
