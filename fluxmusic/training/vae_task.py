"""Training the mel VAE (diffusers ``AutoencoderKL``) on log-mel crops: L1 reconstruction + a small KL.

The default compresses 8x in time and frequency (AudioLDM2's compresses 4x): 10.24 s is then a [8, 128, 8]
latent, 256 transformer tokens instead of 1024, which is what makes the bundled default cheap on a CPU.
After training, ``scaling_factor`` is set to 1 / std of the latents (as Stable Diffusion does) so the
transformer sees unit-variance data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fluxmusic.training.distributed import unwrap
from fluxmusic.training.saving import atomic_save_dir
from fluxmusic.training.task import Dataset, TrainTask


@dataclass(frozen=True)
class VAEConfig:
    """Size of the mel VAE; ``2 ** (len(channels) - 1)`` is the downsampling in time and frequency."""

    channels: tuple[int, ...] = (16, 32, 64, 64)
    latent_channels: int = 8
    layers_per_block: int = 1
    norm_groups: int = 8
    mid_attention: bool = False  # fully convolutional: trains on crops, runs on any length

    def build(self):
        from diffusers import AutoencoderKL

        n = len(self.channels)
        return AutoencoderKL(
            in_channels=1, out_channels=1, latent_channels=self.latent_channels,
            down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(self.channels), layers_per_block=self.layers_per_block,
            norm_num_groups=self.norm_groups, mid_block_add_attention=self.mid_attention, scaling_factor=1.0,
        )


class VAEWithLoss(nn.Module):
    """Wraps the VAE so one ``forward`` (what DDP syncs) returns the reconstruction and the KL."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, mel: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        posterior = self.vae.encode(mel).latent_dist
        z = posterior.sample(generator) if generator is not None else posterior.mode()
        return self.vae.decode(z).sample, posterior.kl().mean()


class VAETask(TrainTask):
    """Batches ``{"mel": [B, frames, n_mels]}``; loss = L1(mel) + ``kl_weight`` * KL per latent element."""

    name = "vae"

    def __init__(self, train: Dataset, val: Dataset | None = None, config: VAEConfig | None = None,
                 kl_weight: float = 1e-4, scale_items: Dataset | None = None) -> None:
        self.train, self.val = train, val
        self.config = config or VAEConfig()
        self.kl_weight = kl_weight
        self.scale_items = scale_items if scale_items is not None else train

    def build_model(self) -> nn.Module:
        return VAEWithLoss(self.config.build())

    def train_dataset(self) -> Dataset:
        return self.train

    def val_dataset(self) -> Dataset | None:
        return self.val

    def fingerprint(self) -> dict[str, Any]:
        return {"vae_config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.config).items()}}

    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        mel = batch["mel"][:, None]
        rec, kl = model(mel, generator)
        l1 = (rec - mel).abs().mean()
        # diffusers' kl() sums over latent elements; per element keeps the weight size-independent.
        kl_el = kl / unwrap(model).vae.config.latent_channels
        return l1 + self.kl_weight * kl_el, {"l1": float(l1.detach()), "kl": float(kl_el.detach())}

    def validate(self, model: nn.Module, batch: Any, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        mel = batch["mel"][:, None]
        rec, _ = model(mel, None)  # posterior mean: the reconstruction inference gets
        return (rec - mel).abs().mean(), {}

    @torch.no_grad()
    def latent_std(self, vae: nn.Module, max_items: int = 64) -> float:
        n = min(max_items, len(self.scale_items))
        mels = torch.stack([self.scale_items[i]["mel"] for i in range(n)])[:, None]
        z = torch.cat([vae.encode(mels[i : i + 8]).latent_dist.mode() for i in range(0, n, 8)])
        return float(z.std())

    def export(self, model: nn.Module, out_dir: Path) -> Path | None:
        vae = unwrap(model).vae
        vae.register_to_config(scaling_factor=1.0 / max(self.latent_std(vae), 1e-6))
        return atomic_save_dir(vae.save_pretrained, out_dir)
