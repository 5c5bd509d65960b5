"""Checkpoints that survive `kill -9` and never execute pickled code, for any task.

A checkpoint is written to `<name>.tmp`, flushed to disk, then renamed over the previous one,
so at every instant the folder holds one complete checkpoint. Loading uses
`torch.load(weights_only=True)`: only tensors and plain containers are accepted, so a checkpoint
from elsewhere cannot run code. Configs are stored as plain dicts for the same reason.

A run trained on W > 1 ranks (lstm_moe.engine.ranks) stores its experts in W shards: every
rank writes `experts-step{S}-rank{r}-of{W}.pt` (its expert tensors [E/W, ...], their Adam
moments and its random state; the experts are the tensors of the modules that hold an expert
shard, lstm_moe.moe.parallel.expert_tensor_names), then rank 0 writes `checkpoint.pt`
(everything replicated, with `expert_shards: W`). A checkpoint is the `checkpoint.pt` plus the
W shards of its step, which were written before it; shards of other steps are removed only
after it. `load_run_checkpoint` reassembles the one-process state (expert tensors concatenated
in rank order) for evaluation, or gives a rank of a run on any number of ranks just its own
experts, read from the shards that hold them.

Optimizer state is stored by parameter name, not by position: a model whose parameters are
registered in another order, or split into other parameter groups, still gets each moment on
its own parameter.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch
from torch import Tensor

from lstm_moe.moe.parallel import ParallelGroup

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


def load_checkpoint(path: Path, map_location="cpu", required: tuple[str, ...] = ()) -> dict:
    """The payload of one checkpoint file, memory-mapped: tensors are read from the file when
    they are used (a load_state_dict or a slice copies what it needs). Anything but a dict of
    tensors and plain containers holding the `required` keys is refused with one line that
    names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        # torch's message suggests the unsafe weights_only=False; a checkpoint never needs it.
        raise ValueError(
            f"{path} holds non-tensor objects (pickled Python classes) and was refused: a "
            "checkpoint holds only tensors and plain containers"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:  # truncated or not a checkpoint
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(f"{path} is not a readable checkpoint: {first_line}") from None
    if not isinstance(payload, dict):
        raise ValueError(
            f"{path} is not a checkpoint: it holds a {type(payload).__name__}, not a dict"
        )
    missing = [key for key in required if key not in payload]
    if missing:
        earlier = ""
        if "task" in missing and "model_config" in payload:
            earlier = " (it was written by a version of moe-repro before the task engine)"
        raise ValueError(
            f"{path} is not a complete checkpoint: it has no {', '.join(missing)}{earlier}"
        )
    return payload


def shard_path(run_dir: Path, step: int, rank: int, world_size: int) -> Path:
    return Path(run_dir) / f"experts-step{step}-rank{rank}-of{world_size}.pt"


def remove_stale_shards(run_dir: Path, keep: set[Path]) -> None:
    """Delete expert shards (and half-written ones) that are not in `keep`."""
    for path in Path(run_dir).glob("experts-*"):
        if SHARD_NAME.fullmatch(path.name) and path not in keep:
            path.unlink(missing_ok=True)


# What every checkpoint.pt and every expert shard holds (trainer.Trainer writes them).
CHECKPOINT_KEYS = (
    "task",
    "model_config",
    "task_config",
    "train_config",
    "model",
    "optimizer",
    "schedule",
    "rng",
    "task_state",
    "step",
    "tokens",
    "elapsed",
)
SHARD_KEYS = ("step", "rank", "world_size", "model", "optimizer_state", "rng")


def load_run_checkpoint(
    run_dir: Path,
    map_location="cpu",
    group: ParallelGroup | None = None,
    expert_names: set[str] = frozenset(),
    optimizer: bool = True,
) -> dict:
    """checkpoint.pt of a run folder with its experts, whatever the number of ranks that saved
    it.

    group None: the one-process state, "model" and "optimizer" holding full expert tensors
    [E, ...]. A ParallelGroup: only the experts that rank holds at its world size, [E/W, ...],
    read from the shards (or the one-process file) that contain them, so that no rank ever
    holds every expert; expert_names names the expert tensors (of the model and of the
    optimizer's state, both keyed by parameter name) where the file does not list them.
    Files are memory-mapped: a slice of a tensor reads only that slice, and shard 0, opened
    for its list of tensors, costs no more than that list when its experts are not needed.
    "rngs" maps each saving rank whose file was read to its random state; a rank of a run on
    as many ranks as saved it always finds its own. optimizer=False (evaluation) leaves the
    experts' optimizer moments unread.
    """
    run_dir = Path(run_dir)
    ckpt = load_checkpoint(run_dir / "checkpoint.pt", map_location, CHECKPOINT_KEYS)
    world = ckpt.get("expert_shards")
    if world is None:
        ckpt["rngs"] = {0: ckpt["rng"]}
        if group is not None:
            names = set(ckpt.get("expert_tensors", expert_names))
            for name, value in ckpt["model"].items():
                if name in names:
                    ckpt["model"][name] = value[slice(*group.expert_range(len(value)))].clone()
            for name in names & ckpt["optimizer"]["state"].keys():
                moments = ckpt["optimizer"]["state"][name]
                ckpt["optimizer"]["state"][name] = {
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
            loaded = load_checkpoint(paths[rank], map_location, SHARD_KEYS)
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
    for name, moments in experts_moments.items():
        ckpt["optimizer"]["state"][name] = {
            key: assemble(lambda s, name=name, key=key: s["optimizer_state"][name][key])
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


def optimizer_state_by_name(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict:
    """optimizer.state_dict() with every parameter position replaced by the parameter's name
    in `model`: {"state": {name: moments}, "param_groups": [{..., "params": [names]}]}."""
    state = optimizer.state_dict()
    name_of = {id(p): name for name, p in model.named_parameters()}
    position_names = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {
        "state": {position_names[i]: moments for i, moments in state["state"].items()},
        "param_groups": [
            {**group, "params": [position_names[i] for i in group["params"]]}
            for group in state["param_groups"]
        ],
    }


def load_optimizer_state_by_name(
    optimizer: torch.optim.Optimizer, model: torch.nn.Module, state: dict, source: Path
) -> None:
    """Load a state saved by optimizer_state_by_name into `optimizer`, each parameter's
    moments onto that parameter whatever its position now. The groups must hold the same
    parameters as when it was saved (by name); source names the file in errors."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    groups = [[name_of[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    saved_groups = [group["params"] for group in state["param_groups"]]
    if [sorted(g) for g in groups] != [sorted(g) for g in saved_groups]:
        now, saved = {n for g in groups for n in g}, {n for g in saved_groups for n in g}
        differ = sorted(now ^ saved)[:5] or ["the grouping of parameters"]
        raise ValueError(
            f"{source}: the optimizer was saved for other parameters (differ: {differ})"
        )
    position = {name: i for i, name in enumerate(n for g in groups for n in g)}
    optimizer.load_state_dict(
        {
            "state": {position[name]: moments for name, moments in state["state"].items()},
            "param_groups": [
                {**saved, "params": [position[name] for name in names]}
                for saved, names in zip(state["param_groups"], groups, strict=True)
            ],
        }
    )


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
