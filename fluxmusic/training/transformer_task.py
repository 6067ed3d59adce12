"""Training the FluxMusic transformer with rectified flow on cached (latent, T5, CLAP) embeddings."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fluxmusic.config import FluxMusicConfig
from fluxmusic.errors import FluxMusicError
from fluxmusic.flow import Conditioning, cfg_velocity, flow_loss, sample, sample_t
from fluxmusic.latent import PATCH, patchify, unpatchify
from fluxmusic.model import FluxMusicTransformer, add_context_input
from fluxmusic.training.cache import CachedEmbeddingDataset
from fluxmusic.training.distributed import unwrap
from fluxmusic.training.task import Dataset, TrainTask

#: Published CFG dropout: each encoder's caption is replaced by "" independently with this probability.
P_UNCOND = 0.1
#: Trained masked conditioning (models with ``context_channels``): the mix of training masks, MusicFlow-style:
#: full generation (nothing known), prefix (continuation: the first frames known) and middle (infilling: a span
#: regenerated, both sides known).
MASK_MIX = {"full": 0.3, "prefix": 0.4, "middle": 0.3}
#: Beat-grid conditioning (models with ``beat_channels``): the grid is withheld (flag 0) with this probability, so
#: the model also generates when a prompt names no tempo.
P_NO_BEAT = 0.2
#: The register hint (models with ``register_channels``) is withheld with this probability.
P_NO_REGISTER = 0.2


def sample_frame_masks(batch: int, frames: int, generator: torch.Generator,
                       mix: dict[str, float] = MASK_MIX) -> Tensor:
    """Known-frame masks [B, frames] (1 = known, 0 = to generate) drawn from ``mix``: full generation (all 0),
    prefix (the first k frames known, k uniform in [10 %, 90 %] of the frames) or middle (a span of 10 % to 50 %
    of the frames regenerated at a uniform position, the rest known)."""
    kinds = list(mix)
    probs = torch.tensor([mix[k] for k in kinds], dtype=torch.float64)
    if probs.min() < 0 or probs.sum() <= 0:
        raise FluxMusicError(f"mask mix {mix} needs non-negative weights with a positive sum")
    choice = torch.multinomial(probs / probs.sum(), batch, replacement=True, generator=generator)
    u = torch.rand(batch, 2, generator=generator, dtype=torch.float64)
    lo, hi = max(1, round(0.1 * frames)), max(1, round(0.9 * frames))
    m = torch.zeros(batch, frames)
    for i in range(batch):
        kind = kinds[int(choice[i])]
        if kind == "prefix":
            m[i, : lo + int(u[i, 0] * (hi - lo + 1))] = 1.0
        elif kind == "middle":
            length = max(1, round((0.1 + 0.4 * float(u[i, 0])) * frames))
            start = 1 + int(u[i, 1] * max(1, frames - length - 1))  # known audio on both sides
            m[i] = 1.0
            m[i, start : start + length] = 0.0
        elif kind != "full":
            raise FluxMusicError(f"unknown mask kind {kind!r}; allowed: full, prefix, middle")
    return m


def masked_flow_loss(model: Callable[..., Tensor], x0: Tensor, noise: Tensor, t: Tensor, mask: Tensor,
                     controls: Tensor | None = None) -> Tensor:
    """The flow loss of trained masked conditioning: the model sees z_t everywhere plus the context
    [x0 * mask, mask] (:func:`fluxmusic.model.masked_context`; then the control tokens ``controls`` -- beat grid,
    register hint -- for a model that takes them), and the MSE to eps - x0 counts only the frames to generate
    (every frame when nothing is known). ``mask`` is per token and channel like ``x0``."""
    from fluxmusic.flow import interpolate
    from fluxmusic.model import masked_context

    context = masked_context(x0, mask)
    if controls is not None:
        context = torch.cat((context, controls.to(context)), dim=-1)
    pred = model(interpolate(x0, noise, t), t, context)
    err = (pred.float() - (noise - x0).float()) ** 2
    w = (1.0 - mask).float()
    return (err * w).sum() / w.sum().clamp_min(1.0)


def batch_spf(data: Dataset) -> float:
    """Seconds per latent frame of a beat-carrying cache view (:meth:`CachedEmbeddingDataset.with_beats`)."""
    spf = getattr(data, "seconds_per_frame", None)
    if spf is None:
        raise FluxMusicError("beat-grid training needs CachedEmbeddingDataset.with_beats() data")
    return float(spf)


def batch_sample_rate(data: Dataset) -> int:
    """The sample rate of the audio a cache view's latents came from (its ``sample_rate`` metadata, else 16 kHz,
    the published system's): the register hint places pitches on a mel axis up to half of it."""
    return int(getattr(data, "metadata", {}).get("sample_rate", 16000))


