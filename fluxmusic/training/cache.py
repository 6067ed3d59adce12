"""Cached training embeddings: a directory of safetensors shards of (latent, txt, y) per item.

Layout of a cache directory::

    cache.json               format marker, item count, shapes, dtype, shard list, free-form metadata
    null.safetensors         null_txt [Lt, Dt], null_y [Dy]: the embeddings of "" (CFG dropout target)
    items.jsonl              one JSON object per item: caption and any other metadata given
    shard-00000.safetensors  latent [n, C, H, W], txt [n, Lt, Dt], y [n, Dy]

Latents are stored already multiplied by the VAE scaling factor. The files hold only tensors (safetensors),
so reading a cache never runs code.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from fluxmusic.checkpoint import atomic_save_safetensors, atomic_write_text, read_json
from fluxmusic.errors import FluxMusicError

INDEX_NAME = "cache.json"
NULL_NAME = "null.safetensors"
ITEMS_NAME = "items.jsonl"
FORMAT = "fluxmusic-embedding-cache"
KEYS = ("latent", "txt", "y")


def write_cache(
    out_dir: str | Path,
    items_iter: Iterable[Mapping[str, Any]],
    *,
    null_txt: Tensor,
    null_y: Tensor,
    shard_size: int = 256,
    dtype: torch.dtype = torch.float32,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Stream items ``{"latent": [C,H,W], "txt": [Lt,Dt], "y": [Dy], "caption"?: str, ...}`` into shards.

    Every item must have the same shapes. Non-tensor entries (caption, attributes) go to ``items.jsonl``.
    ``dtype`` may be float16/bfloat16 to halve the disk size; the reader returns float32.
    """
    out = Path(out_dir)
    if (out / INDEX_NAME).exists():
        raise FluxMusicError(f"{out} already holds an embedding cache; choose another directory")
    out.mkdir(parents=True, exist_ok=True)
    shapes: dict[str, tuple[int, ...]] | None = None
    pending: dict[str, list[Tensor]] = {k: [] for k in KEYS}
    shards: list[dict[str, Any]] = []
    meta_lines: list[str] = []
    count = 0

    def flush() -> None:
        if not pending["latent"]:
            return
        name = f"shard-{len(shards):05d}.safetensors"
        atomic_save_safetensors({k: torch.stack(v).to(dtype) for k, v in pending.items()}, out / name)
        shards.append({"file": name, "count": len(pending["latent"])})
        for v in pending.values():
            v.clear()

    for item in items_iter:
        missing = [k for k in KEYS if not isinstance(item.get(k), Tensor)]
        if missing:
            raise FluxMusicError(f"cache item {count} has no tensor for {', '.join(missing)}")
        item_shapes = {k: tuple(item[k].shape) for k in KEYS}
        if shapes is None:
            shapes = item_shapes
            _check_null(null_txt, null_y, shapes, "write_cache")
        elif item_shapes != shapes:
            raise FluxMusicError(f"cache item {count} has shapes {item_shapes}, expected {shapes} like item 0")
        for k in KEYS:
            pending[k].append(item[k].detach().to("cpu", torch.float32))
        meta_lines.append(json.dumps({k: v for k, v in item.items() if k not in KEYS}))
        count += 1
        if len(pending["latent"]) >= shard_size:
            flush()
    flush()
    if shapes is None:
        raise FluxMusicError("write_cache got no items")
    atomic_save_safetensors(
        {"null_txt": null_txt.detach().cpu().float(), "null_y": null_y.detach().cpu().float()}, out / NULL_NAME,
    )
    atomic_write_text(out / ITEMS_NAME, "".join(line + "\n" for line in meta_lines))
    index = {
        "format": FORMAT, "version": 1, "count": count, "dtype": str(dtype).replace("torch.", ""),
        "shapes": {k: list(v) for k, v in shapes.items()}, "shards": shards, "metadata": metadata or {},
    }
    # Written last: a cache without cache.json is visibly incomplete.
    atomic_write_text(out / INDEX_NAME, json.dumps(index, indent=2) + "\n")
    return out


def _check_null(null_txt: Tensor, null_y: Tensor, shapes: Mapping[str, tuple[int, ...]], where: str) -> None:
    if tuple(null_txt.shape) != tuple(shapes["txt"]) or tuple(null_y.shape) != tuple(shapes["y"]):
        raise FluxMusicError(
            f"{where}: null embeddings {tuple(null_txt.shape)}, {tuple(null_y.shape)} do not match the items' "
            f"txt {tuple(shapes['txt'])} and y {tuple(shapes['y'])}"
        )


