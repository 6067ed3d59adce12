"""``fluxmusic train --task adapter``: a small image tower and the image / story adapters (issue 18, MusFlow).

Targets come from a FluxMusic model directory (default: the bundled one), computed once per run and cached in the
run directory (``adapter_targets.safetensors``): for every clip of the manifest, its caption's conditioning (the
pooled CLAP text vector ``y`` and the T5 tokens ``txt``, what the transformer reads), the CLAP **audio**
embedding of the clip, and the chunk features of its stories (through the model's own text encoders).

Loss per modality (image, story), as MusFlow: regression of ``y`` and ``txt`` to the caption's (each MSE divided
by the target's variance), a cosine regression of the CLAP joint-space embedding (the frozen CLAP text projection
of the predicted ``y``) to the clip's CLAP audio embedding, and an InfoNCE term between the two (in-batch
negatives), which is what makes the vector point at *its* clip rather than at the average caption.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fluxmusic.adapters import (
    ADAPTERS,
    IMAGE_ENCODER,
    IMAGE_PROCESSOR,
    AdapterConfig,
    MediaAdapters,
    chunk_features_batch,
    save_adapters,
    split_story,
)
from fluxmusic.data.media import IMAGE_SIZE, make_story, pair_seed, render_image
from fluxmusic.errors import FluxMusicError
from fluxmusic.training.distributed import unwrap
from fluxmusic.training.saving import atomic_save_dir
from fluxmusic.training.task import TrainTask
from fluxmusic.training.text_task import clap_audio_input, info_nce

TARGETS = "adapter_targets.safetensors"
#: story variants per clip computed for training (variant 0 is the held-out evaluation story)
STORY_VARIANTS = 2
IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)


def image_tower_config(size: int = IMAGE_SIZE, hidden: int = 64, layers: int = 3, heads: int = 4,
                       projection_dim: int = 64, patch: int = 8):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, image_size=size, patch_size=patch,
                            projection_dim=projection_dim, num_channels=3)


def image_processor(size: int = IMAGE_SIZE):
    """The preprocessing the tower is trained with: resize the short side, centre crop, scale to [-1, 1]."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD), do_convert_rgb=True)


def to_pixels(images: np.ndarray) -> Tensor:
    """uint8 [B, H, W, 3] already at the tower's size -> pixel values [B, 3, H, W] (what the processor gives)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div(255.0).permute(0, 3, 1, 2)
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class AdapterModel(nn.Module):
    """Image tower + adapters (trained) and CLAP's text projection (frozen: it defines the joint space)."""

    def __init__(self, tower: nn.Module, adapters: MediaAdapters, text_projection: nn.Module, scale: float) -> None:
        super().__init__()
        self.tower, self.adapters, self.text_projection = tower, adapters, text_projection
        for p in self.text_projection.parameters():
            p.requires_grad_(False)
        self.register_buffer("scale", torch.tensor(float(scale)))

    def joint(self, y: Tensor) -> Tensor:
        return F.normalize(self.text_projection(y), dim=-1)

    def forward(self, pixels: Tensor, story: Tensor, story_mask: Tensor) -> dict[str, Tensor]:
        out = self.tower(pixel_values=pixels)
        img_txt, img_y = self.adapters.image(out.image_embeds, out.last_hidden_state)
        st_txt, st_y = self.adapters.story(story, story_mask)
        return {"image": (img_txt, img_y), "story": (st_txt, st_y)}


class ImageStoryData:
    """Clips of one split: rendered images (a new render per epoch in training), precomputed story features."""

    def __init__(self, rows: list[dict], indices: list[int], targets: dict[str, Tensor], seed: int,
                 train: bool) -> None:
        self.rows, self.indices, self.t, self.seed, self.train = rows, indices, targets, seed, train
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        k = self.indices[i]
        variant = 1 + self.epoch if self.train else 0  # held-out items: always the evaluation render
        story = 1 + (self.epoch % (STORY_VARIANTS - 1)) if self.train and STORY_VARIANTS > 1 else 0
        img = render_image(self.rows[k], pair_seed(self.seed, k, variant))
        return {"pixels": to_pixels(img[None])[0], "y": self.t["y"][k], "txt": self.t["txt"][k],
                "audio": self.t["audio"][k], "story": self.t["story"][story, k],
                "story_mask": self.t["story_mask"][story, k]}


