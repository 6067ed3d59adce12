"""3-axis rotary position tables (Flux RoPE) and the position ids of the music/text sequence."""

from __future__ import annotations

import torch
from torch import Tensor


def rope_table(ids: Tensor, axes_dim: tuple[int, ...], theta: int, float64: bool = True) -> Tensor:
    """(cos, sin) per frequency for position ids ``[Bp, L, n_axes]`` -> ``[Bp, L, sum(axes_dim)/2, 2]`` float32.

    Computed in float64 and cast to float32 as the official code does; ``float64=False`` computes in
    float32 for graphs that must not contain float64 (TensorRT), at a cost of ~1e-6 in the angles.
    """
    dtype = torch.float64 if float64 else torch.float32
    parts = []
    for i, dim in enumerate(axes_dim):
        scale = torch.arange(0, dim, 2, dtype=dtype, device=ids.device) / dim
        omega = 1.0 / (theta**scale)
        angles = ids[..., i].to(dtype).unsqueeze(-1) * omega  # [Bp, L, dim/2]
        parts.append(torch.stack((torch.cos(angles), torch.sin(angles)), dim=-1))
    return torch.cat(parts, dim=-2).float()


def text_ids(batch: int, txt_len: int, device: torch.device | str = "cpu") -> Tensor:
    """Text tokens all sit at position (0, 0, 0)."""
    return torch.zeros(batch, txt_len, 3, device=device)


def music_ids(batch: int, grid_h: int, grid_w: int, device: torch.device | str = "cpu") -> Tensor:
    """Music tokens sit at (0, row, col) of the patch grid, row-major."""
    ids = torch.zeros(grid_h, grid_w, 3, device=device)
    ids[..., 1] = torch.arange(grid_h, device=device)[:, None]
    ids[..., 2] = torch.arange(grid_w, device=device)[None, :]
    return ids.reshape(1, grid_h * grid_w, 3).expand(batch, -1, -1)


class RopeCache:
    """RoPE tables depend only on (text length, grid shape): compute each once and reuse it."""

    def __init__(self, axes_dim: tuple[int, ...], theta: int) -> None:
        self.axes_dim, self.theta = axes_dim, theta
        self._tables: dict[tuple, Tensor] = {}

    def get(self, txt_len: int, grid_h: int, grid_w: int, device: torch.device | str = "cpu") -> Tensor:
        key = (txt_len, grid_h, grid_w, str(device))
        if key not in self._tables:
            ids = torch.cat((text_ids(1, txt_len), music_ids(1, grid_h, grid_w)), dim=1)
            self._tables[key] = rope_table(ids, self.axes_dim, self.theta).to(device)
        return self._tables[key]

    def __len__(self) -> int:
        return len(self._tables)
