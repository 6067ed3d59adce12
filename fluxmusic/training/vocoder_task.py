"""Training the HiFi-GAN vocoder (transformers ``SpeechT5HifiGan``) on aligned (log-mel, waveform) crops.

Loss: multi-resolution STFT (spectral convergence + log-magnitude L1, as Parallel WaveGAN) plus an L1 on
the AudioLDM2 log-mel of the output. The adversarial part of HiFi-GAN is left out: on a CPU budget of
minutes the discriminators would not get far, and the spectral losses alone give a clean, if slightly
buzzy, vocoder for the synthetic corpus.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fluxmusic.audio import MelConfig, log_mel
from fluxmusic.training.distributed import unwrap
from fluxmusic.training.saving import atomic_save_dir
from fluxmusic.training.task import Dataset, TrainTask

#: (n_fft, hop, window) of the multi-resolution STFT loss
STFT_RESOLUTIONS = ((512, 128, 512), (1024, 256, 1024), (256, 64, 256), (128, 32, 128))


@dataclass(frozen=True)
class VocoderConfig:
    """Size of the HiFi-GAN; the upsampling is AudioLDM2's (5, 4, 2, 2, 2 = hop 160)."""

    n_mels: int = 64
    initial_channels: int = 128
    upsample_rates: tuple[int, ...] = (5, 4, 2, 2, 2)
    upsample_kernels: tuple[int, ...] = (16, 16, 8, 4, 4)
    resblock_kernels: tuple[int, ...] = (3, 7)
    resblock_dilations: tuple[tuple[int, ...], ...] = ((1, 3), (1, 3))
    sample_rate: int = 16000

    def build(self):
        from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

        return SpeechT5HifiGan(SpeechT5HifiGanConfig(
            model_in_dim=self.n_mels, sampling_rate=self.sample_rate,
            upsample_initial_channel=self.initial_channels, upsample_rates=list(self.upsample_rates),
            upsample_kernel_sizes=list(self.upsample_kernels), resblock_kernel_sizes=list(self.resblock_kernels),
            resblock_dilation_sizes=[list(d) for d in self.resblock_dilations], normalize_before=False,
        ))


def stft_loss(pred: Tensor, target: Tensor, resolutions=STFT_RESOLUTIONS) -> tuple[Tensor, Tensor]:
    """Mean over resolutions of (spectral convergence, log-magnitude L1)."""
    sc = mag = pred.new_zeros(())
    for n_fft, hop, win in resolutions:
        window = torch.hann_window(win, device=pred.device)
        p = torch.stft(pred, n_fft, hop, win, window, return_complex=True).abs().clamp_min(1e-7)
        t = torch.stft(target, n_fft, hop, win, window, return_complex=True).abs().clamp_min(1e-7)
        sc = sc + torch.linalg.norm(t - p) / torch.linalg.norm(t).clamp_min(1e-7)
        mag = mag + (p.log() - t.log()).abs().mean()
    return sc / len(resolutions), mag / len(resolutions)


class VocoderTask(TrainTask):
    """Batches ``{"mel": [B, frames, n_mels], "wave": [B, frames * hop]}``."""

    name = "vocoder"

    def __init__(self, train: Dataset, val: Dataset | None = None, config: VocoderConfig | None = None,
                 mel_config: MelConfig | None = None, mel_weight: float = 1.0) -> None:
        self.train, self.val = train, val
        self.config = config or VocoderConfig()
        self.mel_config = mel_config or MelConfig()
        self.mel_weight = mel_weight

    def build_model(self) -> nn.Module:
        return self.config.build()

    def train_dataset(self) -> Dataset:
        return self.train

    def val_dataset(self) -> Dataset | None:
        return self.val

    def fingerprint(self) -> dict[str, Any]:
        cfg = asdict(self.config)
        return {"vocoder_config": {k: list(map(list, v)) if k == "resblock_dilations" else (list(v) if isinstance(
            v, tuple) else v) for k, v in cfg.items()}}

    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        mel, wave = batch["mel"], batch["wave"]
        pred = model(mel)
        pred = pred[:, : wave.shape[1]]
        sc, mag = stft_loss(pred, wave)
        mel_l1 = (log_mel(pred, self.mel_config) - log_mel(wave, self.mel_config)).abs().mean()
        logs = {"sc": float(sc.detach()), "mag": float(mag.detach()), "mel_l1": float(mel_l1.detach())}
        return sc + mag + self.mel_weight * mel_l1, logs

    def export(self, model: nn.Module, out_dir: Path) -> Path | None:
        return atomic_save_dir(unwrap(model).save_pretrained, out_dir)