def compute_targets(model_dir: Path, rows: list[dict], manifest: Path, seed: int, max_chunks: int,
                    batch: int = 128) -> dict[str, Tensor]:
    """Caption conditioning, CLAP audio embedding and story chunk features of every clip (see the module doc)."""
    from transformers import ClapModel

    from fluxmusic.components import _from_pretrained, load_clap_text, load_t5, load_tokenizer
    from fluxmusic.modeldir import read_index
    from fluxmusic.text import TextEncoders, torch_clap_fn, torch_t5_fn
    from fluxmusic.training.audio_data import load_clip_bank

    index = read_index(model_dir)
    enc = TextEncoders(load_tokenizer(model_dir / "tokenizer", "T5 tokenizer"),
                       load_tokenizer(model_dir / "clap_tokenizer", "CLAP tokenizer"),
                       torch_t5_fn(load_t5(model_dir / "text_encoder")),
                       torch_clap_fn(load_clap_text(model_dir / "clap")), index.t5_max_length, index.clap_max_length)
    captions = [r["caption"] for r in rows]
    ys, txts = [], []
    for a in range(0, len(captions), batch):
        c = enc.encode(captions[a:a + batch])
        ys.append(c.y)
        txts.append(c.txt)
    clap = _from_pretrained(ClapModel, model_dir / "clap", "CLAP (audio tower)")
    bank = load_clip_bank(manifest)
    if len(bank) != len(rows):
        raise FluxMusicError(f"manifest {manifest}: {len(bank)} clips read for {len(rows)} rows")
    audio = []
    with torch.no_grad():
        for a in range(0, len(bank), 64):
            feats = clap_audio_input(bank.mels[a:a + 64])
            emb = clap.audio_projection(clap.audio_model(input_features=feats).pooler_output)
            audio.append(F.normalize(emb, dim=-1))
    stories, masks = [], []
    for v in range(STORY_VARIANTS):
        texts = [split_story(make_story(r, pair_seed(seed, k, 1000 + v)), max_chunks) for k, r in enumerate(rows)]
        f, m = chunk_features_batch(enc, texts, max_chunks)
        stories.append(f)
        masks.append(m)
    return {"y": torch.cat(ys), "txt": torch.cat(txts), "audio": torch.cat(audio), "story": torch.stack(stories),
            "story_mask": torch.stack(masks)}


