"""Audio front-end: AudioLDM2's training log-mel, and reading/writing audio files.

The log-mel must match the one the VAE was trained on (DESIGN.md section 4): 16 kHz, n_fft 1024, hop 160,
Hann 1024, 64 slaney mel bins over 0-8000 Hz, ``log(clamp(mel, 1e-5))`` of the *magnitude* (not power)
spectrogram. AudioLDM2 reflect-pads (n_fft - hop) / 2 samples on each side and runs the STFT with
``center=False``, so 10.24 s (163840 samples) gives exactly 163840 / 160 = 1024 frames.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from fluxmusic.errors import FluxMusicError
from fluxmusic.tempfiles import publish

#: Output formats by file extension: (soundfile format, subtype). 16-bit PCM keeps corpora small and
#: byte-deterministic; OGG is Vorbis (lossy).
AUDIO_FORMATS: dict[str, tuple[str, str]] = {
    ".wav": ("WAV", "PCM_16"),
    ".flac": ("FLAC", "PCM_16"),
    ".ogg": ("OGG", "VORBIS"),
}


@dataclass(frozen=True)
class MelConfig:
    """Log-mel parameters; the defaults are AudioLDM2's 16 kHz / 64-bin setting. Frozen so it can key caches."""

    sample_rate: int = 16000
    n_fft: int = 1024
    hop_length: int = 160
    win_length: int = 1024
    n_mels: int = 64
    fmin: float = 0.0
    fmax: float = 8000.0
    clamp_min: float = 1e-5

    def __post_init__(self) -> None:
        if self.win_length > self.n_fft:
            raise FluxMusicError(f"win_length {self.win_length} must be <= n_fft {self.n_fft}")
        if not 0 <= self.fmin < self.fmax <= self.sample_rate / 2:
            raise FluxMusicError(
                f"need 0 <= fmin < fmax <= sample_rate/2, got fmin={self.fmin} fmax={self.fmax} "
                f"sample_rate={self.sample_rate}"
            )

    @property
    def pad(self) -> int:
        """Reflect padding on each side (AudioLDM2: int((n_fft - hop) / 2))."""
        return (self.n_fft - self.hop_length) // 2

    def num_frames(self, num_samples: int) -> int:
        """Frames ``log_mel`` returns for ``num_samples`` samples."""
        return (num_samples + 2 * self.pad - self.n_fft) // self.hop_length + 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MelConfig:
        unknown = set(d) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise FluxMusicError(
                f"unknown mel config keys {sorted(unknown)}; allowed: {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**d)


# ---------------------------------------------------------------------------------------------------------
# Mel filterbank (slaney scale and area normalization, as librosa.filters.mel with htk=False, norm="slaney")
# ---------------------------------------------------------------------------------------------------------

_F_SP = 200.0 / 3  # slaney: linear 66.7 Hz per mel below 1 kHz
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = math.log(6.4) / 27.0  # log-spaced above 1 kHz


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    lin = hz / _F_SP
    log = _MIN_LOG_MEL + np.log(np.maximum(hz, 1e-10) / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(hz >= _MIN_LOG_HZ, log, lin)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    lin = mel * _F_SP
    log = _MIN_LOG_HZ * np.exp(_LOGSTEP * (mel - _MIN_LOG_MEL))
    return np.where(mel >= _MIN_LOG_MEL, log, lin)


def mel_filterbank(cfg: MelConfig) -> np.ndarray:
    """Triangular slaney filters, ``[n_mels, n_fft // 2 + 1]`` float32 (computed in float64 like librosa)."""
    fft_freqs = np.linspace(0.0, cfg.sample_rate / 2, cfg.n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(cfg.fmin), hz_to_mel(cfg.fmax), cfg.n_mels + 2))
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]  # equal area per filter (slaney norm)
    return weights.astype(np.float32)


