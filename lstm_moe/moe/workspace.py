"""Large CPU buffers kept from one step to the next, so that the MoE layer does not page-fault
its own working memory in again at every step.

Why: glibc's malloc serves every allocation above its mmap threshold (at most 32 MiB) with a
fresh mmap and gives it back with munmap, and the kernel then maps and zeroes the new memory one
4 KiB page at a time on first touch. The layer's large tensors — the [E, D, H] weight gradients
and the [N, H] hidden rows, gigabytes at E >= 256 — are each one such allocation, every step.
Measured on a 2-core CPU at T = 8192, D = 512, H = 1024, E = 256, k = 4, one forward + backward
took 630,000 page faults and 1.4 s of kernel time against 2.7 s of arithmetic. Designs with one
small module per expert never see this: their tensors are small enough for malloc's heap to
recycle. Transparent huge pages cut the faults 512-fold but need a process setting
(runtime.enable_cpu_hugepages); this cache needs none.

A Workspace hands out tensors on storages it keeps. A storage is handed out again only once
nothing but the workspace refers to it — its last tensor (a saved activation, a `.grad` that
autograd took over, an output a caller kept) is gone — so a buffer is never written while anyone
can still read it. Each call site keeps at most two storages (the second serves a step whose
predecessor's buffer is still held, e.g. the `.grad` of zero_grad(set_to_none=False)); a request
that neither fits gets ordinary memory. CUDA tensors and small ones always get ordinary memory:
the CUDA caching allocator and malloc's heap already reuse them.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

# Below this, malloc's heap recycles the memory itself (its threshold adapts up to 32 MiB).
MIN_REUSED_BYTES = 1 << 22  # 4 MiB
_STORAGES_PER_SITE = 2

_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _rounded_bytes(n_bytes: int) -> int:
    """n_bytes rounded up to the next eighth of its power of two (at most 12.5 % more), so that
    sizes that vary a little from step to step (rows kept under a capacity, masked tokens) still
    fit the storage kept for them."""
    step = max(1, (1 << (n_bytes.bit_length() - 1)) // 8)
    return -(-n_bytes // step) * step


class Workspace:
    """Reused CPU storages for the large buffers of one module, by call site (a name)."""

    def __init__(self) -> None:
        self._sites: dict[str, list[torch.UntypedStorage]] = {}
        self._lock = threading.Lock()  # the backward may run on another thread

    def empty(self, site: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """An uninitialised tensor of `shape` with like's dtype and device; on the CPU and when
        large, on a storage kept for `site` that nobody else holds."""
        n_bytes = like.element_size() * _numel(shape)
        if like.device.type != "cpu" or n_bytes < max(1, MIN_REUSED_BYTES) or _use_count is None:
            return like.new_empty(shape)
        with self._lock:
            storage = self._idle_storage(site, n_bytes)
        if storage is None:
            return like.new_empty(shape)
        return like.new_empty(0).set_(storage, 0, shape)

    def _idle_storage(self, site: str, n_bytes: int) -> torch.UntypedStorage | None:
        kept = self._sites.setdefault(site, [])
        idle = [s for s in kept if _use_count(s._cdata) == 1]
        fitting = [s for s in idle if n_bytes <= s.nbytes() <= 2 * n_bytes]
        if fitting:
            return min(fitting, key=lambda s: s.nbytes())
        # An idle storage that does not fit is given back: the sizes have moved on.
        for storage in idle:
            kept.remove(storage)
        if len(kept) >= _STORAGES_PER_SITE:
            return None
        storage = torch.UntypedStorage(_rounded_bytes(n_bytes))
        kept.append(storage)
        return storage

    def kept_bytes(self) -> int:
        """Bytes held in storages (handed out or idle)."""
        return sum(s.nbytes() for kept in self._sites.values() for s in kept)

    def clear(self) -> None:
        """Forget every storage (those still in use live on with their tensors)."""
        with self._lock:
            self._sites.clear()

    # A copied or pickled module starts with an empty workspace: buffers are not state.
    def __deepcopy__(self, memo) -> Workspace:
        return Workspace()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n