class CachedEmbeddingDataset:
    """Map-style dataset over a cache directory; ``ds[i]`` is ``{"latent", "txt", "y"}`` in float32.

    Items are read lazily from memory-mapped shards (random access reads one item, not a shard).
    ``indices`` restricts the view to a subset (train / validation split).
    """

    def __init__(self, directory: str | Path, indices: list[int] | None = None) -> None:
        self.dir = Path(directory)
        index_path = self.dir / INDEX_NAME
        if not index_path.is_file():
            raise FluxMusicError(f"{self.dir} is not an embedding cache (no {INDEX_NAME}); write one with write_cache")
        index = read_json(index_path, "embedding cache index")
        if index.get("format") != FORMAT:
            raise FluxMusicError(f"{index_path} is not a fluxmusic embedding cache index")
        self.shapes = {k: tuple(v) for k, v in index["shapes"].items()}
        self.metadata: dict[str, Any] = index.get("metadata", {})
        self._locate: list[tuple[int, int]] = []
        self._files: list[Path] = []
        for s, shard in enumerate(index["shards"]):
            path = self.dir / shard["file"]
            if not path.is_file():
                raise FluxMusicError(f"embedding cache {self.dir} is missing shard {shard['file']}")
            self._files.append(path)
            self._locate.extend((s, i) for i in range(shard["count"]))
        if len(self._locate) != index["count"]:
            raise FluxMusicError(f"{index_path} lists {index['count']} items but its shards hold {len(self._locate)}")
        self.indices = list(range(len(self._locate))) if indices is None else list(indices)
        try:
            null = load_file(str(self.dir / NULL_NAME))
            self.null_txt, self.null_y = null["null_txt"].float(), null["null_y"].float()
        except Exception as e:
            raise FluxMusicError(f"embedding cache {self.dir} has no readable {NULL_NAME}: {e}") from e
        _check_null(self.null_txt, self.null_y, self.shapes, str(self.dir))
        self._handles: dict[int, Any] = {}
        self._beats: Tensor | None = None
        self._registers: Tensor | None = None
        self.seconds_per_frame: float | None = None  # set by with_beats

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        shard, row = self._locate[self.indices[i]]
        handle = self._handles.get(shard)
        if handle is None:
            try:
                handle = self._handles[shard] = safe_open(str(self._files[shard]), framework="pt")
            except Exception as e:
                raise FluxMusicError(f"cannot read cache shard {self._files[shard]}: {e}") from e
        item = {k: handle.get_slice(k)[row].float() for k in KEYS}
        if self._beats is not None:
            item["beat"] = self._beats[self.indices[i]]
            item["register"] = self._registers[self.indices[i]]
        return item

    def with_beats(self) -> CachedEmbeddingDataset:
        """This view whose items also carry ``"beat"`` = [bpm, t0 s] (NaN where unknown) from the items'
        ``bpm`` and ``beat_t0`` metadata (``fluxmusic.beat``: the beat-grid conditioning's training input), with
        ``seconds_per_frame`` from the cache's metadata, and ``"register"`` = the register hint's target MIDI
        pitch: the clip's measured ``melody_midi`` where the cache has it (``beat_phases --melody``), else the
        centre of its ``register`` word's class (``fluxmusic.register``), else NaN (no hint)."""
        from fluxmusic.beat import item_bpm

        meta = self._all_meta()
        nan = float("nan")
        rows = [[item_bpm(m) if m.get("beat_t0") is not None else nan, m.get("beat_t0", nan)] for m in meta]
        if all(r[1] != r[1] for r in rows):
            raise FluxMusicError(f"embedding cache {self.dir} has no beat phases (beat_t0 in items.jsonl); "
                                 "add them with python -m fluxmusic.training.beat_phases")
        spf = self.metadata.get("seconds_per_latent_frame")
        if not (isinstance(spf, (int, float)) and spf > 0):
            raise FluxMusicError(f"embedding cache {self.dir} does not say its seconds_per_latent_frame (cache.json "
                                 "metadata); add the beat phases with python -m fluxmusic.training.beat_phases")
        sub = self.subset(list(range(len(self.indices))))
        sub.seconds_per_frame = float(spf)
        sub._registers = torch.tensor([_register_target(m) for m in meta], dtype=torch.float32)
        sub._beats = torch.tensor([[nan if v is None else float(v) for v in r] for r in rows], dtype=torch.float32)
        return sub

    def subset(self, indices: list[int]) -> CachedEmbeddingDataset:
        sub = object.__new__(CachedEmbeddingDataset)
        sub.__dict__.update(self.__dict__)
        sub.indices = [self.indices[i] for i in indices]
        sub._handles = {}
        return sub

    def items_meta(self) -> list[dict[str, Any]]:
        """The non-tensor entries (caption, attributes) of the items in this view."""
        all_meta = self._all_meta()
        return [all_meta[i] for i in self.indices]

    def _all_meta(self) -> list[dict[str, Any]]:
        """The non-tensor entries of every item of the cache (``{}`` where items.jsonl has none)."""
        lines = (self.dir / ITEMS_NAME).read_text().splitlines() if (self.dir / ITEMS_NAME).is_file() else []
        meta = [json.loads(line) for line in lines]
        return meta + [{}] * (len(self._locate) - len(meta))


def split(
    ds: CachedEmbeddingDataset, val_items: int, seed: int = 0
) -> tuple[CachedEmbeddingDataset, CachedEmbeddingDataset | None]:
    """Deterministic random hold-out of ``val_items`` items (0: no validation set)."""
    if val_items <= 0:
        return ds, None
    if val_items >= len(ds):
        raise FluxMusicError(f"cannot hold out {val_items} validation items from a cache of {len(ds)}")
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()
    return ds.subset(sorted(order[val_items:])), ds.subset(sorted(order[:val_items]))


def _register_target(meta: dict[str, Any]) -> float:
    """The register hint's training target for one item: its measured melody pitch, else its word's centre."""
    from fluxmusic.register import register_midi

    measured = meta.get("melody_midi")
    if isinstance(measured, (int, float)) and math.isfinite(measured):
        return float(measured)
    return register_midi(meta.get("register"))
