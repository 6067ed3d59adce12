"""Small helpers shared by the kernel launchers: availability probes and launch geometry.

Nothing here touches ``torch.cuda``: launchers must work the same on a GPU and on CPU tensors under
``TRITON_INTERPRET=1`` (Triton's interpreter), which is how the kernels are tested on machines without a GPU.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (must be set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def num_warps_for(block: int) -> int:
    """Warps for a program that reduces ``block`` elements: ~256 elements per warp, 1..16 warps."""
    return max(1, min(16, block // 256))


def rows_per_program(n_rows: int, block: int) -> int:
    """Rows (tokens) per program, a power of two.

    On a GPU ~2K elements per program keeps registers low and gives thousands of programs at real shapes.
    Triton's interpreter runs programs one after another in numpy, so per-program overhead dominates there:
    use much larger tiles (results are identical; tiles only change the launch geometry).
    """
    budget = 1 << 16 if interpreting() else 2048
    return max(1, min(next_pow2(n_rows), budget // block))


def per_sample(m: Tensor, batch: int, dim: int, what: str) -> Tensor:
    """Modulation vectors arrive as [B, D] (or [B, 1, D]); return a [B, D] view with unit inner stride."""
    if m.dim() == 3:
        if m.shape[1] != 1:
            raise ValueError(f"{what} must be [B, D] or [B, 1, D], got {tuple(m.shape)}")
        m = m[:, 0]
    if m.dim() != 2 or m.shape[1] != dim or m.shape[0] not in (1, batch):
        raise ValueError(f"{what} must be [{batch} or 1, {dim}], got {tuple(m.shape)}")
    if m.stride(1) != 1:
        m = m.contiguous()
    return m


def batch_stride(t: Tensor) -> int:
    """Stride over the batch dim, 0 when a size-1 batch broadcasts."""
    return 0 if t.shape[0] == 1 else t.stride(0)


def check_same_device(*ts: Tensor) -> torch.device:
    dev = ts[0].device
    for t in ts[1:]:
        if t.device != dev:
            raise ValueError(f"all tensors must be on one device, got {dev} and {t.device}")
    return dev
