"""The model directory (DESIGN.md section 5): layout, ``model_index.json``, checks, and ``assemble``.

```
model_index.json            format and version, components, sample rate, latent geometry, defaults
transformer/                config.json + model.safetensors
text_encoder/ tokenizer/    T5EncoderModel + tokenizer
clap/ clap_tokenizer/       CLAP (full or text tower) + tokenizer
vae/                        diffusers AutoencoderKL
vocoder/                    transformers SpeechT5HifiGan (official) or fluxmusic.vocos.VocosVocoder (by model_type)
null_embeddings.safetensors the "" encodings (txt, y), computed once when the directory is built
image_encoder/ image_processor/ adapters/   optional: image / story conditioning (fluxmusic.adapters)
```
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from fluxmusic.checkpoint import atomic_save_safetensors, atomic_write_text, read_json
from fluxmusic.config import FluxMusicConfig
from fluxmusic.errors import FluxMusicError
from fluxmusic.flow import Conditioning
from fluxmusic.latent import LatentGeometry, is_positive_int
from fluxmusic.modelcheck import (
    check_consistency,
    check_json_files,
    check_links,
    check_safetensors_file,
    check_weight_files,
)
from fluxmusic.sampling import OFFICIAL
from fluxmusic.tempfiles import publish

FORMAT = "fluxmusic-model"
VERSION = 1
INDEX = "model_index.json"
NULL_EMBEDDINGS = "null_embeddings.safetensors"
#: Longest text sequence a model directory may ask for (the published T5 uses 256; CLAP 77).
MAX_TEXT_TOKENS = 4096
COMPONENTS = ("transformer", "text_encoder", "tokenizer", "clap", "clap_tokenizer", "vae", "vocoder")

#: The official sampler's settings (sample.py, ``fluxmusic.sampling.OFFICIAL``), written as the defaults of an
#: assembled official model; the bundled default stores its own in model_index.json.
OFFICIAL_DEFAULTS = {k: list(v) if isinstance(v, tuple) else v for k, v in OFFICIAL.items()}


@dataclass
class ModelIndex:
    """What ``model_index.json`` holds."""

    geometry: LatentGeometry
    t5_max_length: int = 256
    clap_max_length: int = 77
    defaults: dict = field(default_factory=lambda: {"steps": 50, "guidance": 7.0, "solver": "euler", "shift": None})
    name: str = "fluxmusic"

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "name": self.name,
            "components": {c: c for c in COMPONENTS},
            "null_embeddings": NULL_EMBEDDINGS,
            "sample_rate": self.geometry.sample_rate,
            "geometry": self.geometry.to_dict(),
            "text": {"t5_max_length": self.t5_max_length, "clap_max_length": self.clap_max_length},
            "defaults": self.defaults,
        }

    @classmethod
    def from_dict(cls, d: dict, source: str) -> ModelIndex:
        if d.get("format") != FORMAT:
            raise FluxMusicError(f"{source} has format {d.get('format')!r}; expected {FORMAT!r}")
        if d.get("version") != VERSION:
            raise FluxMusicError(f"{source} has version {d.get('version')!r}; this fluxmusic reads version {VERSION}")
        text, geometry, defaults = d.get("text", {}), d.get("geometry"), d.get("defaults", {})
        for key, value in (("geometry", geometry), ("text", text), ("defaults", defaults)):
            if not isinstance(value, dict):
                raise FluxMusicError(f"{source}: {key} = {str(value)[:80]!r} must be a JSON object")
        lengths = {k: text.get(k, default) for k, default in (("t5_max_length", 256), ("clap_max_length", 77))}
        bad = [f"text.{k} = {v!r}" for k, v in lengths.items() if not is_positive_int(v) or v > MAX_TEXT_TOKENS]
        if bad:
            raise FluxMusicError(f"{source}: {', '.join(bad)} must be an integer in [1, {MAX_TEXT_TOKENS}]")
        name = d.get("name", "fluxmusic")
        if not isinstance(name, str):
            raise FluxMusicError(f"{source}: name = {name!r} must be a string")
        try:
            geo = LatentGeometry.from_dict(geometry)
        except FluxMusicError as e:
            raise FluxMusicError(f"{source}: {e}") from None
        return cls(geo, lengths["t5_max_length"], lengths["clap_max_length"], dict(defaults), name)


def read_index(model_dir: str | Path, allow_external_links: bool | None = None) -> ModelIndex:
    """Read and check a model directory: the index and every component folder must be there, every weights
    file complete, the geometry consistent with the components, and no symlink may lead outside it unless
    ``allow_external_links`` (default: ``$FLUXMUSIC_ALLOW_EXTERNAL_LINKS``). See :mod:`fluxmusic.modelcheck`."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FluxMusicError(f"model directory {model_dir} does not exist")
    path = model_dir / INDEX
    if not path.is_file():
        raise FluxMusicError(f"{model_dir} is not a fluxmusic model directory: it has no {INDEX}")
    check_links(model_dir, allow_external_links)
    index = ModelIndex.from_dict(read_json(path, "model index"), str(path))
    missing = [c for c in COMPONENTS if not (model_dir / c).is_dir()]
    if not (model_dir / NULL_EMBEDDINGS).is_file():
        missing.append(NULL_EMBEDDINGS)
    if missing:
        raise FluxMusicError(f"model directory {model_dir} is incomplete; missing: {', '.join(missing)}")
    from fluxmusic.adapters import MEDIA_COMPONENTS, check_media_dirs

    check_media_dirs(model_dir)  # optional (image / story), but all three or none
    for c in COMPONENTS + tuple(m for m in MEDIA_COMPONENTS if (model_dir / m).is_dir()):
        check_json_files(model_dir / c, c)
        check_weight_files(model_dir / c, c)
    check_safetensors_file(model_dir / NULL_EMBEDDINGS)
    check_consistency(model_dir, index)
    return index


