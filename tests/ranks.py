"""Commands run on gloo ranks that a test spawns (as torchrun would start them), and the patch
that takes the router's noise out, so that W ranks and one process draw the same numbers.

A rank draws noise for its own tokens only, so with noise W ranks would differ from one
process by the draws, not by the distribution: the tests that compare them replace
torch.randn_like by zeros, in the test process and in the workers alike.
"""

from __future__ import annotations

import importlib
import os
import socket
from unittest import mock

import torch
import torch.distributed as dist

__all__ = ["free_port", "join", "no_noise", "run_commands"]


def no_noise():
    """A patch under which torch.randn_like gives zeros (the routers' only per-token draw)."""
    return mock.patch.object(torch, "randn_like", lambda like, **_: torch.zeros_like(like))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join(rank: int, world: int, port: int) -> None:
    """This spawned process becomes rank `rank` of `world`, as torchrun would set it up."""
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_PORT=str(port),
        MASTER_ADDR="127.0.0.1",
    )  # fmt: skip
    dist.init_process_group("gloo", rank=rank, world_size=world)


def run_commands(rank: int, world: int, port: int, commands: list[tuple[str, list[str]]]) -> None:
    """An mp.spawn target: join as rank `rank` of `world`, then run each (module, argv) in turn
    as `module.main(argv)` under no_noise(); each must return 0."""
    join(rank, world, port)
    try:
        with no_noise():
            for module, argv in commands:
                assert importlib.import_module(module).main(argv) == 0, (module, argv)
    finally:
        dist.destroy_process_group()
