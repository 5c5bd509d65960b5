"""What the CUDA tests share: the device, the mark that skips them on a machine without one,
and the check for the GPUs the grouped bf16 kernel runs on."""

from __future__ import annotations

import pytest
import torch

CUDA = torch.device("cuda")

# Every test module here sets `pytestmark = needs_cuda`: CI machines have no GPU, and the
# suite must pass there with these tests skipped.
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def has_grouped_kernel() -> bool:
    """torch._grouped_mm exists and the GPU is sm90 or newer (lstm_moe.moe.experts)."""
    return (
        torch.cuda.is_available()
        and hasattr(torch, "_grouped_mm")
        and torch.cuda.get_device_capability(CUDA) >= (9, 0)
    )
