"""Latent geometry: mel frames <-> latent grid <-> transformer tokens, and duration bookkeeping."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from fluxmusic.errors import FluxMusicError

PATCH = 2


def patchify(latent: Tensor, patch: int = PATCH) -> Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), C*p*p], rows major, channel order (c, ph, pw) as the official code."""
    b, c, h, w = latent.shape
    x = latent.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpatchify(x: Tensor, grid_h: int, grid_w: int, patch: int = PATCH) -> Tensor:
    """Inverse of :func:`patchify`: [B, gh*gw, C*p*p] -> [B, C, gh*p, gw*p]."""
    b, _, cpp = x.shape
    c = cpp // (patch * patch)
    x = x.reshape(b, grid_h, grid_w, c, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, c, grid_h * patch, grid_w * patch)


#: Most music tokens one transformer call may attend over: 16x the published 1024 (10.24 s). Beyond it RoPE
#: positions leave anything trained and the attention matrix alone outgrows memory (B=2, 16 heads
#: in fp32 eager attention, about 35 GB), so a model directory asking for more is refused at load.
MAX_MUSIC_TOKENS = 16384


def is_positive_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


@dataclass(frozen=True)
class LatentGeometry:
    """How audio maps onto the latent grid, read from the model directory (not hard-coded).

    Published system: 16 kHz, hop 160 (100 mel frames/s), 64 mel bins, VAE 4x down in time and frequency,
    8 latent channels: 10.24 s = 1024 mel frames = latent [8, 256, 16] = 1024 tokens of 32 channels.
    """

    sample_rate: int = 16000
    hop_length: int = 160
    mel_bins: int = 64
    latent_channels: int = 8
    vae_downsample: int = 4
    max_duration: float = 10.24
    patch: int = PATCH

    def __post_init__(self) -> None:
        # A model directory is user input: every value is checked once here, so later arithmetic never sees
        # a string, a zero or a NaN (which would surface as a traceback deep inside a generation).
        bad = [
            f"{k} = {getattr(self, k)!r} (must be a positive integer)"
            for k in ("sample_rate", "hop_length", "mel_bins", "latent_channels", "vae_downsample", "patch")
            if not is_positive_int(getattr(self, k))
        ]
        md = self.max_duration
        if isinstance(md, bool) or not isinstance(md, (int, float)) or not math.isfinite(md) or md <= 0:
            bad.append(f"max_duration = {md!r} (must be a finite number of seconds > 0)")
        if bad:
            raise FluxMusicError("latent geometry is invalid: " + "; ".join(bad))
        if self.patch != PATCH:
            raise FluxMusicError(f"latent geometry patch = {self.patch}; the transformer uses {PATCH}x{PATCH} patches")
        tokens = self.max_latent_frames // self.patch * max(self.latent_width // self.patch, 1)
        if tokens > MAX_MUSIC_TOKENS:
            longest = MAX_MUSIC_TOKENS * self.patch / max(self.latent_width // self.patch, 1) * (
                self.seconds_per_latent_frame
            )
            raise FluxMusicError(
                f"latent geometry max_duration = {md} s makes {tokens} music tokens; the transformer supports at "
                f"most {MAX_MUSIC_TOKENS} ({longest:g} s at this geometry); longer audio is generated in windows"
            )

    @property
    def seconds_per_latent_frame(self) -> float:
        return self.hop_length * self.vae_downsample / self.sample_rate

    @property
    def latent_width(self) -> int:
        return self.mel_bins // self.vae_downsample

    @property
    def max_latent_frames(self) -> int:
        return self.latent_frames(self.max_duration)

    def check_duration(self, duration: float) -> float:
        if not (isinstance(duration, (int, float)) and math.isfinite(duration)) or not (
            0 < duration <= self.max_duration + 1e-9
        ):
            raise FluxMusicError(f"duration {duration!r} s is outside the allowed range (0, {self.max_duration}]")
        return float(duration)

    def latent_frames(self, duration: float) -> int:
        """Latent frames for ``duration`` seconds, rounded up to the patch grid."""
        frames = math.ceil(round(duration / self.seconds_per_latent_frame, 6))
        return self.patch * math.ceil(frames / self.patch)

    def latent_shape(self, duration: float) -> tuple[int, int, int]:
        return (self.latent_channels, self.latent_frames(self.check_duration(duration)), self.latent_width)

    def grid(self, latent_frames: int) -> tuple[int, int]:
        """(rows, cols) of the patch grid: time rows, frequency columns."""
        return latent_frames // self.patch, self.latent_width // self.patch

    def num_samples(self, duration: float) -> int:
        return int(round(duration * self.sample_rate))

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict) -> LatentGeometry:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
