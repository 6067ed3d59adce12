"""Two listen-free signal measurements used by ``benchmarks/attribute_probe.py``: onset rate (how busy /
fast the music is) and spectral centroid (register / brightness). Plain torch on the AudioLDM2 log-mel."""

from __future__ import annotations

import numpy as np
import torch

from fluxmusic.audio import MelConfig, log_mel


def _as_batch(wave: np.ndarray | torch.Tensor) -> torch.Tensor:
    w = wave.float() if isinstance(wave, torch.Tensor) else torch.as_tensor(np.asarray(wave, dtype=np.float32))
    return w[None] if w.dim() == 1 else w


def onset_rate(wave: np.ndarray | torch.Tensor, sr: int = 16000, threshold: float = 1.5) -> float:
    """Onsets per second: peaks of the positive log-mel spectral flux above ``mean + threshold * std``,
    at least 50 ms apart."""
    mel = log_mel(_as_batch(wave), MelConfig(sample_rate=sr))[0]  # [frames, 64], 100 frames/s
    flux = torch.relu(mel[1:] - mel[:-1]).mean(1).numpy()
    if flux.size < 3:
        return 0.0
    level = flux.mean() + threshold * flux.std()
    kept: list[int] = []
    for i in range(1, len(flux) - 1):
        is_peak = flux[i] > level and flux[i] >= flux[i - 1] and flux[i] > flux[i + 1]
        if is_peak and (not kept or i - kept[-1] >= 5):
            kept.append(i)
    return len(kept) / (len(flux) / 100.0)


def spectral_centroid(wave: np.ndarray | torch.Tensor, sr: int = 16000, n_fft: int = 2048) -> float:
    """Energy-weighted mean frequency (Hz) over the whole clip."""
    w = _as_batch(wave)[0]
    spec = torch.stft(w, n_fft, n_fft // 4, window=torch.hann_window(n_fft), return_complex=True).abs() ** 2
    freqs = torch.linspace(0, sr / 2, spec.shape[0])
    power = spec.sum(1)
    return float((freqs * power).sum() / power.sum().clamp_min(1e-12))
