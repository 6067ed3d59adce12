"""Discriminators and adversarial losses for vocoder training (HiFi-GAN / Vocos recipe, small widths).

- Multi-period discriminator (HiFi-GAN): the waveform folded into [T / p, p] for periods 2, 3, 5, 7, 11,
  2-D convolutions along time; it sees periodic structure, which is exactly where a hop-rate buzz lives.
- Multi-resolution spectrogram discriminator (UnivNet / Vocos): 2-D convolutions over log-magnitude STFTs at
  several resolutions; it sees spectral texture (noise floors, smeared harmonics).

Losses are least-squares GAN (HiFi-GAN): D minimises (1 - D(real))^2 + D(fake)^2, G minimises (1 - D(fake))^2,
plus feature matching (L1 between D's feature maps of real and generated audio).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

Features = list[Tensor]


def _conv_stack(convs: nn.ModuleList, out: nn.Module, x: Tensor) -> tuple[Tensor, Features]:
    """Leaky-ReLU conv layers then the output conv; the score and every layer's output (for feature matching)."""
    feats = []
    for conv in convs:
        x = nn.functional.leaky_relu(conv(x), 0.1)
        feats.append(x)
    x = out(x)
    feats.append(x)
    return x.flatten(1), feats


class PeriodDiscriminator(nn.Module):
    def __init__(self, period: int, channels: tuple[int, ...] = (16, 32, 64, 64)) -> None:
        super().__init__()
        self.period = period
        layers, c_in = [], 1
        for i, c in enumerate(channels):
            stride = (3, 1) if i < len(channels) - 1 else (1, 1)
            layers.append(weight_norm(nn.Conv2d(c_in, c, (5, 1), stride, padding=(2, 0))))
            c_in = c
        self.convs = nn.ModuleList(layers)
        self.out = weight_norm(nn.Conv2d(c_in, 1, (3, 1), padding=(1, 0)))

    def forward(self, wave: Tensor) -> tuple[Tensor, Features]:
        b, t = wave.shape
        pad = (-t) % self.period
        x = nn.functional.pad(wave, (0, pad), mode="reflect") if pad else wave
        x = x.view(b, 1, -1, self.period)
        return _conv_stack(self.convs, self.out, x)


class SpectrogramDiscriminator(nn.Module):
    def __init__(self, n_fft: int, channels: int = 16) -> None:
        super().__init__()
        self.n_fft, self.hop = n_fft, n_fft // 4
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.convs = nn.ModuleList([
            weight_norm(nn.Conv2d(1, channels, (3, 9), stride=(1, 2), padding=(1, 4))),
            weight_norm(nn.Conv2d(channels, channels, (3, 9), stride=(1, 2), padding=(1, 4))),
            weight_norm(nn.Conv2d(channels, channels, (3, 9), stride=(1, 2), padding=(1, 4))),
            weight_norm(nn.Conv2d(channels, channels, (3, 3), padding=(1, 1))),
        ])
        self.out = weight_norm(nn.Conv2d(channels, 1, (3, 3), padding=(1, 1)))

    def forward(self, wave: Tensor) -> tuple[Tensor, Features]:
        spec = torch.stft(wave, self.n_fft, self.hop, self.n_fft, self.window, return_complex=True).abs()
        x = torch.log(spec.clamp_min(1e-5)).transpose(1, 2)[:, None]  # [B, 1, frames, bins]
        return _conv_stack(self.convs, self.out, x)


class Discriminators(nn.Module):
    """All sub-discriminators; ``forward`` returns one (score, features) pair per sub-discriminator."""

    def __init__(self, periods: tuple[int, ...] = (2, 3, 5, 7, 11), ffts: tuple[int, ...] = (256, 512, 1024),
                 period_channels: tuple[int, ...] = (16, 32, 64, 64), spec_channels: int = 16) -> None:
        super().__init__()
        self.subs = nn.ModuleList(
            [PeriodDiscriminator(p, period_channels) for p in periods]
            + [SpectrogramDiscriminator(n, spec_channels) for n in ffts]
        )

    def forward(self, wave: Tensor) -> list[tuple[Tensor, Features]]:
        return [d(wave) for d in self.subs]


def discriminator_loss(real: list[tuple[Tensor, Features]], fake: list[tuple[Tensor, Features]]) -> Tensor:
    """LSGAN: mean over sub-discriminators of E[(1 - D(real))^2] + E[D(fake)^2] (fake detached by the caller)."""
    total = sum(((1 - r) ** 2).mean() + (f ** 2).mean() for (r, _), (f, _) in zip(real, fake))
    return total / len(real)


def generator_loss(fake: list[tuple[Tensor, Features]]) -> Tensor:
    """LSGAN generator term: mean over sub-discriminators of E[(1 - D(fake))^2]."""
    return sum(((1 - f) ** 2).mean() for f, _ in fake) / len(fake)


def feature_matching_loss(real: list[tuple[Tensor, Features]], fake: list[tuple[Tensor, Features]]) -> Tensor:
    """Mean L1 between D's feature maps of real (detached) and generated audio."""
    terms = [(rf.detach() - ff).abs().mean() for (_, rfs), (_, ffs) in zip(real, fake) for rf, ff in zip(rfs, ffs)]
    return sum(terms) / len(terms)


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)
