"""Training the text encoders: a small CLAP (text + audio towers) and a small T5 encoder, jointly, with a
contrastive (CLIP/InfoNCE) loss against the CLAP audio tower's embedding of the clip's log-mel.

Why T5 is trained this way: the transformer reads T5's *token* features, so they must carry what the
caption says about the music. Making mean-pooled T5 tokens retrieve the right audio (a second text tower
of the same contrastive objective, through a projection used only in training) teaches the token features
exactly the attributes that are audible, in the same few minutes that train CLAP. A masked-LM objective
would learn the caption grammar instead, which the transformer does not need.

The CLAP audio tower is kept in the exported ``ClapModel`` (the evaluation code scores audio-text
similarity with it). Its input is the AudioLDM2 log-mel average-pooled 4x in time and frequency
(:func:`clap_audio_input`), a [256, 16] image for the small HTSAT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fluxmusic.errors import FluxMusicError
from fluxmusic.training.distributed import unwrap
from fluxmusic.training.saving import atomic_save_dir
from fluxmusic.training.task import Dataset, TrainTask

#: Pooling of the log-mel into the CLAP audio tower's input (time, frequency).
CLAP_POOL = (4, 4)


def clap_audio_input(mel: Tensor) -> Tensor:
    """AudioLDM2 log-mel [B, frames, 64] -> CLAP ``input_features`` [B, 1, frames/4, 16] (10.24 s: 256 x 16)."""
    return F.avg_pool2d(mel[:, None], CLAP_POOL)


@dataclass(frozen=True)
class TextEncodersConfig:
    """Sizes of the small T5 encoder and CLAP. ``clap_hidden`` is the pooled width the transformer sees."""

    t5_d_model: int = 128
    t5_layers: int = 2
    t5_heads: int = 4
    clap_hidden: int = 128
    clap_layers: int = 2
    clap_heads: int = 4
    projection_dim: int = 64
    audio_patch_hidden: int = 32
    audio_depths: tuple[int, ...] = (2, 2)
    audio_heads: tuple[int, ...] = (2, 4)
    max_positions: int = 96

    def build_t5(self, vocab_size: int):
        from transformers import T5Config, T5EncoderModel

        return T5EncoderModel(T5Config(
            vocab_size=vocab_size, d_model=self.t5_d_model, d_kv=self.t5_d_model // self.t5_heads,
            d_ff=2 * self.t5_d_model, num_layers=self.t5_layers, num_heads=self.t5_heads,
            feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=2, decoder_start_token_id=0,
            dropout_rate=0.0,
        ))

    def build_clap(self, vocab_size: int, frames: int = 1024, n_mels: int = 64):
        from transformers import ClapConfig, ClapModel

        t_in, f_in = frames // CLAP_POOL[0], n_mels // CLAP_POOL[1]
        if t_in != 16 * f_in:
            # HTSAT folds time into a square image: [16 F, F] -> [4 F, 4 F] (laion's: 1024 x 64 -> 256 x 256).
            raise FluxMusicError(f"the CLAP audio tower takes {16 * n_mels} mel frames for {n_mels} mel bins "
                                 f"(10.24 s at 64 bins), got {frames}")
        freq_ratio = 4
        text = dict(
            vocab_size=vocab_size, hidden_size=self.clap_hidden, num_hidden_layers=self.clap_layers,
            num_attention_heads=self.clap_heads, intermediate_size=2 * self.clap_hidden,
            max_position_embeddings=self.max_positions, projection_dim=self.projection_dim, pad_token_id=0,
            type_vocab_size=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
        audio = dict(
            hidden_size=self.audio_patch_hidden * 2 ** (len(self.audio_depths) - 1),
            patch_embeds_hidden_size=self.audio_patch_hidden, depths=list(self.audio_depths),
            num_attention_heads=list(self.audio_heads), window_size=8, spec_size=f_in * freq_ratio,
            patch_size=4, patch_stride=4, num_mel_bins=f_in, projection_dim=self.projection_dim,
            enable_fusion=False, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0,
        )
        return ClapModel(ClapConfig(text_config=text, audio_config=audio, projection_dim=self.projection_dim))


class TextAudioModel(nn.Module):
    """CLAP + T5 (+ a training-only T5 projection and temperature); forward returns normalised embeddings."""

    def __init__(self, clap: nn.Module, t5: nn.Module, projection_dim: int) -> None:
        super().__init__()
        self.clap, self.t5 = clap, t5
        self.t5_projection = nn.Linear(t5.config.d_model, projection_dim)
        self.t5_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, t5_ids: Tensor, clap_ids: Tensor, clap_mask: Tensor, audio: Tensor) -> dict[str, Tensor]:
        audio_emb = self.clap.audio_projection(self.clap.audio_model(input_features=audio).pooler_output)
        text_emb = self.clap.text_projection(
            self.clap.text_model(input_ids=clap_ids, attention_mask=clap_mask).pooler_output
        )
        # T5 runs as at inference: padded ids, no attention mask (the official pipeline's convention).
        hidden = self.t5(input_ids=t5_ids).last_hidden_state
        keep = (t5_ids != 0).unsqueeze(-1).to(hidden.dtype)
        t5_emb = self.t5_projection((hidden * keep).sum(1) / keep.sum(1).clamp_min(1))
        return {
            "audio": F.normalize(audio_emb, dim=-1), "clap_text": F.normalize(text_emb, dim=-1),
            "t5_text": F.normalize(t5_emb, dim=-1),
            "clap_scale": self.clap.logit_scale_t.exp().clamp(max=100), "t5_scale": self.t5_logit_scale.exp().clamp(
                max=100),
        }


def info_nce(a: Tensor, b: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric InfoNCE of matched rows, and the a->b retrieval accuracy."""
    logits = scale * a @ b.t()
    target = torch.arange(a.shape[0], device=a.device)
    loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    return loss, (logits.argmax(1) == target).float().mean()