_CACHE: dict[tuple[MelConfig, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _mel_constants(cfg: MelConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mel basis [n_mels, bins], periodic Hann window) in fp32 on ``device``, built once per (cfg, device)."""
    key = (cfg, device)
    if key not in _CACHE:
        basis = torch.from_numpy(mel_filterbank(cfg)).to(device)
        window = torch.hann_window(cfg.win_length, periodic=True, dtype=torch.float32, device=device)
        _CACHE[key] = (basis, window)
    return _CACHE[key]


def log_mel(wave: torch.Tensor, cfg: MelConfig | None = None) -> torch.Tensor:
    """AudioLDM2's training log-mel: ``[B, T]`` or ``[T]`` waveform -> fp32 ``[B, frames, n_mels]``.

    Computed in fp32 on the input's device whatever its dtype (the STFT in half precision loses the quiet
    bins that the 1e-5 clamp is meant to keep). A 1-D input still returns a batch of one.
    """
    cfg = cfg or MelConfig()
    if not isinstance(wave, torch.Tensor):
        wave = torch.as_tensor(np.asarray(wave))
    if wave.dim() == 1:
        wave = wave[None]
    if wave.dim() != 2:
        raise FluxMusicError(f"log_mel expects a waveform [T] or [B, T], got shape {tuple(wave.shape)}")
    if wave.shape[-1] <= cfg.pad:
        raise FluxMusicError(
            f"waveform too short for log_mel: {wave.shape[-1]} samples; need more than {cfg.pad}"
        )
    basis, window = _mel_constants(cfg, wave.device)
    y = torch.nn.functional.pad(wave.float()[:, None], (cfg.pad, cfg.pad), mode="reflect")[:, 0]
    spec = torch.stft(
        y, cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length, window=window,
        center=False, normalized=False, onesided=True, return_complex=True,
    ).abs()  # [B, bins, frames]
    mel = torch.matmul(basis, spec)
    return torch.log(torch.clamp(mel, min=cfg.clamp_min)).transpose(1, 2).contiguous()


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------


def resample(wave: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Polyphase resampling along the last axis (scipy's Kaiser-windowed FIR), float32 out."""
    if orig_sr == target_sr:
        return np.asarray(wave, dtype=np.float32)
    from scipy.signal import resample_poly

    g = math.gcd(int(orig_sr), int(target_sr))
    out = resample_poly(np.asarray(wave, dtype=np.float64), target_sr // g, orig_sr // g, axis=-1)
    return out.astype(np.float32)


def audio_info(path: str | os.PathLike) -> tuple[int, int, int]:
    """(sample_rate, frames, channels) from the file header, or a FluxMusicError saying why not."""
    import soundfile as sf

    p = Path(path)
    if not p.is_file():
        raise FluxMusicError(f"audio file not found: {p}")
    try:
        info = sf.info(str(p))
    except Exception as e:  # soundfile raises RuntimeError/LibsndfileError for unknown or corrupt data
        raise FluxMusicError(
            f"cannot read audio file {p}: {e}; readable formats: WAV, FLAC, OGG and others libsndfile knows"
        ) from e
    return int(info.samplerate), int(info.frames), int(info.channels)


def read_audio(
    path: str | os.PathLike,
    target_sr: int | None = 16000,
    start: int = 0,
    frames: int = -1,
) -> np.ndarray:
    """Read ``path`` as float32 mono at ``target_sr`` (None keeps the file's rate).

    Channels are mixed down by their mean. ``start``/``frames`` select a span in the file's own samples,
    so a crop of a long file reads only what it needs.
    """
    import soundfile as sf

    sr, _, _ = audio_info(path)
    try:
        data, sr = sf.read(str(path), start=start, frames=frames, dtype="float32", always_2d=True)
    except Exception as e:
        raise FluxMusicError(f"cannot read audio file {path}: {e}") from e
    mono = data.mean(axis=1, dtype=np.float32)
    return resample(mono, sr, target_sr) if target_sr else mono


def write_audio(path: str | os.PathLike, wave: np.ndarray | torch.Tensor, sr: int = 16000) -> Path:
    """Write mono ``wave`` ([T] or [1, T], float in [-1, 1]) with the format given by the extension.

    The data goes to a temporary file in the target directory which is then renamed over ``path``, so a
    failure never leaves a half-written file behind.
    """
    import soundfile as sf

    p = Path(path)
    ext = p.suffix.lower()
    if ext not in AUDIO_FORMATS:
        raise FluxMusicError(
            f"unsupported audio extension {ext or '(none)'!r} for {p}; allowed: {', '.join(AUDIO_FORMATS)}"
        )
    if isinstance(wave, torch.Tensor):
        wave = wave.detach().float().cpu().numpy()
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim == 2 and wave.shape[0] == 1:
        wave = wave[0]
    if wave.ndim != 1 or wave.size == 0:
        raise FluxMusicError(f"write_audio expects a non-empty mono waveform [T] or [1, T], got {wave.shape}")
    if not np.isfinite(wave).all():
        raise FluxMusicError(f"refusing to write {p}: the waveform contains NaN or inf")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise FluxMusicError(f"cannot write {p}: directory {parent} does not exist")
    fmt, subtype = AUDIO_FORMATS[ext]
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise FluxMusicError(f"cannot write {p}: directory {parent} is not writable ({e.strerror})") from e
    try:
        with os.fdopen(fd, "wb") as f:
            sf.write(f, np.clip(wave, -1.0, 1.0), int(sr), format=fmt, subtype=subtype)
        publish(tmp)
        os.replace(tmp, p)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise FluxMusicError(f"cannot write {p}: {e}") from e
        raise
    return p
