"""3-axis rotary position tables (Flux RoPE) and the position ids of the music/text sequence."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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


#: Significant bits kept in the "high" part of each frequency: an integer position below 2 ** (24 - 11)
#: times it is exact in float32, so only the small "low" product rounds (see :class:`LengthRope`).
_HI_BITS = 11
#: Positions up to this are handled at float64-table accuracy by :class:`LengthRope`.
MAX_EXACT_POSITION = 2 ** (24 - _HI_BITS)


def _split_frequencies(axes_dim: tuple[int, ...], theta: int) -> tuple[Tensor, Tensor]:
    """Per-frequency omega (concatenated over the axes), split in float64 as hi + lo, both float32."""
    omega = torch.cat([1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)) for d in axes_dim])
    exp = torch.floor(torch.log2(omega))
    step = torch.pow(2.0, exp - (_HI_BITS - 1))  # one unit in the last of _HI_BITS significant bits
    hi = torch.round(omega / step) * step
    return hi.float(), (omega - hi).float()


class LengthRope(nn.Module):
    """The RoPE table of a ``[text; music]`` sequence from its two lengths, in float32 ops only.

    For exported graphs: the table is derived inside the graph from the shapes of ``txt`` and ``x`` (text ids
    all zero; music token ``i`` at ``(0, i // grid_w, i % grid_w)``), so any consistent dynamic dims work and
    no float64 is ever in a graph. Accuracy matches the float64 table (:func:`rope_table`) to ~1e-7: each
    frequency is split as ``hi + lo`` with ``hi`` short enough that ``pos * hi`` is exact in float32, then
    ``cos(a + b) = cos a cos b - sin a sin b`` (and the same for sin) -- a plain float32 ``pos * omega``
    would be off by up to ~1e-5 at position 128.
    """

    def __init__(self, axes_dim: tuple[int, ...], theta: int, grid_w: int) -> None:
        super().__init__()
        self.grid_w = int(grid_w)
        hi, lo = _split_frequencies(tuple(axes_dim), theta)
        # axis of each frequency: which id column multiplies it
        axis = torch.cat([torch.full((d // 2,), i, dtype=torch.int64) for i, d in enumerate(axes_dim)])
        self.register_buffer("omega_hi", hi, persistent=False)
        self.register_buffer("omega_lo", lo, persistent=False)
        self.register_buffer("axis_onehot", F.one_hot(axis, len(axes_dim)).T.float(), persistent=False)

    def forward(self, txt_len_like: Tensor, music_len_like: Tensor) -> Tensor:
        """-> ``[1, txt_len + music_len, sum(axes_dim) / 2, 2]`` float32; lengths are dim 1 of the two tensors."""
        dev = self.omega_hi.device
        i = torch.arange(music_len_like.shape[1], device=dev)
        music = torch.stack((torch.zeros_like(i), i // self.grid_w, i % self.grid_w), dim=-1)
        text = torch.zeros(txt_len_like.shape[1], 3, dtype=torch.int64, device=dev)
        ids = torch.cat((text, music), dim=0).float()  # [L, 3], small integers: exact in float32
        pos = ids @ self.axis_onehot  # [L, F]: each frequency's own axis position (exact: one nonzero term)
        a, b = pos * self.omega_hi, pos * self.omega_lo
        cos_a, sin_a, cos_b, sin_b = torch.cos(a), torch.sin(a), torch.cos(b), torch.sin(b)
        cos = cos_a * cos_b - sin_a * sin_b
        sin = sin_a * cos_b + cos_a * sin_b
        return torch.stack((cos, sin), dim=-1).unsqueeze(0)
