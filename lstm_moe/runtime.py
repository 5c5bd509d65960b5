"""Process-level settings shared by the command-line entry points."""

from __future__ import annotations

import os

import torch


def enable_cpu_hugepages() -> None:
    """Back large CPU tensors with 2 MiB transparent huge pages.

    PyTorch's CPU allocator reads THP_MEM_ALLOC_ENABLE at every large allocation and then
    madvises the block. Expert weights and their gradients run to gigabytes at E >= 256, and
    with 4 KiB pages the first touch of every freshly allocated gradient costs a page fault per
    page: measured on a 2-core machine, a new 2 GiB tensor is written at ~3.5 GB/s with 4 KiB
    pages and ~14 GB/s with huge pages. Small models pay it too, on their softmax: a training
    step of the demo language model (width 64, 640 tokens, a full softmax over 4,096 words,
    whose [640, 4096] logits and gradients are fresh 10 MB blocks every step) took ~10,800
    page faults and 27-35 ms with 4 KiB pages, ~2,100 faults and 22-26 ms with huge pages.
    The entry points that train or evaluate (lstm_moe.train, eval.perplexity, eval.translate
    and the training benchmarks) call this first; the MoE layer's own speed does not depend on
    it (moe/workspace.py). It only advises: where the system's THP setting is "never" nothing
    changes. A value the user has set is kept (THP_MEM_ALLOC_ENABLE=0 turns it off).
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def resolve_device(name: str) -> torch.device:
    """ "auto" is CUDA when available, else the CPU. A CUDA device this torch cannot use is
    refused with a ValueError (the commands print it as their one-line error)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {name!r}: torch {torch.__version__} sees no CUDA device "
            "(use --device=cpu or auto)"
        )
    return device