def read_null_embeddings(model_dir: str | Path) -> Conditioning:
    """The precomputed "" conditioning, [1, Lt, Dt] and [1, Dy]."""
    path = Path(model_dir) / NULL_EMBEDDINGS
    try:
        data = load_file(str(path))
        return Conditioning(data["txt"].float(), data["y"].float())
    except Exception as e:
        raise FluxMusicError(f"{path} cannot be read (expected tensors 'txt' and 'y'): {e}") from e


def write_null_embeddings(model_dir: str | Path, null: Conditioning) -> None:
    atomic_save_safetensors(
        {"txt": null.txt.float().cpu(), "y": null.y.float().cpu()}, Path(model_dir) / NULL_EMBEDDINGS
    )


def geometry_from_components(vae_config: dict, vocoder_config: dict, max_duration: float = 10.24) -> LatentGeometry:
    """Latent geometry follows from the VAE and vocoder configs, so a smaller default VAE just works."""
    try:
        return LatentGeometry(
            sample_rate=int(vocoder_config.get("sampling_rate", 16000)),
            hop_length=int(math.prod(vocoder_config["upsample_rates"])),
            mel_bins=int(vocoder_config["model_in_dim"]),
            latent_channels=int(vae_config["latent_channels"]),
            vae_downsample=2 ** (len(vae_config["block_out_channels"]) - 1),
            max_duration=max_duration,
        )
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, FluxMusicError):
            raise
        raise FluxMusicError(f"VAE / vocoder configs do not describe a mel geometry: {type(e).__name__} {e}") from None


