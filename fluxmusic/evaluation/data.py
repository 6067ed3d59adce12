"""Evaluation inputs: prompts (with the attributes they state) and reference clips."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fluxmusic.errors import FluxMusicError
from fluxmusic.evaluation.attributes import VOCABULARIES, parse_attributes

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


@dataclass
class Prompt:
    text: str
    attributes: dict[str, str] = field(default_factory=dict)  # stated values, corpus vocabulary
    path: Path | None = None  # the clip this caption describes, when the prompts come from a manifest


@dataclass
class Reference:
    waves: list[np.ndarray]
    captions: list[str | None]
    attributes: list[dict[str, str]]
    paths: list[Path]


def _attributes(obj: dict, text: str) -> dict[str, str]:
    """Explicit attribute fields win; the rest are read from the text."""
    found = parse_attributes(text)
    for k in VOCABULARIES:
        if k in obj and obj[k] is not None:
            found[k] = str(obj[k]).lower()
    return found


def load_prompts(path: str | Path) -> list[Prompt]:
    """A text file (one prompt per line) or JSONL (``prompt`` or ``caption``, optional attributes and ``path``;
    a corpus manifest works as is)."""
    p = Path(path)
    if not p.is_file():
        raise FluxMusicError(f"prompts file {p} does not exist")
    out: list[Prompt] = []
    lines = p.read_text(encoding="utf-8").splitlines()
    if p.suffix == ".jsonl":
        base = p.resolve().parent
        for no, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise FluxMusicError(f"{p}:{no}: invalid JSON ({e.msg})") from None
            text = obj.get("prompt", obj.get("caption")) if isinstance(obj, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise FluxMusicError(f'{p}:{no}: needs a non-empty "prompt" or "caption" string')
            ref = obj.get("path")
            out.append(Prompt(text.strip(), _attributes(obj, text), (base / ref).resolve() if ref else None))
    else:
        out = [Prompt(t.strip(), parse_attributes(t)) for t in lines if t.strip()]
    if len(out) < 2:
        raise FluxMusicError(f"prompts file {p} has {len(out)} prompts; at least 2 are needed")
    return out


def load_reference(path: str | Path, sr: int, seconds: float, limit: int | None = None) -> Reference:
    """Reference clips from a manifest (JSONL, or a directory holding ``manifest.jsonl``) or a directory of
    audio files; each read at ``sr``, cut or zero-padded to ``seconds`` (the generated length)."""
    from fluxmusic.audio import read_audio
    from fluxmusic.data.manifest import load_manifest

    p = Path(path)
    if p.is_dir() and (p / "manifest.jsonl").is_file():
        p = p / "manifest.jsonl"
    n = int(round(seconds * sr))
    items: list[tuple[Path, str | None, dict, float]] = []
    if p.is_file():
        for e in load_manifest(p):
            items.append((e.path.resolve(), e.caption, _attributes(e.attributes, e.caption), e.start))
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in AUDIO_SUFFIXES)
        items = [(f.resolve(), None, {}, 0.0) for f in files]
    else:
        raise FluxMusicError(f"reference {p} is neither a manifest nor a directory")
    items = items[:limit] if limit else items
    if len(items) < 4:
        raise FluxMusicError(f"reference {path} has {len(items)} clips; at least 4 are needed (two halves of 2)")
    waves = []
    for f, _, _, start in items:
        from fluxmusic.audio import audio_info

        file_sr = audio_info(f)[0]
        w = read_audio(f, sr, start=int(round(start * file_sr)), frames=int(np.ceil(seconds * file_sr)))[:n]
        waves.append(np.pad(w, (0, n - len(w))))
    return Reference(waves, [c for _, c, _, _ in items], [a for _, _, a, _ in items], [f for f, _, _, _ in items])
