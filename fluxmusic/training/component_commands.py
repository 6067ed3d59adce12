"""``fluxmusic train --task vae|vocoder|text`` on a manifest (``--data corpus/manifest.jsonl``), with the
default recipe's component sizes. Entries with ``"split": "val"`` (the synth corpus marks 5 %) validate."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fluxmusic.errors import FluxMusicError


def _banks(args: argparse.Namespace):
    from fluxmusic.training.audio_data import load_clip_bank

    manifest = Path(args.data)
    if manifest.is_dir():
        manifest = manifest / "manifest.jsonl"
    if not manifest.is_file():
        raise FluxMusicError(f"--data {args.data} is not a manifest (JSONL) or a directory holding manifest.jsonl")
    train = load_clip_bank(manifest, split="train")
    try:
        val = load_clip_bank(manifest, split="val")
    except FluxMusicError:  # no validation entries
        val = None
    return train, val


def build_vae_task(args: argparse.Namespace):
    from fluxmusic.training.audio_data import MelCropDataset
    from fluxmusic.training.recipe import RECIPES, _WholeMels
    from fluxmusic.training.vae_task import VAETask

    r = RECIPES["default"]
    train, val = _banks(args)
    return VAETask(MelCropDataset(train, r.vae_crop_frames, args.seed),
                   MelCropDataset(val, r.vae_crop_frames, args.seed + 1) if val else None, r.vae,
                   scale_items=_WholeMels(train))


def build_vocoder_task(args: argparse.Namespace):
    from fluxmusic.training.recipe import RECIPES, vocoder_task

    train, val = _banks(args)
    return vocoder_task(RECIPES["default"], train, val, args.seed)


def build_text_task(args: argparse.Namespace):
    """CLAP + T5 trained together; the tokenizers are built from the training captions into OUT/ first."""
    from fluxmusic.checkpoint import atomic_write_text
    from fluxmusic.components import load_tokenizer
    from fluxmusic.training.audio_data import CaptionMelDataset
    from fluxmusic.training.caption_tokenizer import build_caption_tokenizer, max_tokens
    from fluxmusic.training.recipe import RECIPES, _round_up
    from fluxmusic.training.text_task import TextEncodersTask

    r = RECIPES["default"]
    train, val = _banks(args)
    out = Path(args.out)
    lengths_path = out / "text_lengths.json"
    if not lengths_path.is_file():
        t5 = build_caption_tokenizer(train.captions, out / "tokenizer", "t5", 512)
        clap = build_caption_tokenizer(train.captions, out / "clap_tokenizer", "clap", 512)
        lengths = {"t5_max_length": _round_up(max_tokens(t5, train.captions) + 8),
                   "clap_max_length": min(_round_up(max_tokens(clap, train.captions) + 8), r.text.max_positions - 4)}
        atomic_write_text(lengths_path, json.dumps(lengths) + "\n")
    lengths = json.loads(lengths_path.read_text())
    return TextEncodersTask(
        CaptionMelDataset(train), load_tokenizer(out / "tokenizer", "T5 tokenizer"),
        load_tokenizer(out / "clap_tokenizer", "CLAP tokenizer"), lengths["t5_max_length"], lengths["clap_max_length"],
        val=CaptionMelDataset(val) if val else None, config=r.text, frames=train.mels.shape[1],
        n_mels=train.mels.shape[2],
    )
