"""Tiny components of the real classes with random weights, for tests, benchmarks and as training seeds.

Each part is saved with its library's ``save_pretrained`` and goes back through the real loaders, so
whatever exercises a tiny model directory exercises the same code as the full-size one.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

from fluxmusic.config import FluxMusicConfig
from fluxmusic.model import FluxMusicTransformer
from fluxmusic.modeldir import assemble
from fluxmusic.transformer_io import save_transformer

SPECIAL_TOKENS = ["<pad>", "<unk>", "</s>", "<s>"]
TINY_WORDS = [
    "a",
    "an",
    "the",
    "slow",
    "fast",
    "calm",
    "happy",
    "sad",
    "piano",
    "guitar",
    "drums",
    "bass",
    "melody",
    "loud",
    "soft",
    "high",
    "low",
    "music",
    "song",
    "with",
    "and",
    "of",
    "in",
    "on",
    "beat",
    "rhythm",
    "gentle",
    "quality",
    "cheerful",
    "dark",
    "bright",
    "pad",
    "string",
    "plucked",
    "organ",
    "bell",
    "synth",
]


def build_word_tokenizer(words: Iterable[str], out_dir: str | Path, model_max_length: int = 512):
    """A lowercase word-level tokenizer (``tokenizers`` library) saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in words:
        vocab.setdefault(w.lower(), len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="</s>",
        bos_token="<s>",
        model_max_length=model_max_length,
    )
    fast.save_pretrained(str(out_dir))
    return fast


def tiny_t5(vocab_size: int, d_model: int = 48):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=12,
        d_ff=96,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(cfg)


def tiny_clap(vocab_size: int, hidden: int = 32):
    """A full ClapModel (text + audio towers), as the published laion/larger_clap_music checkpoint is."""
    from transformers import ClapConfig, ClapModel

    text = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=96,
        projection_dim=16,
        pad_token_id=0,
        type_vocab_size=1,
    )
    audio = dict(
        hidden_size=32,  # = patch_embeds_hidden_size * 2 ** (len(depths) - 1): the last stage's width
        depths=[1, 1],
        num_attention_heads=[2, 2],
        window_size=4,
        spec_size=32,
        patch_size=4,
        num_mel_bins=16,
        projection_dim=16,
        patch_embeds_hidden_size=16,
        enable_fusion=False,
    )
    return ClapModel(ClapConfig(text_config=text, audio_config=audio, projection_dim=16))


def tiny_vae(latent_channels: int = 8, levels: int = 3):
    """AudioLDM2-shaped mel VAE (1 channel in, 2**(levels-1) down in time and frequency), tiny widths."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(8, 16, 16, 16)[:levels],
        layers_per_block=1,
        norm_num_groups=4,
        scaling_factor=0.5,
    )


def tiny_vocoder(n_mels: int = 64, channels: int = 64):
    """SpeechT5HifiGan with AudioLDM2's upsampling (5, 4, 2, 2, 2 = hop 160) and tiny widths."""
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    cfg = SpeechT5HifiGanConfig(
        model_in_dim=n_mels,
        sampling_rate=16000,
        upsample_initial_channel=channels,
        upsample_rates=[5, 4, 2, 2, 2],
        upsample_kernel_sizes=[16, 16, 8, 4, 4],
        resblock_kernel_sizes=[3],
        resblock_dilation_sizes=[[1, 3]],
        normalize_before=False,
    )
    return SpeechT5HifiGan(cfg)


def build_tiny_parts(root: str | Path, seed: int = 0) -> dict[str, Path]:
    """Save every tiny component in its library's format under ``root``; returns their paths."""
    from fluxmusic.components import quiet_libraries

    quiet_libraries()
    root = Path(root)
    torch.manual_seed(seed)
    paths = {
        name: root / name
        for name in ("transformer", "text_encoder", "tokenizer", "clap", "clap_tokenizer", "vae", "vocoder")
    }
    tok = build_word_tokenizer(TINY_WORDS, paths["tokenizer"])
    build_word_tokenizer(TINY_WORDS, paths["clap_tokenizer"])
    t5 = tiny_t5(len(tok))
    clap = tiny_clap(len(tok))
    t5.save_pretrained(str(paths["text_encoder"]))
    clap.save_pretrained(str(paths["clap"]))
    tiny_vae().save_pretrained(str(paths["vae"]))
    tiny_vocoder().save_pretrained(str(paths["vocoder"]))
    cfg = FluxMusicConfig(
        in_channels=32,
        vec_in_dim=clap.config.text_config.hidden_size,
        context_in_dim=t5.config.d_model,
        hidden_size=64,
        num_heads=4,
        depth=1,
        depth_single_blocks=1,
        axes_dim=(4, 6, 6),
    )
    save_transformer(FluxMusicTransformer(cfg), paths["transformer"])
    return paths