def check_compatible(cfg: FluxMusicConfig, geometry: LatentGeometry, t5_width: int, clap_width: int) -> None:
    """The transformer's input widths must match the latent channels and the two text encoders."""
    expected = {
        "in_channels": geometry.latent_channels * geometry.patch**2,
        "context_in_dim": t5_width,
        "vec_in_dim": clap_width,
    }
    bad = [f"{k} = {getattr(cfg, k)} but the components need {v}" for k, v in expected.items() if getattr(cfg, k) != v]
    if bad:
        raise FluxMusicError("transformer does not fit the other components: " + "; ".join(bad))
    if geometry.mel_bins % geometry.vae_downsample or geometry.latent_width % geometry.patch:
        raise FluxMusicError(
            f"mel bins {geometry.mel_bins} must be divisible by VAE downsampling {geometry.vae_downsample} "
            f"times the patch size {geometry.patch}"
        )


def assemble(
    out_dir: str | Path,
    transformer: str | Path,
    text_encoder: str | Path,
    tokenizer: str | Path,
    clap: str | Path,
    clap_tokenizer: str | Path,
    vae: str | Path,
    vocoder: str | Path,
    transformer_config: FluxMusicConfig | None = None,
    defaults: dict | None = None,
    max_duration: float = 10.24,
    name: str = "fluxmusic",
    t5_max_length: int = 256,
    clap_max_length: int = 77,
) -> Path:
    """Build a model directory from upstream parts and precompute the "" embeddings.

    ``transformer`` is a converted directory (config.json + model.safetensors) or a checkpoint file
    (official ``.pt``, state dict, safetensors) together with ``transformer_config``. Everything is
    written to a temporary sibling directory and renamed at the end, so a failure leaves nothing behind.
    """
    from fluxmusic.components import load_clap_text, load_t5, load_tokenizer, read_config
    from fluxmusic.text import TextEncoders, torch_clap_fn, torch_t5_fn
    from fluxmusic.transformer_io import convert_checkpoint, load_transformer

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FluxMusicError(f"output directory {out_dir} already exists; choose a new path")
    transformer = Path(transformer)
    if transformer.is_file() and transformer_config is None:
        raise FluxMusicError(f"transformer {transformer} is a checkpoint file: give its config (--config)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        if transformer.is_file():
            convert_checkpoint(transformer, tmp / "transformer", transformer_config)
        else:
            _copy_dir(transformer, tmp / "transformer", "transformer")
        for src, name_ in (
            (text_encoder, "text_encoder"),
            (tokenizer, "tokenizer"),
            (clap, "clap"),
            (clap_tokenizer, "clap_tokenizer"),
            (vae, "vae"),
            (vocoder, "vocoder"),
        ):
            _copy_dir(Path(src), tmp / name_, name_)

        geometry = geometry_from_components(
            read_config(tmp / "vae", "VAE"), read_config(tmp / "vocoder", "vocoder"), max_duration
        )
        t5 = load_t5(tmp / "text_encoder")
        clap_model = load_clap_text(tmp / "clap")
        cfg = load_transformer(tmp / "transformer").config
        check_compatible(cfg, geometry, t5.config.d_model, clap_model.config.hidden_size)
        index = ModelIndex(geometry, t5_max_length, clap_max_length, dict(defaults or OFFICIAL_DEFAULTS), name)
        encoders = TextEncoders(
            load_tokenizer(tmp / "tokenizer", "T5 tokenizer"),
            load_tokenizer(tmp / "clap_tokenizer", "CLAP tokenizer"),
            torch_t5_fn(t5),
            torch_clap_fn(clap_model),
            index.t5_max_length,
            index.clap_max_length,
        )
        write_null_embeddings(tmp, encoders.encode([""]))
        atomic_write_text(tmp / INDEX, json.dumps(index.to_dict(), indent=2) + "\n")
        check_consistency(tmp, index)  # what every load checks: never build a directory that will not load
        publish(tmp)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _copy_dir(src: Path, dst: Path, what: str) -> None:
    if not src.is_dir():
        raise FluxMusicError(f"{what} source {src} is not a directory")
    shutil.copytree(src, dst)


def component_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """VAE and vocoder stay fp32 until a lower precision is measured to keep parity."""
    return torch.float32 if name in ("vae", "vocoder") else dtype