class TextEncodersTask(TrainTask):
    """Items ``{"mel": [frames, n_mels], "caption": str}``; the tokenizers are built beforehand from captions."""

    name = "text_encoders"

    def __init__(self, train: Dataset, t5_tokenizer, clap_tokenizer, t5_max_length: int, clap_max_length: int,
                 val: Dataset | None = None, config: TextEncodersConfig | None = None,
                 frames: int = 1024, n_mels: int = 64) -> None:
        self.train, self.val = train, val
        self.t5_tokenizer, self.clap_tokenizer = t5_tokenizer, clap_tokenizer
        self.t5_max_length, self.clap_max_length = t5_max_length, clap_max_length
        self.config = config or TextEncodersConfig()
        self.frames, self.n_mels = frames, n_mels

    def build_model(self) -> nn.Module:
        c = self.config
        clap = c.build_clap(len(self.clap_tokenizer), self.frames, self.n_mels)
        return TextAudioModel(clap, c.build_t5(len(self.t5_tokenizer)), c.projection_dim)

    def train_dataset(self) -> Dataset:
        return self.train

    def val_dataset(self) -> Dataset | None:
        return self.val

    def fingerprint(self) -> dict[str, Any]:
        return {"t5_vocab": len(self.t5_tokenizer), "clap_vocab": len(self.clap_tokenizer),
                "t5_max_length": self.t5_max_length, "clap_max_length": self.clap_max_length}

    def collate(self, items: list[Any]) -> Any:
        captions = [it["caption"] for it in items]
        t5 = self.t5_tokenizer(captions, max_length=self.t5_max_length, padding="max_length", truncation=True,
                               return_tensors="pt")
        clap = self.clap_tokenizer(captions, max_length=self.clap_max_length, padding="max_length",
                                   truncation=True, return_tensors="pt")
        return {"t5_ids": t5["input_ids"], "clap_ids": clap["input_ids"], "clap_mask": clap["attention_mask"],
                "audio": clap_audio_input(torch.stack([it["mel"] for it in items]))}

    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        out = model(batch["t5_ids"], batch["clap_ids"], batch["clap_mask"], batch["audio"])
        clap_loss, clap_acc = info_nce(out["clap_text"], out["audio"], out["clap_scale"])
        t5_loss, t5_acc = info_nce(out["t5_text"], out["audio"], out["t5_scale"])
        return clap_loss + t5_loss, {"clap_loss": float(clap_loss.detach()), "t5_loss": float(t5_loss.detach()),
                                     "clap_acc": float(clap_acc.detach()), "t5_acc": float(t5_acc.detach())}

    def export(self, model: nn.Module, out_dir: Path) -> Path | None:
        m = unwrap(model)
        out = Path(out_dir)
        atomic_save_dir(m.clap.save_pretrained, out / "clap")
        atomic_save_dir(m.t5.save_pretrained, out / "text_encoder")
        return out
