"""Saving and loading the transformer as ``config.json`` + ``model.safetensors``, and converting official files."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fluxmusic import integrity
from fluxmusic.checkpoint import atomic_write_text, check_state_dict, read_state_dict
from fluxmusic.config import FluxMusicConfig
from fluxmusic.errors import FluxMusicError
from fluxmusic.model import FluxMusicTransformer
from fluxmusic.streaming import SafetensorsReader, save_streaming

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_transformer(model: FluxMusicTransformer, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    specs = {k: (torch.float32, tuple(v.shape)) for k, v in state.items()}
    # Per-tensor checksums in the header (verified on every read, issue 17 item 7), hashed one tensor at a time;
    # then streamed tensor by tensor (fp32 on disk): no second copy of the weights while saving.
    fp32 = lambda k: state[k].detach().to("cpu", torch.float32)  # noqa: E731
    sums = {k: integrity.tensor_sha256(fp32(k)) for k in state}
    metadata = {"format": "pt", integrity.METADATA_KEY: json.dumps(sums, sort_keys=True)}
    save_streaming(specs, fp32, directory / WEIGHTS_NAME, metadata=metadata)
    atomic_write_text(directory / CONFIG_NAME, _config_json(model.config))
    return directory


def _config_json(cfg: FluxMusicConfig) -> str:
    import json

    return json.dumps(cfg.to_dict(), indent=2) + "\n"


def _meta_model(cfg: FluxMusicConfig) -> FluxMusicTransformer:
    """The model's structure without memory: parameters on the meta device, to be assigned real tensors."""
    with torch.device("meta"):
        return FluxMusicTransformer(cfg)


def load_transformer(
    directory: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> FluxMusicTransformer:
    """Load ``directory/config.json`` + ``directory/model.safetensors`` strictly, streamed into ``dtype``/``device``.

    Keys and shapes are checked from the file's header before any data is read (one error naming every
    problem). Each tensor is then read, cast and moved on its own and assigned to the meta-initialised
    model, so the peak memory is the weights in ``dtype`` plus one tensor in the file's dtype.
    """
    directory = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FluxMusicError(f"transformer directory {directory} has no {name}")
    cfg = FluxMusicConfig.load(directory / CONFIG_NAME)
    model = _meta_model(cfg)
    path = directory / WEIGHTS_NAME
    reader = SafetensorsReader(path)
    check_state_dict(model, reader.meta_state(), str(path))
    with reader:
        state = {k: reader.read(k, dtype, device) for k in model.state_dict()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def convert_checkpoint(ckpt: str | Path, out_dir: str | Path, config: FluxMusicConfig) -> Path:
    """Official ``.pt`` (or any supported state-dict file) -> ``out_dir`` with config.json + model.safetensors.

    ``.pt`` files are memory-mapped (``torch.load(mmap=True, weights_only=True)``): only the EMA weights' pages
    are ever read (the optimizer state in the same file is not), and they are written out tensor by tensor.
    """
    ckpt = Path(ckpt)
    model = _meta_model(config)
    expected = model.state_dict()
    if ckpt.suffix == ".safetensors":
        reader = SafetensorsReader(ckpt)
        check_state_dict(model, reader.meta_state(), str(ckpt))
        with reader:
            _write(config, expected, lambda k: reader.read(k, torch.float32), out_dir)
    else:
        state = read_state_dict(ckpt, mmap=True)
        check_state_dict(model, state, str(ckpt))
        _write(config, expected, lambda k: state[k].to(torch.float32), out_dir)
    return Path(out_dir)


def _write(cfg: FluxMusicConfig, expected: dict, produce, out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    specs = {k: (torch.float32, tuple(v.shape)) for k, v in expected.items()}
    sums = {k: integrity.tensor_sha256(produce(k)) for k in expected}  # one tensor at a time
    metadata = {"format": "pt", integrity.METADATA_KEY: json.dumps(sums, sort_keys=True)}
    save_streaming(specs, produce, out_dir / WEIGHTS_NAME, metadata=metadata)
    atomic_write_text(out_dir / CONFIG_NAME, _config_json(cfg))
