"""The training manifest (JSONL of audio paths and captions) and a dataset of random fixed-length crops.

One JSON object per line: ``{"path": ..., "caption": ..., "start": s, "duration": s, ...}``; ``start`` and
``duration`` (seconds) are optional and select a region of the file; any other keys are free attributes.
Relative paths are relative to the manifest's directory, so a corpus directory can be moved as a whole.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from fluxmusic.audio import audio_info, read_audio
from fluxmusic.errors import FluxMusicError

_RESERVED = ("path", "caption", "start", "duration")
_MAX_LISTED_ERRORS = 20


@dataclass(frozen=True)
class ManifestEntry:
    """One clip source: absolute ``path``, its ``caption``, an optional region, and free attributes."""

    path: Path
    caption: str
    start: float = 0.0
    duration: float | None = None
    attributes: dict = field(default_factory=dict, compare=False, hash=False)
    line: int = 0


def _parse_line(text: str, base: Path) -> ManifestEntry:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise FluxMusicError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise FluxMusicError(f"expected a JSON object, got {type(obj).__name__}")
    path = obj.get("path")
    if not isinstance(path, str) or not path:
        raise FluxMusicError('missing "path" (a non-empty string)')
    caption = obj.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise FluxMusicError(f'{path}: missing "caption" (a non-empty string)')
    start, duration = obj.get("start", 0.0), obj.get("duration")
    if isinstance(start, bool) or not isinstance(start, (int, float)) or not start >= 0:
        raise FluxMusicError(f'{path}: "start" must be a number of seconds >= 0, got {start!r}')
    if duration is not None and (
        isinstance(duration, bool) or not isinstance(duration, (int, float)) or not duration > 0
    ):
        raise FluxMusicError(f'{path}: "duration" must be a number of seconds > 0, got {duration!r}')
    full = Path(path) if os.path.isabs(path) else base / path
    audio_info(full)  # raises "not found" / "cannot read" with the path in the message
    attrs = {k: v for k, v in obj.items() if k not in _RESERVED}
    return ManifestEntry(full, caption, float(start), None if duration is None else float(duration), attrs)


def load_manifest(path: str | os.PathLike) -> list[ManifestEntry]:
    """Parse and check a JSONL manifest: every file exists and has a readable audio header.

    All bad lines are reported together in one FluxMusicError, each as ``manifest:LINE: problem``, so a
    large corpus is fixed in one pass rather than one error per run.
    """
    mpath = Path(path)
    if not mpath.is_file():
        raise FluxMusicError(f"manifest not found: {mpath}")
    base = mpath.resolve().parent
    entries: list[ManifestEntry] = []
    errors: list[str] = []
    with open(mpath, encoding="utf-8") as f:
        for lineno, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                e = _parse_line(text, base)
            except FluxMusicError as err:
                errors.append(f"{mpath}:{lineno}: {err}")
                continue
            entries.append(ManifestEntry(e.path, e.caption, e.start, e.duration, e.attributes, lineno))
    if errors:
        more = len(errors) - _MAX_LISTED_ERRORS
        listed = errors[:_MAX_LISTED_ERRORS] + ([f"... and {more} more"] if more > 0 else [])
        raise FluxMusicError(f"{len(errors)} bad manifest entries:\n  " + "\n  ".join(listed))
    if not entries:
        raise FluxMusicError(f"manifest {mpath} has no entries")
    return entries


class AudioClipDataset(Dataset):
    """Random crops of exactly ``clip_samples`` at ``sr`` (zero-padded at the end if the source is shorter).

    The crop of item ``i`` is drawn from ``numpy.random.default_rng([seed, epoch, i])``, so it depends only on
    (seed, epoch, index): a resumed run that calls ``set_epoch`` sees the same crops, whatever the worker
    count or order. Items are ``{"audio": float32 [clip_samples], "caption": str, "index": int}``.
    """

    def __init__(self, entries: list[ManifestEntry], clip_samples: int, sr: int = 16000, seed: int = 0):
        if clip_samples <= 0:
            raise FluxMusicError(f"clip_samples must be > 0, got {clip_samples}")
        self.entries = list(entries)
        self.clip_samples = int(clip_samples)
        self.sr = int(sr)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.entries)

    def crop(self, index: int) -> np.ndarray:
        e = self.entries[index]
        file_sr, file_frames, _ = audio_info(e.path)
        region_start = min(int(round(e.start * file_sr)), file_frames)
        region_end = file_frames
        if e.duration is not None:
            region_end = min(region_end, region_start + int(round(e.duration * file_sr)))
        # Work in target-rate samples for the random offset so crops are uniform on the output grid.
        region_len = (region_end - region_start) * self.sr / file_sr
        slack = max(0, int(math.floor(region_len)) - self.clip_samples)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        offset = int(rng.integers(0, slack + 1))
        first = region_start + int(round(offset * file_sr / self.sr))
        need = int(math.ceil(self.clip_samples * file_sr / self.sr))
        frames = max(0, min(need, region_end - first))
        wave = read_audio(e.path, self.sr, start=first, frames=frames) if frames else np.zeros(0, np.float32)
        out = np.zeros(self.clip_samples, dtype=np.float32)
        n = min(len(wave), self.clip_samples)
        out[:n] = wave[:n]
        return out

    def __getitem__(self, index: int) -> dict:
        return {
            "audio": torch.from_numpy(self.crop(index)),
            "caption": self.entries[index].caption,
            "index": index,
        }
