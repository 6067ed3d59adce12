"""Saving and loading the transformer as ``config.json`` + ``model.safetensors``, and converting official files."""

from __future__ import annotations

from pathlib import Path

import torch

from fluxmusic import integrity
from fluxmusic.checkpoint import atomic_save_safetensors, atomic_write_text, load_weights, read_state_dict
from fluxmusic.config import FluxMusicConfig
from fluxmusic.errors import FluxMusicError
from fluxmusic.model import FluxMusicTransformer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_transformer(model: FluxMusicTransformer, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    # Per-tensor checksums in the header: read_state_dict verifies them (issue 17, item 7).
    metadata = {"format": "pt", **integrity.safetensors_metadata(state)}
    atomic_save_safetensors(state, directory / WEIGHTS_NAME, metadata=metadata)
    atomic_write_text(directory / CONFIG_NAME, _config_json(model.config))
    return directory


def _config_json(cfg: FluxMusicConfig) -> str:
    import json

    return json.dumps(cfg.to_dict(), indent=2) + "\n"


def load_transformer(
    directory: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> FluxMusicTransformer:
    """Load ``directory/config.json`` + ``directory/model.safetensors`` strictly."""
    directory = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FluxMusicError(f"transformer directory {directory} has no {name}")
    cfg = FluxMusicConfig.load(directory / CONFIG_NAME)
    with torch.device("meta"):
        model = FluxMusicTransformer(cfg)
    model = model.to_empty(device="cpu")
    load_weights(model, read_state_dict(directory / WEIGHTS_NAME), str(directory / WEIGHTS_NAME))
    return model.to(device=device, dtype=dtype).eval()


def convert_checkpoint(ckpt: str | Path, out_dir: str | Path, config: FluxMusicConfig) -> Path:
    """Official ``.pt`` (or any supported state-dict file) -> ``out_dir`` with config.json + model.safetensors."""
    with torch.device("meta"):
        model = FluxMusicTransformer(config)
    model = model.to_empty(device="cpu")
    load_weights(model, read_state_dict(ckpt), str(ckpt))
    return save_transformer(model, out_dir)
