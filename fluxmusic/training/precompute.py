"""Precompute the transformer's training inputs once: audio -> scaled VAE latent, caption -> (T5, CLAP).

Written against the pipeline interface ``pipe.encode_audio(wave [B, T]) -> latent [B, C, H, W]`` (already
multiplied by the VAE scaling factor) and ``pipe.encode_text(captions) -> (txt, y)`` or a ``Conditioning``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from fluxmusic.errors import FluxMusicError
from fluxmusic.training.cache import write_cache


class Encoder(Protocol):
    def encode_audio(self, wave: Tensor) -> Tensor: ...
    def encode_text(self, captions: list[str]) -> Any: ...


def _txt_y(enc: Any) -> tuple[Tensor, Tensor]:
    return (enc.txt, enc.y) if hasattr(enc, "txt") else (enc[0], enc[1])


def _batches(items: Iterable[Mapping[str, Any]], size: int) -> Iterator[list[Mapping[str, Any]]]:
    chunk: list[Mapping[str, Any]] = []
    for it in items:
        chunk.append(it)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@torch.no_grad()
def precompute_cache(
    pipe: Encoder,
    items: Iterable[Mapping[str, Any]],
    out_dir: str | Path,
    batch_size: int = 8,
    shard_size: int = 256,
    dtype: torch.dtype = torch.float32,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Encode items ``{"audio" (or "wave"): [T] float, "caption": str, ...}`` into an embedding cache.

    Clips in one batch must have the same length (e.g. ``AudioClipDataset`` crops). Other non-tensor
    entries of an item are kept in the cache's ``items.jsonl``.
    """
    null_txt, null_y = _txt_y(pipe.encode_text([""]))

    def encoded() -> Iterator[dict[str, Any]]:
        for chunk in _batches(items, batch_size):
            try:
                waves = torch.stack([torch.as_tensor(it["audio"] if "audio" in it else it["wave"]) for it in chunk])
                captions = [str(it["caption"]) for it in chunk]
            except KeyError as e:
                raise FluxMusicError(f"precompute items need 'audio' (or 'wave') and 'caption'; missing {e}") from e
            latent = pipe.encode_audio(waves.float())
            txt, y = _txt_y(pipe.encode_text(captions))
            for i, it in enumerate(chunk):
                meta = {k: v for k, v in it.items() if k not in ("audio", "wave") and not isinstance(v, Tensor)}
                yield {"latent": latent[i], "txt": txt[i], "y": y[i], **meta}

    return write_cache(
        out_dir, encoded(), null_txt=null_txt[0], null_y=null_y[0], shard_size=shard_size, dtype=dtype,
        metadata=metadata,
    )
