"""Checks a model directory must pass before anything is loaded from it (issue 17, items 5, 6 and 12).

Each check reads only small things (config files, safetensors headers, directory entries), so a broken or
hostile directory is refused with one clear :class:`FluxMusicError` in milliseconds, before any weights are
read, and the loaders themselves never meet a value of the wrong type:

- :func:`check_weight_files`: every ``*.safetensors`` file is complete (its header describes exactly the bytes
  the file holds) and no component carries only pickle weights (which we never unpickle);
- :func:`check_links`: no symlink inside the directory points outside it, unless allowed;
- :func:`check_consistency`: the geometry in ``model_index.json`` agrees with the VAE, vocoder, text encoders
  and transformer configs (vocoder upsampling product = hop length, mel bins, latent channels, widths, ...).
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

from fluxmusic.errors import FluxMusicError

#: Environment switch for :func:`check_links` (the CLI's ``--allow-external-links`` sets it).
ALLOW_LINKS_ENV = "FLUXMUSIC_ALLOW_EXTERNAL_LINKS"
#: Weight formats that are pickles: loading one could run code, so we never do.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
#: A safetensors header is a few hundred bytes per tensor; anything near this is not a real header.
MAX_HEADER_BYTES = 100 * 2**20
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}


# ----------------------------------------------------------------------------------------------- weight files
def check_safetensors_file(path: str | Path) -> None:
    """Raise unless ``path`` is a complete safetensors file: a parseable header whose tensors fit their byte
    ranges and cover the data exactly (a truncated or padded file fails here, not inside a library)."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FluxMusicError(f"weights file {path} is truncated ({size} bytes): not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise FluxMusicError(
                f"weights file {path} is truncated or not safetensors: its header claims {n} bytes, "
                f"the file has {size}"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FluxMusicError(f"weights file {path} has a corrupt safetensors header: {type(e).__name__}") from None
    if not isinstance(header, dict):
        raise FluxMusicError(f"weights file {path} has a corrupt safetensors header (not an object)")
    data_bytes = size - 8 - n
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = entry["dtype"], entry["shape"], entry["data_offsets"]
            if not (isinstance(begin, int) and isinstance(stop, int) and 0 <= begin <= stop):
                raise ValueError("bad offsets")
            if not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError("bad shape")
        except (KeyError, TypeError, ValueError):
            raise FluxMusicError(f"weights file {path} has a corrupt header entry for tensor {name!r}") from None
        if dtype in _DTYPE_BYTES and stop - begin != math.prod(shape) * _DTYPE_BYTES[dtype]:
            raise FluxMusicError(
                f"weights file {path}: tensor {name!r} ({dtype} {shape}) does not match its byte range"
            )
        end = max(end, stop)
    if end != data_bytes:
        raise FluxMusicError(
            f"weights file {path} is truncated or corrupt: its header describes {end} bytes of tensor data, "
            f"the file holds {data_bytes}"
        )


def check_weight_files(directory: str | Path, what: str) -> None:
    """Check every safetensors file in a component folder; refuse a folder whose weights are only pickles."""
    directory = Path(directory)
    if not directory.is_dir():
        return  # the caller reports a missing folder in its own words
    safetensors = sorted(directory.rglob("*.safetensors"))
    for path in safetensors:
        check_safetensors_file(path)
    pickles = sorted(p.name for p in directory.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES and p.is_file())
    if pickles and not safetensors:
        raise FluxMusicError(
            f"{what} in {directory} has only pickle weights ({', '.join(pickles)}); fluxmusic loads safetensors "
            "only, because unpickling can run code. Convert them (e.g. save_pretrained(safe_serialization=True))"
        )


def check_json_files(directory: str | Path, what: str) -> None:
    """Every ``*.json`` of a component folder (configs, tokenizer files) must be a JSON object we can parse:
    the libraries would otherwise fail on a list or a 200k-deep nesting with an AttributeError or a
    RecursionError."""
    from fluxmusic.checkpoint import read_json

    directory = Path(directory)
    if directory.is_dir():
        for path in sorted(directory.rglob("*.json")):
            read_json(path, f"{what} file")


# ----------------------------------------------------------------------------------------------- symlinks
def links_allowed(allow: bool | None) -> bool:
    if allow is not None:
        return allow
    return os.environ.get(ALLOW_LINKS_ENV, "").strip().lower() in ("1", "true", "yes")


def check_links(model_dir: str | Path, allow: bool | None = None) -> None:
    """Refuse symlinks that lead outside ``model_dir`` (a copied or downloaded directory could otherwise make
    us read any file the process can), unless ``allow`` (or ``$FLUXMUSIC_ALLOW_EXTERNAL_LINKS=1``) says so."""
    if links_allowed(allow):
        return
    root = os.path.realpath(model_dir)
    outside = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in (*dirnames, *filenames):
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                target = os.path.realpath(path)
                if os.path.commonpath([root, target]) != root:
                    outside.append(f"{os.path.relpath(path, root)} -> {target}")
    if outside:
        raise FluxMusicError(
            f"model directory {model_dir} has symlinks pointing outside it: {'; '.join(sorted(outside)[:5])}"
            f"{' ...' if len(outside) > 5 else ''}. Copy the files in, or allow it with --allow-external-links "
            f"(${ALLOW_LINKS_ENV}=1)"
        )


# ----------------------------------------------------------------------------------------------- consistency
def _get(cfg: dict, key: str, source: str, kind: type = int, positive: bool = True) -> Any:
    v = cfg.get(key)
    ok = isinstance(v, kind) and not isinstance(v, bool) and (not positive or v > 0)
    if not ok:
        raise FluxMusicError(f"{source}: {key} = {v!r} must be a {'positive ' if positive else ''}{kind.__name__}")
    return v


def check_consistency(model_dir: str | Path, index) -> None:
    """The index's geometry must be the one the VAE, vocoder, encoders and transformer actually have.

    Without this an inconsistent directory still generates, wrongly: a vocoder upsampling by 128 under a
    hop of 160 gives 3072 samples for 0.2 s instead of 3200.
    """
    from fluxmusic.components import read_config
    from fluxmusic.config import FluxMusicConfig
    from fluxmusic.modeldir import check_compatible

    model_dir = Path(model_dir)
    geo = index.geometry
    voc = read_config(model_dir / "vocoder", "vocoder")
    vae = read_config(model_dir / "vae", "VAE")
    src_voc, src_vae = f"{model_dir / 'vocoder' / 'config.json'}", f"{model_dir / 'vae' / 'config.json'}"
    rates = voc.get("upsample_rates")
    if not (isinstance(rates, list) and rates and all(isinstance(r, int) and r > 0 for r in rates)):
        raise FluxMusicError(f"{src_voc}: upsample_rates = {rates!r} must be a list of positive integers")
    blocks = vae.get("block_out_channels")
    if not (isinstance(blocks, list) and blocks):
        raise FluxMusicError(f"{src_vae}: block_out_channels = {blocks!r} must be a non-empty list")
    found = {
        "hop_length": (math.prod(rates), "vocoder upsample_rates product"),
        "sample_rate": (_get(voc, "sampling_rate", src_voc), "vocoder sampling_rate"),
        "mel_bins": (_get(voc, "model_in_dim", src_voc), "vocoder model_in_dim"),
        "latent_channels": (_get(vae, "latent_channels", src_vae), "VAE latent_channels"),
        "vae_downsample": (2 ** (len(blocks) - 1), "VAE downsampling (2 ** (levels - 1))"),
    }
    bad = [
        f"{key} = {getattr(geo, key)} but the {where} is {value}"
        for key, (value, where) in found.items()
        if getattr(geo, key) != value
    ]
    if _get(vae, "in_channels", src_vae) != 1:
        bad.append(f"the VAE takes {vae['in_channels']} input channels; a mel VAE takes 1")
    if bad:
        raise FluxMusicError(f"model directory {model_dir} is inconsistent: " + "; ".join(bad))
    t5 = read_config(model_dir / "text_encoder", "T5 encoder")
    clap = read_config(model_dir / "clap", "CLAP")
    clap_text = clap.get("text_config", {}) if clap.get("model_type") == "clap" else clap
    if not isinstance(clap_text, dict):
        raise FluxMusicError(f"{model_dir / 'clap' / 'config.json'}: text_config must be an object")
    src_clap = f"{model_dir / 'clap' / 'config.json'}"
    positions = clap_text.get("max_position_embeddings", 514)
    # RoBERTa-style position ids start after the padding index (2), so two positions are never usable.
    if isinstance(positions, int) and index.clap_max_length > positions - 2:
        raise FluxMusicError(
            f"model_index.json text.clap_max_length = {index.clap_max_length} exceeds what the CLAP text tower "
            f"supports ({positions - 2} tokens)"
        )
    cfg = FluxMusicConfig.load(model_dir / "transformer" / "config.json")
    check_compatible(
        cfg, geo, _get(t5, "d_model", f"{model_dir / 'text_encoder' / 'config.json'}"),
        _get(clap_text, "hidden_size", src_clap),
    )
