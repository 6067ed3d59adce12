"""In-memory audio data for the component trainers (VAE, vocoder, text encoders).

The default corpus is small (an hour of 10.24 s clips is ~230 MB of float32), so clips are read once and
their log-mels computed once; datasets then slice random crops. Every crop offset comes from
``numpy.random.default_rng([seed, epoch, index])``, so it depends only on (seed, epoch, item) and a resumed
run sees the same crops (the loop calls ``set_epoch``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fluxmusic.audio import MelConfig, log_mel, read_audio
from fluxmusic.data.manifest import load_manifest
from fluxmusic.errors import FluxMusicError


@dataclass
class ClipBank:
    """Equal-length clips of a manifest: waveforms [N, T], their log-mels [N, frames, n_mels], captions."""

    waves: Tensor
    mels: Tensor
    captions: list[str]
    attributes: list[dict]
    mel_config: MelConfig

    def __len__(self) -> int:
        return len(self.captions)

    def subset(self, indices: list[int]) -> ClipBank:
        return ClipBank(self.waves[indices], self.mels[indices], [self.captions[i] for i in indices],
                        [self.attributes[i] for i in indices], self.mel_config)


def load_clip_bank(manifest: str | Path, seconds: float = 10.24, split: str | None = None,
                   limit: int | None = None, mel_config: MelConfig | None = None) -> ClipBank:
    """Read the manifest's clips (first ``seconds`` of each, zero-padded) and compute their log-mels.

    ``split`` keeps entries whose ``split`` attribute equals it (the synth corpus marks "train" / "val").
    """
    cfg = mel_config or MelConfig()
    entries = load_manifest(manifest)
    if split is not None:
        entries = [e for e in entries if e.attributes.get("split", "train") == split]
    if limit is not None:
        entries = entries[:limit]
    if not entries:
        raise FluxMusicError(f"manifest {manifest} has no entries for split {split!r}")
    n = int(round(seconds * cfg.sample_rate))
    waves = torch.zeros(len(entries), n)
    for i, e in enumerate(entries):
        w = read_audio(e.path, cfg.sample_rate, start=int(round(e.start * cfg.sample_rate)))[:n]
        waves[i, : len(w)] = torch.from_numpy(w)
    mels = torch.cat([log_mel(waves[i : i + 32], cfg) for i in range(0, len(entries), 32)])
    return ClipBank(waves, mels, [e.caption for e in entries], [dict(e.attributes) for e in entries], cfg)


class _Epoched:
    """Per-epoch deterministic randomness for crops."""

    def __init__(self, seed: int) -> None:
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])


class MelCropDataset(_Epoched):
    """Random ``frames``-long log-mel crops, ``{"mel": [frames, n_mels]}`` (the VAE is fully convolutional,
    so it trains on crops and runs on whole clips)."""

    def __init__(self, bank: ClipBank, frames: int, seed: int = 0) -> None:
        super().__init__(seed)
        if frames > bank.mels.shape[1]:
            raise FluxMusicError(f"crop of {frames} frames is longer than the clips ({bank.mels.shape[1]})")
        self.mels, self.frames = bank.mels, frames

    def __len__(self) -> int:
        return self.mels.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        start = int(self._rng(index).integers(0, self.mels.shape[1] - self.frames + 1))
        return {"mel": self.mels[index, start : start + self.frames]}


class WaveMelCropDataset(_Epoched):
    """Aligned crops for the vocoder: ``{"mel": [frames, n_mels], "wave": [frames * hop]}``.

    Mel frame ``k`` of the AudioLDM2 front-end is centred on samples [k*hop, (k+1)*hop), so frames
    [s, s+n) pair with samples [s*hop, (s+n)*hop).
    """

    def __init__(self, bank: ClipBank, frames: int, seed: int = 0) -> None:
        super().__init__(seed)
        self.bank, self.frames, self.hop = bank, frames, bank.mel_config.hop_length
        if frames > bank.mels.shape[1]:
            raise FluxMusicError(f"crop of {frames} frames is longer than the clips ({bank.mels.shape[1]})")

    def __len__(self) -> int:
        return len(self.bank)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        start = int(self._rng(index).integers(0, self.bank.mels.shape[1] - self.frames + 1))
        mel = self.bank.mels[index, start : start + self.frames]
        wave = self.bank.waves[index, start * self.hop : (start + self.frames) * self.hop]
        return {"mel": mel, "wave": wave}


class CaptionMelDataset:
    """(caption, whole-clip log-mel) pairs for contrastive text-audio training; ``{"mel", "caption"}``."""

    def __init__(self, bank: ClipBank) -> None:
        self.bank = bank

    def __len__(self) -> int:
        return len(self.bank)

    def __getitem__(self, index: int) -> dict:
        return {"mel": self.bank.mels[index], "caption": self.bank.captions[index]}