TINY_DEFAULTS = {"steps": 4, "guidance": 3.0, "solver": "euler", "shift": None}


def build_tiny_model_dir(out_dir: str | Path, seed: int = 0) -> Path:
    """A complete tiny model directory (DESIGN.md section 5), assembled by the real ``assemble``."""
    with tempfile.TemporaryDirectory() as tmp:
        parts = build_tiny_parts(tmp, seed)
        return assemble(
            out_dir, **parts, defaults=TINY_DEFAULTS, name="tiny-random", t5_max_length=16, clap_max_length=16
        )


def build_random_model_dir(out_dir: str | Path, config: str = "small", seed: int = 0) -> Path:
    """A model directory for speed work: the named transformer config with random weights, an AudioLDM2-sized
    VAE (128/256/512 channels, 4x down) and HiFi-GAN (1024 initial channels), both random, and narrow random
    text encoders of the config's widths (T5 ``context_in_dim``, CLAP ``vec_in_dim``) at the official text
    lengths (256 / 77) and sampler defaults (50 Euler steps, guidance 7).

    Speed does not depend on the weights, so this gives the real shapes of a generation (1024 music + 256 text
    tokens for 10.24 s) without downloading anything. Used by the GPU benchmarks (benchmarks/gpu_check.py,
    benchmarks/bench_tensorrt_gpu.py).
    """
    from diffusers import AutoencoderKL
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    from fluxmusic.components import quiet_libraries
    from fluxmusic.config import get_config

    quiet_libraries()
    cfg = get_config(config)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok = build_word_tokenizer(TINY_WORDS, root / "tokenizer")
        build_word_tokenizer(TINY_WORDS, root / "clap_tokenizer")
        tiny_t5(len(tok), d_model=cfg.context_in_dim).save_pretrained(str(root / "text_encoder"))
        tiny_clap(len(tok), hidden=cfg.vec_in_dim).save_pretrained(str(root / "clap"))
        AutoencoderKL(
            in_channels=1,
            out_channels=1,
            latent_channels=8,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(128, 256, 512),
            layers_per_block=2,
            scaling_factor=0.4,
        ).save_pretrained(str(root / "vae"))
        SpeechT5HifiGan(
            SpeechT5HifiGanConfig(
                model_in_dim=64,
                sampling_rate=16000,
                upsample_initial_channel=1024,
                upsample_rates=[5, 4, 2, 2, 2],
                upsample_kernel_sizes=[16, 16, 8, 4, 4],
                normalize_before=False,
            )
        ).save_pretrained(str(root / "vocoder"))
        save_transformer(FluxMusicTransformer(cfg), root / "transformer")
        return assemble(
            out_dir,
            root / "transformer",
            root / "text_encoder",
            root / "tokenizer",
            root / "clap",
            root / "clap_tokenizer",
            root / "vae",
            root / "vocoder",
            defaults={"steps": 50, "guidance": 7.0, "solver": "euler", "shift": None},
            name=f"random-{config}",
            t5_max_length=256,
            clap_max_length=77,
        )


def add_tiny_media(model_dir: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """Add random image / story components (``image_encoder/``, ``image_processor/``, ``adapters/``) to a model
    directory, sized to its text encoders, each saved the way the real ones are and loaded by the real loaders."""
    from transformers import CLIPVisionModelWithProjection

    from fluxmusic.adapters import ADAPTERS, IMAGE_ENCODER, IMAGE_PROCESSOR, AdapterConfig, MediaAdapters, save_adapters
    from fluxmusic.components import read_config
    from fluxmusic.modeldir import read_index
    from fluxmusic.training.adapter_task import image_processor, image_tower_config

    model_dir = Path(model_dir)
    index = read_index(model_dir)
    t5 = read_config(model_dir / "text_encoder", "T5")["d_model"]
    clap_cfg = read_config(model_dir / "clap", "CLAP")
    clap = clap_cfg.get("text_config", clap_cfg)["hidden_size"]
    torch.manual_seed(seed)
    tower = CLIPVisionModelWithProjection(image_tower_config(image_size, hidden=32, layers=1, heads=2,
                                                             projection_dim=16, patch=8))
    tower.save_pretrained(str(model_dir / IMAGE_ENCODER))
    image_processor(image_size).save_pretrained(str(model_dir / IMAGE_PROCESSOR))
    cfg = AdapterConfig(image_dim=16, image_token_dim=32, clap_dim=clap, t5_dim=t5, t5_tokens=index.t5_max_length,
                        hidden=32, heads=2, max_chunks=4)
    save_adapters(MediaAdapters(cfg), model_dir / ADAPTERS)
    return model_dir