def cfg_dropout(
    txt: Tensor, y: Tensor, null_txt: Tensor, null_y: Tensor, p: float, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Replace each sample's T5 tokens and CLAP vector by the embeddings of "" independently with prob ``p``.

    Returns (txt, y, dropped_txt [B] bool, dropped_y [B] bool).
    """
    u = torch.rand(2, txt.shape[0], generator=generator, device=generator.device).to(txt.device)
    drop_txt, drop_y = u[0] < p, u[1] < p
    txt = torch.where(drop_txt[:, None, None], null_txt.to(txt)[None], txt)
    y = torch.where(drop_y[:, None], null_y.to(y)[None], y)
    return txt, y, drop_txt, drop_y


class TransformerTask(TrainTask):
    """Batches ``{"latent" [B,C,H,W] (scaled), "txt" [B,Lt,Dt], "y" [B,Dy]}``; loss MSE(v, eps - x0)."""

    name = "transformer"

    def __init__(
        self,
        config: FluxMusicConfig,
        train: Dataset,
        null_txt: Tensor,
        null_y: Tensor,
        val: Dataset | None = None,
        p_uncond: float = P_UNCOND,
        sample_items: int = 2,
        sample_steps: int = 25,
        sample_guidance: float = 4.0,
        decoder: Callable[[Tensor], Tensor] | None = None,
        sample_rate: int = 16000,
    ) -> None:
        if not 0.0 <= p_uncond <= 1.0:
            raise FluxMusicError(f"CFG dropout probability {p_uncond} must be in [0, 1]")
        self.config = config
        self.train, self.val = train, val
        self.null_txt, self.null_y = null_txt.float(), null_y.float()
        self.p_uncond = p_uncond
        self.sample_items, self.sample_steps, self.sample_guidance = sample_items, sample_steps, sample_guidance
        self.decoder, self.sample_rate = decoder, sample_rate
        self._check_shapes(train[0])

    def _check_shapes(self, item: dict[str, Tensor]) -> None:
        c, h, w = item["latent"].shape
        cfg = self.config
        problems = []
        if c * PATCH * PATCH != cfg.in_channels:
            problems.append(f"latent channels {c} x {PATCH}x{PATCH} patch != model in_channels {cfg.in_channels}")
        if h % PATCH or w % PATCH:
            problems.append(f"latent grid {h}x{w} is not divisible by the patch size {PATCH}")
        if item["txt"].shape[-1] != cfg.context_in_dim:
            problems.append(f"T5 width {item['txt'].shape[-1]} != model context_in_dim {cfg.context_in_dim}")
        if item["y"].shape[-1] != cfg.vec_in_dim:
            problems.append(f"CLAP width {item['y'].shape[-1]} != model vec_in_dim {cfg.vec_in_dim}")
        if tuple(self.null_txt.shape) != tuple(item["txt"].shape) or tuple(self.null_y.shape) != tuple(item["y"].shape):
            problems.append("null embeddings do not match the items' txt / y shapes")
        if problems:
            raise FluxMusicError("training data does not fit the transformer config: " + "; ".join(problems))

    # ------------------------------------------------------------------------------------ TrainTask
    def build_model(self) -> nn.Module:
        return FluxMusicTransformer(self.config)

    def train_dataset(self) -> Dataset:
        return self.train

    def val_dataset(self) -> Dataset | None:
        return self.val

    def fingerprint(self) -> dict[str, Any]:
        return {"model_config": self.config.to_dict()}

    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        latent, txt, y = batch["latent"], batch["txt"], batch["y"]
        b, _, h, w = latent.shape
        txt, y, drop_txt, drop_y = cfg_dropout(txt, y, self.null_txt, self.null_y, self.p_uncond, generator)
        x0 = patchify(latent)
        t = sample_t(b, generator, generator.device).to(x0)
        noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0)
        rope = unwrap(model).rope_for(txt.shape[1], h // PATCH, w // PATCH)
        stats = {"drop_txt": float(drop_txt.float().mean()), "drop_y": float(drop_y.float().mean())}
        if unwrap(model).takes_context:
            frames = sample_frame_masks(b, h, generator).to(x0)
            mask = patchify(frames[:, None, :, None].expand(b, latent.shape[1], h, w).contiguous())
            controls = None
            if unwrap(model).control_channels:
                controls = self.control_tokens(unwrap(model).config, batch, h, w, generator)
                stats["controls"] = float((controls[:, 0] != 0).any(-1).float().mean())
            loss = masked_flow_loss(lambda x, tt, c: model(x, tt, txt, y, rope, context=c), x0, noise, t, mask,
                                    controls)
            return loss, {**stats, "known": float(frames.mean())}
        loss = flow_loss(lambda x, tt: model(x, tt, txt, y, rope), x0, noise, t)
        return loss, stats

    def control_tokens(self, config: FluxMusicConfig, batch: dict[str, Tensor], h: int, w: int,
                       generator: torch.Generator) -> Tensor:
        """The control tokens of a batch: the beat grid (its ``"beat"`` [B, 2] = bpm, t0, withheld with probability
        :data:`P_NO_BEAT`) and / or the register hint (its ``"register"`` [B] target MIDI, withheld with
        :data:`P_NO_REGISTER`), as the model's config has them (data from
        :meth:`CachedEmbeddingDataset.with_beats`)."""
        from fluxmusic.beat import beat_features
        from fluxmusic.register import register_features

        if "beat" not in batch:
            raise FluxMusicError("this transformer takes the beat grid / register hint, but the training items carry "
                                 "no 'beat' / 'register': train it on CachedEmbeddingDataset.with_beats()")
        parts = []
        b, device = batch["latent"].shape[0], batch["latent"].device
        u = torch.rand(2, b, generator=generator, device=generator.device).cpu()
        if config.beat_channels:
            bpm, t0 = batch["beat"][:, 0].cpu(), batch["beat"][:, 1].cpu()
            bpm = torch.where(u[0] < P_NO_BEAT, torch.full_like(bpm, float("nan")), bpm)
            parts.append(beat_features(bpm, t0, h, w // PATCH, batch_spf(self.train)))
        if config.register_channels:
            midi = batch["register"].cpu()
            midi = torch.where(u[1] < P_NO_REGISTER, torch.full_like(midi, float("nan")), midi)
            parts.append(register_features(midi, h // PATCH, w // PATCH, batch_sample_rate(self.train)))
        return torch.cat(parts, dim=-1).to(device)

    def sample(self, model: nn.Module, out_dir: Path, step: int) -> dict[str, float] | None:
        """Euler + CFG from the first validation (else training) items' conditioning; saves latents (+ WAVs)."""
        from fluxmusic.checkpoint import atomic_save_safetensors

        source = self.val if self.val is not None else self.train
        n = min(self.sample_items, len(source))
        if n == 0:
            return None
        items = [source[i] for i in range(n)]
        device = next(model.parameters()).device
        latent_shape = items[0]["latent"].shape
        c, h, w = latent_shape
        cond = Conditioning(torch.stack([it["txt"] for it in items]).to(device),
                            torch.stack([it["y"] for it in items]).to(device))
        uncond = Conditioning(
            self.null_txt.to(device)[None].expand(n, -1, -1), self.null_y.to(device)[None].expand(n, -1)
        )
        g = torch.Generator().manual_seed(1234)  # same noise every time: samples comparable across steps
        noise = patchify(torch.randn((n, c, h, w), generator=g).to(device))
        rope = model.rope_for(cond.txt.shape[1], h // PATCH, w // PATCH)
        velocity = cfg_velocity(model, cond, uncond, torch.full((n,), self.sample_guidance, device=device), rope)
        x = sample(velocity, noise, self.sample_steps)
        latents = unpatchify(x, h // PATCH, w // PATCH).cpu()
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors({"latent": latents.contiguous()}, out_dir / f"step-{step:07d}.safetensors")
        if self.decoder is not None:
            from fluxmusic.audio import write_audio

            waves = self.decoder(latents)
            for i in range(n):
                write_audio(out_dir / f"step-{step:07d}-{i}.wav", waves[i].float().cpu().numpy(), self.sample_rate)
        return {"latent_std": float(latents.std())}

    def export(self, model: nn.Module, out_dir: Path) -> Path | None:
        from fluxmusic.transformer_io import save_transformer

        assert isinstance(model, FluxMusicTransformer)
        return save_transformer(model, out_dir)


def cache_splits(cache_dir: str | Path,
                 val_items: int | None = None) -> tuple[CachedEmbeddingDataset, CachedEmbeddingDataset | None]:
    """(train, val) views of an embedding cache: items marked ``"split": "val"`` validate (the first
    ``val_items`` of them when given), every other item trains."""
    data = CachedEmbeddingDataset(cache_dir)
    meta = data.items_meta()
    train_ids = [i for i, m in enumerate(meta) if m.get("split") != "val"]
    val_ids = [i for i, m in enumerate(meta) if m.get("split") == "val"][:val_items]
    if not train_ids:
        raise FluxMusicError(f"embedding cache {cache_dir} has no training items (all {len(meta)} are split 'val')")
    return data.subset(train_ids), data.subset(val_ids) if val_ids else None


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class MaskedFinetuneTask(TransformerTask):
    """Trained masked conditioning from a trained plain transformer (MusicFlow-style continuation / infilling).

    The model is the transformer in ``base`` extended with the zero-initialised context input
    (:func:`fluxmusic.model.add_context_input`: step 0 computes exactly what the plain model computes), or, when
    ``base`` already takes one (an earlier fine-tune), that transformer as it is, trained further; trained
    with :func:`masked_flow_loss` over the masks of :data:`MASK_MIX` and the usual CFG dropout (the inherited
    ``loss`` takes that route for a model with a context input). The new ``context_in`` weights get their own
    peak lr ``context_lr``: they start from zero and must learn what the pretrained weights already know.
    With ``beat`` the context input also takes the beat grid (:mod:`fluxmusic.beat`; a masked base gains those
    columns), trained from the items' [bpm, t0] (``train`` from :meth:`CachedEmbeddingDataset.with_beats`).
    """

    name = "transformer_masked"

    def __init__(self, base: str | Path, train: Dataset, null_txt: Tensor, null_y: Tensor,
                 val: Dataset | None = None, context_lr: float = 1e-3, p_uncond: float = P_UNCOND,
                 beat: bool = False, register: bool = False) -> None:
        from fluxmusic.beat import BEAT_CHANNELS
        from fluxmusic.register import REGISTER_CHANNELS
        from fluxmusic.transformer_io import CONFIG_NAME, WEIGHTS_NAME

        self.base = Path(base)
        missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (self.base / n).is_file()]
        if missing:
            raise FluxMusicError(f"base transformer {self.base} has no {' / '.join(missing)}; give the trained plain "
                                 "transformer directory (config.json + model.safetensors)")
        base_config = FluxMusicConfig.load(self.base / CONFIG_NAME)
        beat_channels = BEAT_CHANNELS if beat else 0
        register_channels = REGISTER_CHANNELS if register else 0
        for name, on, what in (("beat_channels", beat, "beat"), ("register_channels", register, "register")):
            if getattr(base_config, name) and not on:
                raise FluxMusicError(f"base transformer {self.base} takes the {what} input; train it further with "
                                     f"{what} on")
        config = dataclasses.replace(
            base_config, context_channels=2 * base_config.in_channels + beat_channels + register_channels,
            beat_channels=beat_channels, register_channels=register_channels)
        # A base that already takes this context input (an earlier fine-tune) is trained further as it is; a
        # masked one gains the control columns (zero-initialised).
        self.continues = base_config == config
        if not (isinstance(context_lr, (int, float)) and math.isfinite(context_lr) and context_lr > 0):
            raise FluxMusicError(f"context lr must be a finite number > 0, got {context_lr!r}")
        if beat or register:
            batch_spf(train)
        super().__init__(config, train, null_txt, null_y, val=val, p_uncond=p_uncond)
        self.context_lr = float(context_lr)
        self.beat, self.register = beat, register
        # The checkpoint continues a fine-tune of these exact weights: a retrained base must not resume it.
        self.base_sha256 = _file_sha256(self.base / WEIGHTS_NAME)

    def build_model(self) -> nn.Module:
        from fluxmusic.transformer_io import load_transformer

        model = load_transformer(self.base)
        if self.continues:
            return model.train()
        return add_context_input(model, self.config.beat_channels, self.config.register_channels).train()

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        named = list(model.named_parameters())
        return [{"params": [p for n, p in named if not n.startswith("context_in.")]},
                {"params": [p for n, p in named if n.startswith("context_in.")], "lr": self.context_lr}]

    def fingerprint(self) -> dict[str, Any]:
        controls = {"p_no_beat": P_NO_BEAT} if self.beat else {}
        if self.register:
            controls["p_no_register"] = P_NO_REGISTER
        return {**super().fingerprint(), "base_sha256": self.base_sha256, "mask_mix": dict(MASK_MIX),
                "p_uncond": self.p_uncond, **controls}

    def export(self, model: nn.Module, out_dir: Path) -> Path | None:
        from fluxmusic.training.saving import atomic_save_dir
        from fluxmusic.transformer_io import save_transformer

        assert isinstance(model, FluxMusicTransformer)
        # atomic: the recipe takes the directory's existence as "this stage is done"
        return atomic_save_dir(lambda tmp: save_transformer(model, tmp), out_dir)
