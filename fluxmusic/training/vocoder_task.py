"""Training a vocoder on aligned (log-mel, waveform) crops: AudioLDM2's HiFi-GAN (transformers
``SpeechT5HifiGan``) or the iSTFT-head ``VocosVocoder`` (``kind``).

Loss: multi-resolution STFT (spectral convergence + log-magnitude L1, as Parallel WaveGAN) plus an L1 on the
AudioLDM2 log-mel of the output; with ``adversarial`` also the HiFi-GAN adversarial terms against
multi-period and multi-resolution spectrogram discriminators (least-squares GAN + feature matching, weights
as HiFi-GAN: mel x45, feature matching x2). Spectral losses alone leave a hop-rate buzz in a transposed-conv
HiFi-GAN and a phasey smear in an iSTFT vocoder; the discriminators are what removes them.

Generator and discriminators are one module trained by the shared loop's single AdamW: each step computes
the generator's terms with the discriminators frozen (``requires_grad`` off while they run on the generated
audio) and the discriminators' terms on detached audio, so one backward gives each side only its own
gradient (a simultaneous GAN update). Resume is therefore as exact as for any other task.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fluxmusic.audio import MelConfig, log_mel
from fluxmusic.errors import FluxMusicError
from fluxmusic.training.distributed import unwrap
from fluxmusic.training.saving import atomic_save_dir
from fluxmusic.training.task import Dataset, TrainTask

#: (n_fft, hop, window) of the multi-resolution STFT loss
STFT_RESOLUTIONS = ((512, 128, 512), (1024, 256, 1024), (256, 64, 256), (128, 32, 128))
#: Adds long windows (2048, 4096: 8 and 4 Hz bins) that resolve the lines of a hop-rate (100 Hz) comb, which the
#: mel loss cannot see: its frames hop exactly one comb period, so every frame holds the same pulse.
COMB_RESOLUTIONS = STFT_RESOLUTIONS + ((2048, 512, 2048), (4096, 1024, 4096))


VOCODER_KINDS = ("hifigan", "vocos")
#: config fields added after runs were started, with the default that means "as before": left out of the
#: resume fingerprint at that default
_ADDED_LATER = {"vocos_phase_integrate": False, "vocos_phase_dither_db": None}


@dataclass(frozen=True)
class VocoderConfig:
    """Which vocoder and its size. HiFi-GAN: AudioLDM2's upsampling (5, 4, 2, 2, 2 = hop 160).
    Vocos: ``vocos_*`` widths, an STFT of ``vocos_n_fft`` with hop 160. ``adversarial`` adds discriminators."""

    kind: str = "hifigan"
    adversarial: bool = False
    vocos_hidden: int = 256
    vocos_intermediate: int = 768
    vocos_layers: int = 8
    vocos_n_fft: int = 640
    vocos_phase_advance: bool = False
    vocos_phase_integrate: bool = False
    vocos_phase_dither_db: float | None = None
    disc_periods: tuple[int, ...] = (2, 3, 5, 7, 11)
    disc_ffts: tuple[int, ...] = (256, 512, 1024)
    n_mels: int = 64
    initial_channels: int = 128
    upsample_rates: tuple[int, ...] = (5, 4, 2, 2, 2)
    upsample_kernels: tuple[int, ...] = (16, 16, 8, 4, 4)
    resblock_kernels: tuple[int, ...] = (3, 7)
    resblock_dilations: tuple[tuple[int, ...], ...] = ((1, 3), (1, 3))
    sample_rate: int = 16000

    def __post_init__(self) -> None:
        if self.kind not in VOCODER_KINDS:
            raise FluxMusicError(
                f"vocoder kind {self.kind!r} is not allowed; choose one of: {', '.join(VOCODER_KINDS)}")

    @property
    def hop(self) -> int:
        return math.prod(self.upsample_rates)

    def build(self):
        """The generator (what the model directory stores)."""
        if self.kind == "vocos":
            from fluxmusic.vocos import VocosConfig, VocosVocoder

            return VocosVocoder(VocosConfig(
                model_in_dim=self.n_mels, sampling_rate=self.sample_rate, hop_length=self.hop,
                n_fft=self.vocos_n_fft, hidden_size=self.vocos_hidden, intermediate_size=self.vocos_intermediate,
                num_layers=self.vocos_layers, phase_advance=self.vocos_phase_advance,
                phase_integrate=self.vocos_phase_integrate, phase_dither_db=self.vocos_phase_dither_db,
            ))
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


class VocoderGAN(nn.Module):
    """Generator + discriminators as one trainable module (the loop's one optimizer updates both)."""

    def __init__(self, config: VocoderConfig) -> None:
        super().__init__()
        from fluxmusic.training.discriminators import Discriminators

        self.generator = config.build()
        self.discriminators = Discriminators(config.disc_periods, config.disc_ffts)

    def forward(self, mel: Tensor) -> Tensor:
        return self.generator(mel)


def _with_increment_rows(state: dict[str, Tensor], target: dict[str, Tensor]) -> dict[str, Tensor]:
    """A Vocos head without phase increments (two chunks of bins) grown to an integrated-phase head (three): the
    added rows are zero, so the integrated model starts as exactly the loaded one."""
    state = dict(state)
    for name, want in target.items():
        if name.endswith("head.weight") or name.endswith("head.bias"):
            have = state.get(name)
            if have is not None and have.shape[0] * 3 == want.shape[0] * 2:
                state[name] = torch.cat([have, torch.zeros_like(have[: have.shape[0] // 2])])
    return state


def generator_of(model: nn.Module) -> nn.Module:
    m = unwrap(model)
    return m.generator if isinstance(m, VocoderGAN) else m


class VocoderTask(TrainTask):
    """Batches ``{"mel": [B, frames, n_mels], "wave": [B, frames * hop]}``."""

    name = "vocoder"

    def __init__(self, train: Dataset, val: Dataset | None = None, config: VocoderConfig | None = None,
                 mel_config: MelConfig | None = None, mel_weight: float | None = None, fm_weight: float = 2.0,
                 adv_weight: float = 1.0, stft_weight: float = 1.0,
                 stft_resolutions: tuple[tuple[int, int, int], ...] = STFT_RESOLUTIONS,
                 init_checkpoint: str | Path | None = None) -> None:
        self.train, self.val = train, val
        self.config = config or VocoderConfig()
        self.mel_config = mel_config or MelConfig()
        # HiFi-GAN weighs the mel L1 x45 against the adversarial terms; without them x1 against the STFT loss.
        self.mel_weight = mel_weight if mel_weight is not None else (45.0 if self.config.adversarial else 1.0)
        self.fm_weight, self.adv_weight = fm_weight, adv_weight
        self.stft_weight, self.stft_resolutions = stft_weight, tuple(tuple(r) for r in stft_resolutions)
        self.init_checkpoint = init_checkpoint

    def build_model(self) -> nn.Module:
        model = VocoderGAN(self.config) if self.config.adversarial else self.config.build()
        if self.init_checkpoint is not None:  # a second phase starts from the first phase's EMA weights
            state = torch.load(self.init_checkpoint, map_location="cpu", weights_only=True)["ema"]
            if self.config.kind == "vocos" and self.config.vocos_phase_integrate:
                state = _with_increment_rows(state, model.state_dict())
            model.load_state_dict(state, strict=True)
        return model

    def train_dataset(self) -> Dataset:
        return self.train

    def val_dataset(self) -> Dataset | None:
        return self.val

    def fingerprint(self) -> dict[str, Any]:
        cfg = asdict(self.config)
        for name, default in _ADDED_LATER.items():  # runs started before a field existed still resume
            if cfg.get(name) == default:
                del cfg[name]
        out: dict[str, Any] = {"vocoder_config": {k: list(map(list, v)) if k == "resblock_dilations" else (
            list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}}
        if self.stft_weight != 1.0 or self.stft_resolutions != STFT_RESOLUTIONS:
            out["stft"] = {"weight": self.stft_weight, "resolutions": [list(r) for r in self.stft_resolutions]}
        return out

    def _spectral(self, pred: Tensor, wave: Tensor) -> tuple[Tensor, dict[str, float]]:
        sc, mag = stft_loss(pred, wave, self.stft_resolutions)
        mel_l1 = (log_mel(pred, self.mel_config) - log_mel(wave, self.mel_config)).abs().mean()
        logs = {"sc": float(sc.detach()), "mag": float(mag.detach()), "mel_l1": float(mel_l1.detach())}
        return self.stft_weight * (sc + mag) + self.mel_weight * mel_l1, logs

    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        mel, wave = batch["mel"], batch["wave"]
        pred = model(mel)[:, : wave.shape[1]]
        loss, logs = self._spectral(pred, wave)
        if not self.config.adversarial:
            return loss, logs
        from fluxmusic.training.discriminators import (
            discriminator_loss,
            feature_matching_loss,
            generator_loss,
            set_requires_grad,
        )

        disc = unwrap(model).discriminators
        real = disc(wave)
        set_requires_grad(disc, False)  # the generator's terms must not move the discriminators
        try:
            fake_g = disc(pred)
        finally:
            set_requires_grad(disc, True)
        g_adv, fm = generator_loss(fake_g), feature_matching_loss(real, fake_g)
        d_loss = discriminator_loss(real, disc(pred.detach()))
        logs.update(g_adv=float(g_adv.detach()), fm=float(fm.detach()), d=float(d_loss.detach()))
        return loss + self.adv_weight * (g_adv + self.fm_weight * fm) + d_loss, logs

    def validate(self, model: nn.Module, batch: Any, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """The spectral distance alone: comparable across runs with and without discriminators."""
        pred = generator_of(model)(batch["mel"])[:, : batch["wave"].shape[1]]
        return self._spectral(pred, batch["wave"])

    def export(self, model: nn.Module, out_dir: Path) -> Path | None:
        return atomic_save_dir(generator_of(model).save_pretrained, out_dir)