class AdapterTask(TrainTask):
    name = "adapter"

    def __init__(self, model_dir: Path, rows: list[dict], targets: dict[str, Tensor], seed: int = 0,
                 config: AdapterConfig | None = None, nce_weight: float = 1.0) -> None:
        from transformers import ClapModel

        from fluxmusic.components import _from_pretrained

        self.model_dir, self.rows, self.targets, self.seed = model_dir, rows, targets, seed
        train_idx = [k for k, r in enumerate(rows) if r.get("split", "train") == "train"]
        val_idx = [k for k, r in enumerate(rows) if r.get("split", "train") != "train"]
        if not train_idx:
            raise FluxMusicError("the manifest has no training clips (split 'train')")
        self.train = ImageStoryData(rows, train_idx, targets, seed, True)
        self.val = ImageStoryData(rows, val_idx, targets, seed, False) if val_idx else None
        t = targets
        self.config = config or AdapterConfig(clap_dim=t["y"].shape[1], t5_dim=t["txt"].shape[2],
                                              t5_tokens=t["txt"].shape[1], max_chunks=t["story"].shape[2])
        self.y_var = float(t["y"][train_idx].var(0).mean())
        self.txt_var = float(t["txt"][train_idx].var(0).mean())
        clap = _from_pretrained(ClapModel, model_dir / "clap", "CLAP")
        self.text_projection = clap.text_projection
        self.scale = float(clap.logit_scale_t.detach().exp().clamp(max=100))
        self.nce_weight = nce_weight

    def build_model(self) -> nn.Module:
        import copy

        from transformers import CLIPVisionModelWithProjection

        torch.manual_seed(self.seed)
        c = self.config
        tower = CLIPVisionModelWithProjection(image_tower_config(projection_dim=c.image_dim, hidden=c.image_token_dim))
        return AdapterModel(tower, MediaAdapters(c), copy.deepcopy(self.text_projection), self.scale)

    def train_dataset(self):
        return self.train

    def val_dataset(self):
        return self.val

    def fingerprint(self) -> dict[str, Any]:
        return {"adapter_config": self.config.to_dict(), "clips": len(self.rows)}

    def _terms(self, m: AdapterModel, pred: tuple[Tensor, Tensor], batch: dict) -> tuple[Tensor, dict]:
        txt, y = pred
        l_y = F.mse_loss(y, batch["y"]) / self.y_var
        l_t = F.mse_loss(txt, batch["txt"]) / self.txt_var
        e = m.joint(y)
        cos_audio = 1.0 - (e * batch["audio"]).sum(-1).mean()
        cos_text = 1.0 - (e * m.joint(batch["y"])).sum(-1).mean()
        nce, acc = info_nce(e, batch["audio"], m.scale)
        total = l_y + l_t + cos_audio + cos_text + self.nce_weight * nce
        return total, {"y": float(l_y.detach()), "txt": float(l_t.detach()), "cos_audio": float(cos_audio.detach()),
                       "nce": float(nce.detach()),
                       "acc": float(acc)}

    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        m = unwrap(model)
        out = model(batch["pixels"], batch["story"], batch["story_mask"])
        li, logs_i = self._terms(m, out["image"], batch)
        ls, logs_s = self._terms(m, out["story"], batch)
        logs = {f"image_{k}": v for k, v in logs_i.items()} | {f"story_{k}": v for k, v in logs_s.items()}
        return li + ls, logs

    def export(self, model: nn.Module, out_dir: Path) -> Path | None:
        m = unwrap(model)
        out = Path(out_dir)
        atomic_save_dir(lambda d: _half_copy(m.tower).save_pretrained(d), out / IMAGE_ENCODER)
        atomic_save_dir(image_processor(m.tower.config.image_size).save_pretrained, out / IMAGE_PROCESSOR)
        atomic_save_dir(lambda d: save_adapters(m.adapters, d, torch.float16), out / ADAPTERS)
        return out


def _half_copy(module: nn.Module) -> nn.Module:
    """fp16 storage (as the bundled default's other parts); the loader casts back to the run dtype."""
    import copy

    return copy.deepcopy(module).half()


def build_adapter_task(args: argparse.Namespace) -> AdapterTask:
    """From ``--data`` (a rendered-corpus manifest) and ``--model`` (targets; default: the bundled model)."""
    from safetensors.torch import load_file

    from fluxmusic.checkpoint import atomic_save_safetensors
    from fluxmusic.data.manifest import load_manifest
    from fluxmusic.pipeline import default_model_dir

    manifest = Path(args.data)
    if manifest.is_dir():
        manifest = manifest / "manifest.jsonl"
    if not manifest.is_file():
        raise FluxMusicError(f"--data {args.data} is not a manifest (JSONL) or a directory holding manifest.jsonl")
    model_dir = Path(getattr(args, "model", None) or default_model_dir())
    rows = [{**e.attributes, "caption": e.caption} for e in load_manifest(manifest)]
    out = Path(args.out)
    cache = out / TARGETS
    if cache.is_file():
        targets = load_file(str(cache))
    else:
        targets = compute_targets(model_dir, rows, manifest, args.seed, AdapterConfig().max_chunks)
        atomic_save_safetensors(targets, cache)
    if targets["y"].shape[0] != len(rows):
        raise FluxMusicError(f"{cache} holds {targets['y'].shape[0]} clips, the manifest {len(rows)}: use a new --out")
    return AdapterTask(model_dir, rows, targets, args.seed)
